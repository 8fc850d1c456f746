"""Loading: embedded defaults, then the TOML file, then command-line overrides, checked."""

from __future__ import annotations

import dataclasses
import difflib
import re
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from mtrkmta.config.convert import (
    _CONVERT,
    _SECTION,
    _TOML,
    ConfigError,
    Converter,
    _Context,
    _domain_name,
    _format_duration,
    _got,
    _Invalid,
)
from mtrkmta.config.routes import _merge_routes, _route_option, _toml_key
from mtrkmta.config.schema import Config

# ---------------------------------------------------------------------------
# Loading


@dataclass(frozen=True, slots=True)
class Override:
    """One command-line override: ``source`` names the option in messages, ``key`` the setting.

    ``value`` is the option's string (a tuple of strings for ``domains.local``); for
    ``routes`` it is one ``DOMAIN=TARGET``, and several such overrides add up.
    """

    source: str
    key: str
    value: object


@dataclass(frozen=True, slots=True)
class _Key:
    section: str
    name: str | None  # None: the whole table is the value, as for [routes]
    attr: tuple[str, ...]
    convert: Converter
    default: object

    @property
    def dotted(self) -> str:
        return self.section if self.name is None else f"{self.section}.{self.name}"


@dataclass(frozen=True, slots=True)
class _Value:
    value: Any
    where: str | None
    from_option: bool = False

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.where, None if self.from_option else key, problem)


def _section_class(field: dataclasses.Field[Any]) -> type[Any]:
    """The dataclass of a section field of Config: its default_factory."""
    factory = field.default_factory
    assert isinstance(factory, type) and dataclasses.is_dataclass(factory), field.name
    return factory


def _schema() -> tuple[_Key, ...]:
    keys: list[_Key] = []
    for outer in dataclasses.fields(Config):
        if _SECTION in outer.metadata:
            section = outer.metadata[_SECTION]
            for inner in dataclasses.fields(_section_class(outer)):
                convert = inner.metadata[_CONVERT]
                attr = (outer.name, inner.name)
                keys.append(_Key(section, inner.name, attr, convert, inner.default))
        else:
            section, _, name = outer.metadata[_TOML].partition(".")
            convert = outer.metadata[_CONVERT]
            keys.append(_Key(section, name or None, (outer.name,), convert, outer.default))
    return tuple(keys)


def setting_names() -> tuple[str, ...]:
    """Every configurable key as ``section.key`` (``routes`` for the routes table), in order."""
    return tuple(key.dotted for key in _schema())


def _read_toml(path: Path) -> dict[str, Any]:
    where = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(where, None, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(where, None, "is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(where, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(where, None, f"line {line}: not valid UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, None, f"invalid TOML: {exc}") from None


def _unknown_section(name: str, keys: Sequence[_Key]) -> str:
    sections = list(dict.fromkeys(key.section for key in keys))
    for key in keys:
        if key.name == name:
            return f"unknown section; did you mean {name} under [{key.section}]?"
    close = difflib.get_close_matches(name, sections, n=1)
    if close:
        return f"unknown section; did you mean [{close[0]}]?"
    return "unknown section; sections are " + ", ".join(f"[{s}]" for s in sections)


def _unknown_key(section: str, name: str, keys: Sequence[_Key]) -> str:
    for key in keys:
        if key.name == name:
            return f"unknown key; did you mean {key.dotted} (under [{key.section}])?"
    own = [key.name for key in keys if key.section == section and key.name]
    close = difflib.get_close_matches(name, own, n=1)
    if close:
        return f"unknown key; did you mean {section}.{close[0]}?"
    elsewhere = {key.name: key.dotted for key in keys if key.name}
    close = difflib.get_close_matches(name, list(elsewhere), n=1)
    if close:
        return f"unknown key; did you mean {elsewhere[close[0]]}?"
    return f"unknown key; [{section}] has " + ", ".join(own)


def _load_file(path: Path, keys: Sequence[_Key], values: dict[str, _Value]) -> None:
    where = str(path)
    document = _read_toml(path)
    sections = {key.section for key in keys}
    for name, content in document.items():
        if name not in sections:
            raise ConfigError(where, _toml_key(name), _unknown_section(name, keys))
        if not isinstance(content, dict):
            raise ConfigError(where, name, f"expected a table ([{name}]), got {_got(content)}")
        whole_table = any(key.section == name and key.name is None for key in keys)
        known = {key.name for key in keys if key.section == name}
        for key_name in content if not whole_table else ():
            if key_name not in known:
                problem = _unknown_key(name, key_name, keys)
                raise ConfigError(where, f"{name}.{_toml_key(key_name)}", problem)
    ctx = _Context(path.absolute().parent)
    for key in keys:
        content = document.get(key.section)
        if content is None or (key.name is not None and key.name not in content):
            continue
        raw = content if key.name is None else content[key.name]
        try:
            values[key.dotted] = _Value(key.convert(raw, ctx), where)
        except _Invalid as exc:
            raise ConfigError(where, key.dotted + exc.suffix, exc.problem) from None


def _apply_overrides(
    overrides: Sequence[Override], keys: Sequence[_Key], values: dict[str, _Value]
) -> None:
    by_name = {key.dotted: key for key in keys}
    ctx = _Context(Path.cwd())
    for override in overrides:
        key = by_name.get(override.key)
        if key is None:
            raise ValueError(f"{override.source}: no setting named {override.key!r}")
        convert = _route_option if key.dotted == "routes" else key.convert
        try:
            value = convert(override.value, ctx)
        except _Invalid as exc:
            raise ConfigError(override.source, None, exc.problem) from None
        if key.dotted == "routes" and "routes" in values:
            value = (*values["routes"].value, *value)
        values[key.dotted] = _Value(value, override.source, from_option=True)


def _fill_defaults(
    keys: Sequence[_Key], values: dict[str, _Value], fqdn: Callable[[], str]
) -> None:
    if "server.hostname" not in values:
        machine = fqdn()
        try:
            name = _domain_name(machine, "a host name")
        except _Invalid:
            problem = (
                f"this machine's name {machine!r} is not a valid host name; "
                "set server.hostname or --hostname"
            )
            raise ConfigError(None, "server.hostname", problem) from None
        values["server.hostname"] = _Value(name, None)
    if "server.node_id" not in values:
        values["server.node_id"] = _Value(values["server.hostname"].value, None)
    if "server.data_dir" not in values:
        values["server.data_dir"] = _Value(Path.cwd() / "mtrkmta-data", None)
    if "server.database" not in values:
        database = values["server.data_dir"].value / "tracking.sqlite"
        values["server.database"] = _Value(f"sqlite:///{database}", None)
    for key in keys:
        if key.dotted not in values:
            values[key.dotted] = _Value(key.default, None)
    values["routes"] = dataclasses.replace(
        values["routes"], value=_merge_routes(values["routes"].value)
    )


_EPHEMERAL_PORT = re.compile(r"(tcp6?|ssl):(port=)?0(:|$)")


def _cross_check(values: Mapping[str, _Value]) -> None:
    def fail(key: str, problem: str) -> ConfigError:
        return values[key].error(key, problem)

    seen: dict[str, str] = {}
    for name in ("smtp", "submission", "lmtp", "mtqp", "http"):
        endpoint = values[f"listeners.{name}"].value
        if endpoint is None:
            continue
        key = f"listeners.{name}"
        if _EPHEMERAL_PORT.match(endpoint):
            continue  # port 0: the system picks a distinct free port for each listener
        if endpoint in seen:
            other = seen[endpoint]
            if values[key].where is None:  # blame the one that was set, not a default
                key, other = other, key
            raise fail(key, f"same endpoint as {other} ({endpoint!r})")
        seen[endpoint] = key

    per_ip = values["limits.max_connections_per_ip"].value
    total = values["limits.max_connections"].value
    if per_ip > total:
        raise fail(
            "limits.max_connections_per_ip",
            f"must not exceed limits.max_connections ({total}), got {per_ip}",
        )

    certificate = values["tls.certificate"]
    private_key = values["tls.private_key"]
    if certificate.value is not None and private_key.value is None:
        raise certificate.error("tls.private_key", "required when tls.certificate is set")
    if private_key.value is not None and certificate.value is None:
        raise private_key.error("tls.certificate", "required when tls.private_key is set")

    # [mtqp] section: requiring TLS needs a certificate to offer it with.
    if values["mtqp.tls_required"].value and certificate.value is None:
        raise values["mtqp.tls_required"].error(
            "mtqp.tls_required", "needs tls.certificate and tls.private_key"
        )
    if values["mtqp.chain"].value and not values["mtqp.chain_domains"].value:
        raise values["mtqp.chain"].error(
            "mtqp.chain", "needs mtqp.chain_domains (the inner hosts it may ask)"
        )

    for shorter, longer in (
        ("tracking.default_retention", "tracking.max_retention"),
        ("queue.first_retry", "queue.max_retry_interval"),
    ):
        short, long = values[shorter].value, values[longer].value
        if short > long:
            raise fail(
                shorter,
                f"must not exceed {longer} ({_format_duration(long)}), "
                f"got {_format_duration(short)}",
            )


def load_config(
    path: Path | None = None,
    overrides: Sequence[Override] = (),
    *,
    fqdn: Callable[[], str] = socket.getfqdn,
) -> Config:
    """Build the configuration from defaults, then ``path`` (TOML), then ``overrides``.

    ``fqdn`` supplies the default host name. Raises ConfigError on the first mistake.
    Nothing on disk is created or modified.
    """
    keys = _schema()
    values: dict[str, _Value] = {}
    if path is not None:
        _load_file(path, keys, values)
    _apply_overrides(overrides, keys, values)
    _fill_defaults(keys, values, fqdn)
    _cross_check(values)
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key in keys:
        value = values[key.dotted].value
        if len(key.attr) == 2:
            sections.setdefault(key.attr[0], {})[key.attr[1]] = value
        else:
            top[key.attr[0]] = value
    for outer in dataclasses.fields(Config):
        if _SECTION in outer.metadata:
            top[outer.name] = _section_class(outer)(**sections.get(outer.name, {}))
    return Config(**top)


def check_config_file(
    path: Path, *, fqdn: Callable[[], str] = socket.getfqdn
) -> ConfigError | None:
    """Load ``path`` as ``mtrkmta check-config`` does: the error start-up would stop on, or None."""
    try:
        load_config(path, fqdn=fqdn)
    except ConfigError as exc:
        return exc
    return None
