"""Typed configuration: embedded defaults, then a TOML file, then command-line overrides."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import socket
import string
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias, cast

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.testing import MemoryReactor

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
MINUTE = 60.0
HOUR = 60 * MINUTE
DAY = 24 * HOUR
WEEK = 7 * DAY

#: Tracking retention (RFC 3885 §3.1): never less than a day; the default when MTRK
#: names no timeout, and the cap on the timeout it names (project choices).
MIN_RETENTION = DAY
DEFAULT_RETENTION = 9 * DAY
MAX_RETENTION = 30 * DAY

#: The largest integer or size any key takes: TOML's own range (64-bit signed integers).
MAX_INTEGER = 2**63 - 1
#: The longest duration any key takes (100 years), so that adding it to a date never overflows.
MAX_DURATION = 36500 * DAY
_SHOWN = 40  # characters of a value shown in a message before it is cut short

#: Exit status for a configuration error, for ``twistd``, ``mtrkmta serve`` and ``check-config``.
EXIT_CONFIG_ERROR = 2

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Transport: TypeAlias = Literal["maildir", "lmtp", "smtp", "mx"]


class ConfigError(Exception):
    """A configuration mistake; ``str()`` is the single line to show the user.

    ``where`` is the file or the command-line option the bad value came from
    (None for an embedded default), ``key`` the ``section.key`` it belongs to
    (None when ``where`` is an option, which already names it).
    """

    def __init__(self, where: str | None, key: str | None, problem: str) -> None:
        self.where = where
        self.key = key
        self.problem = problem
        super().__init__(": ".join(p for p in ("config error", where, key, problem) if p))

    def __str__(self) -> str:
        return str(self.args[0])


class _Invalid(ValueError):
    """Raised by a converter; ``suffix`` narrows the key, e.g. ``[2]`` or ``."example.org"``."""

    def __init__(self, problem: str, suffix: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.suffix = suffix


@dataclass(frozen=True, slots=True)
class _Context:
    """What a converter needs besides the value: the directory relative paths start from."""

    base: Path


Converter: TypeAlias = Callable[[object, _Context], Any]

_CONVERT = "mtrkmta.convert"
_TOML = "mtrkmta.toml"
_SECTION = "mtrkmta.section"


def _key(convert: Converter, toml: str | None = None) -> dict[str, object]:
    """Field metadata of one configuration key: how to check and convert a raw value.

    ``toml`` places a top-level Config attribute in the file (``"server.hostname"``);
    keys of section classes are named after their field.
    """
    return {_CONVERT: convert} if toml is None else {_CONVERT: convert, _TOML: toml}


def _section(name: str) -> dict[str, object]:
    """Field metadata of a ``[name]`` section, whose keys are the fields of its class."""
    return {_SECTION: name}


# ---------------------------------------------------------------------------
# Describing values in messages


def _got(value: object) -> str:
    """Show a raw value the way the user wrote it, with its TOML type when not a string."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int):
        return f"{value} (an integer)"
    if isinstance(value, float):
        return f"{value!r} (a float)"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return f"{value} (a date/time)"


def _brief(value: object) -> str:
    """Like :func:`_got`, but a long string or number is cut short after ``_SHOWN`` characters."""
    if isinstance(value, str) and len(value) > _SHOWN:
        return repr(value[:_SHOWN] + "...")
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{_clip(str(value))} (an integer)"
    return _got(value)


def _clip(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _format_duration(seconds: float) -> str:
    """Render seconds the way durations are written in the file, e.g. ``1h30m`` or ``9d``."""
    if seconds <= 0 or seconds != int(seconds):
        return f"{seconds:g}s"
    rest = int(seconds)
    parts = []
    for unit, length in (("d", int(DAY)), ("h", int(HOUR)), ("m", int(MINUTE)), ("s", 1)):
        count, rest = divmod(rest, length)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _format_size(size: int) -> str:
    """Render bytes the way sizes are written in the file, e.g. ``35M``."""
    for unit, length in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if size and size % length == 0:
            return f"{size // length}{unit}"
    return str(size)


def _check_minimum(value: float, minimum: float, shown: str, render: Callable[[Any], str]) -> None:
    if minimum == 0 and value < 0:
        raise _Invalid(f"must not be negative, got {shown}")
    if minimum > 0 and value <= 0:
        raise _Invalid(f"must be greater than zero, got {shown}")
    if value < minimum:
        raise _Invalid(f"must be at least {render(minimum)}, got {shown}")


# ---------------------------------------------------------------------------
# Converters: raw TOML value (or command-line string) -> typed value


def _integer(minimum: int, maximum: int = MAX_INTEGER) -> Converter:
    """A whole number from ``minimum`` to ``maximum``."""

    def convert(value: object, ctx: _Context) -> int:
        if isinstance(value, str):
            raise _Invalid(f"expected an integer (written without quotes), got {_brief(value)}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer, got {_got(value)}")
        if value > maximum:
            raise _Invalid(f"must be at most {maximum}, got {_clip(str(value))}")
        _check_minimum(value, minimum, _clip(str(value)), str)
        return value

    return convert


def _choice(*options: str) -> Converter:
    """One of ``options`` (a string, matched without regard to case)."""

    def convert(value: object, ctx: _Context) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise _Invalid(f"expected one of {', '.join(options)}, got {_got(value)}")
        return value.lower()

    return convert


TLS_POLICIES = ("none", "may", "encrypt")

_SIZE_RE = re.compile(r"(\d+)([KMGT]?)(?:I?B)?")


def _parse_size(value: object) -> int:
    """``512K``, ``10M``, ``1G`` (binary multiples) or a bare number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE_RE.fullmatch(value.strip().upper()) if isinstance(value, str) else None
    if match is None:
        raise _Invalid(f"expected a size such as 10M, got {_brief(value)}")
    unit = match.group(2)
    return int(match.group(1)) * (KiB ** (" KMGT".index(unit) if unit else 0))


def _size(minimum: int) -> Converter:
    """A size in bytes not below ``minimum``."""

    def convert(value: object, ctx: _Context) -> int:
        size = _parse_size(value)
        if size > MAX_INTEGER:
            shown = _brief(value) if isinstance(value, str) else _clip(str(value))
            raise _Invalid(f"must be at most {MAX_INTEGER}, got {shown}")
        shown = _format_size(size) if size >= 0 else _clip(str(size))
        _check_minimum(size, minimum, shown, _format_size)
        return size

    return convert


_NUMBER = r"(\d+(?:\.\d+)?)"
_DURATION_RE = re.compile("".join(f"(?:{_NUMBER}{unit})?" for unit in "wdhms"))
_DURATION_UNITS = (WEEK, DAY, HOUR, MINUTE, 1.0)


def _parse_duration(value: object) -> float:
    """``90s``, ``5m``, ``1h``, ``9d``, ``1h30m``, ``2w`` or a bare number of seconds.

    A number too large for a float reads as an infinity of its sign; ``inf`` and
    ``nan`` written as TOML floats are mistakes.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Invalid(f"expected a finite duration, got {_got(value)}")
        return value
    if isinstance(value, str):
        text = "".join(value.split()).lower()
        if re.fullmatch(_NUMBER, text):
            return float(text)
        match = _DURATION_RE.fullmatch(text)
        if text and match is not None:
            return sum(
                float(count) * unit
                for count, unit in zip(match.groups(), _DURATION_UNITS, strict=True)
                if count is not None
            )
    raise _Invalid(f"expected a duration such as 90s, 5m, 1h30m or 9d, got {_brief(value)}")


def parse_duration(text: str) -> float:
    """Seconds of a duration such as ``2d`` or ``1h30m`` (for commands); ValueError if bad."""
    try:
        return _parse_duration(text)
    except _Invalid as error:
        raise ValueError(error.problem) from None


def _duration(minimum: float = 0.0) -> Converter:
    """A duration in seconds, greater than zero, not below ``minimum``, at most MAX_DURATION."""

    def convert(value: object, ctx: _Context) -> float:
        seconds = _parse_duration(value)
        if seconds > MAX_DURATION:
            raise _Invalid(f"must be at most {_format_duration(MAX_DURATION)}, got {_brief(value)}")
        if seconds <= 0:
            shown = _format_duration(seconds) if math.isfinite(seconds) else _brief(value)
            raise _Invalid(f"must be greater than zero, got {shown}")
        _check_minimum(seconds, minimum, _format_duration(seconds), _format_duration)
        return seconds

    return convert


def _boolean(value: object, ctx: _Context) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_got(value)}")
    return value


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected {what}, got {_got(value)}")
    if not value.strip():
        raise _Invalid(f"expected {what}, got an empty string")
    return value.strip()


def _path(value: object, ctx: _Context) -> Path:
    """A path; relative ones start from the config file's directory (or the cwd for options)."""
    text = _string(value, "a path")
    try:
        return Path(os.path.abspath(ctx.base / Path(text).expanduser()))
    except (RuntimeError, ValueError):  # ~user of an unknown user; a NUL character
        raise _Invalid(f"expected a path, got {_brief(text)}") from None


def _optional_file(value: object, ctx: _Context) -> Path | None:
    """An existing regular file, or ``""``/false for none."""
    if value is False or value == "":
        return None
    path = _path(value, ctx)
    try:
        found = path.is_file()
    except OSError as exc:  # a name too long, say
        raise _Invalid(f"cannot use {path}: {exc.strerror or exc}") from None
    if not found:
        raise _Invalid(f"no such file: {path}")
    return path


_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def _domain_name(value: object, what: str = "a domain name such as example.org") -> str:
    """A syntactically valid DNS name, lower-cased, without a trailing dot."""
    text = _string(value, what)
    name = text.lower().removesuffix(".")
    if not name.isascii():
        raise _Invalid(f"expected {what} (internationalised names in xn-- form), got {text!r}")
    if len(name) > 253 or _DOMAIN_RE.fullmatch(name) is None:
        raise _Invalid(f"expected {what}, got {text!r}")
    return name


def _is_fqdn_shaped(name: str) -> bool:
    labels = name.split(".")
    return len(labels) >= 2 and not labels[-1].isdigit()


def _hostname(value: object, ctx: _Context) -> str:
    """The name this node gives in greetings and Received: fields: a fully-qualified name."""
    what = "a fully-qualified host name such as mx.example.org"
    name = _domain_name(value, what)
    if not _is_fqdn_shaped(name):
        raise _Invalid(f"expected {what}, got {value!r}")
    return name


_NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,254}")


def _node_id(value: object, ctx: _Context) -> str:
    what = "a node name of letters, digits, '.', '_', ':' and '-'"
    text = _string(value, what)
    if _NODE_ID_RE.fullmatch(text) is None:
        raise _Invalid(f"expected {what}, got {text!r}")
    return text


def _database(value: object, ctx: _Context) -> str:
    what = "an SQLAlchemy database URL such as postgresql://mtrkmta@db.example.org/mtrkmta"
    text = _string(value, what)
    try:
        make_url(text)
    except ArgumentError:
        raise _Invalid(f"expected {what}, got {text!r}") from None
    return text


def _listener(value: object, ctx: _Context) -> str | None:
    """A Twisted server endpoint description, or ``"none"``/false to disable the listener."""
    what = "a server endpoint description such as tcp:2525:interface=127.0.0.1, or none"
    if value is False:
        return None
    text = _string(value, what)
    if text.lower() == "none":
        return None
    try:
        serverFromString(MemoryReactor(), text)
    except Exception as exc:  # Twisted's parsers raise anything from ValueError to TypeError.
        raise _Invalid(f"expected {what}, got {text!r} ({exc})") from None
    return text


def _domain_list(value: object, ctx: _Context) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise _Invalid(f"expected an array of domain names, got {_got(value)}")
    names: list[str] = []
    for index, item in enumerate(value):
        try:
            name = _domain_name(item)
        except _Invalid as exc:
            raise _Invalid(exc.problem, f"[{index}]") from None
        if name not in names:
            names.append(name)
    return tuple(names)


def _networks(value: object, ctx: _Context) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list | tuple):
        raise _Invalid(f"expected an array of networks such as 192.0.2.0/24, got {_got(value)}")
    networks: list[IPNetwork] = []
    for index, item in enumerate(value):
        what = "an IP network such as 192.0.2.0/24 or 2001:db8::/32"
        try:
            network = ipaddress.ip_network(_string(item, what).strip())
        except _Invalid as exc:
            raise _Invalid(exc.problem, f"[{index}]") from None
        except ValueError as exc:
            raise _Invalid(f"expected {what}, got {item!r} ({exc})", f"[{index}]") from None
        if network not in networks:
            networks.append(network)
    return tuple(networks)


@dataclass(frozen=True, slots=True)
class Route:
    """Where mail for ``domain`` goes: a domain, ``.domain`` for its subdomains, or ``*``.

    ``endpoint`` is a Twisted client endpoint description for ``lmtp`` and ``smtp``
    (a fixed next hop), and None for ``maildir`` and ``mx`` (MX lookup). ``tls`` is
    the STARTTLS policy toward the next hop (none, may, encrypt); None means
    ``delivery.tls``.
    """

    domain: str
    transport: Transport
    endpoint: str | None = None
    tls: str | None = None


DEFAULT_ROUTE = Route("*", "mx")

_ROUTE_TARGETS = "maildir, mx, lmtp:ENDPOINT or smtp:ENDPOINT"


def _route(domain: object, target: object) -> Route:
    """Check one ``DOMAIN = TARGET`` pair; TARGET may be ``{ target = ..., tls = ... }``.

    As a string, TARGET may end in ``;tls=POLICY``.
    """
    tls: str | None = None
    if isinstance(target, Mapping):
        if "target" not in target:
            raise _Invalid(
                f"expected {_ROUTE_TARGETS} or {{ target = ..., tls = ... }}, got a table "
                f"without 'target'; quote domain names that contain dots, "
                f'as in "example.org" = "mx"'
            )
        unknown = sorted(set(target) - {"target", "tls"})
        if unknown:
            raise _Invalid(
                f"a route table takes 'target' and 'tls', not {', '.join(map(repr, unknown))}"
            )
        if "tls" in target:
            tls = _choice(*TLS_POLICIES)(target["tls"], _Context(Path(".")))
        target = target["target"]
    elif isinstance(target, str) and ";tls=" in target:
        target, _, policy = target.rpartition(";tls=")
        tls = _choice(*TLS_POLICIES)(policy, _Context(Path(".")))
    route = _route_target(domain, target)
    return dataclasses.replace(route, tls=tls) if tls is not None else route


def _route_target(domain: object, target: object) -> Route:
    if domain == "*":
        name = "*"
    elif isinstance(domain, str) and domain.startswith("."):
        try:
            name = "." + _domain_name(domain[1:])
        except _Invalid:
            raise _Invalid(f"expected .DOMAIN such as .example.org, got {domain!r}") from None
    else:
        name = _domain_name(domain)
    if isinstance(target, Mapping):
        raise _Invalid(
            f"expected {_ROUTE_TARGETS}, got a table; quote domain names that contain dots, "
            f'as in "example.org" = "mx"'
        )
    text = _string(target, _ROUTE_TARGETS)
    transport, colon, endpoint = text.partition(":")
    transport = transport.lower()
    if transport in ("maildir", "mx") and not colon:
        return Route(name, cast(Transport, transport))
    if transport in ("lmtp", "smtp") and endpoint:
        try:
            clientFromString(MemoryReactor(), endpoint)
        except Exception as exc:  # Twisted's parsers raise anything from ValueError to TypeError.
            raise _Invalid(
                f"expected a client endpoint description such as tcp:host=127.0.0.1:port=2526 "
                f"or unix:path=/run/dovecot/lmtp after {transport}:, got {endpoint!r} ({exc})"
            ) from None
        return Route(name, cast(Transport, transport), endpoint)
    raise _Invalid(f"expected {_ROUTE_TARGETS}, got {text!r}")


def _routes(value: object, ctx: _Context) -> tuple[Route, ...]:
    """The ``[routes]`` table: ``"domain" = "target"`` pairs."""
    if not isinstance(value, Mapping):
        raise _Invalid(f"expected a table of domain = target, got {_got(value)}")
    routes = []
    for domain, target in value.items():
        try:
            routes.append(_route(domain, target))
        except _Invalid as exc:
            raise _Invalid(exc.problem, "." + _toml_key(domain)) from None
    return tuple(routes)


def _route_option(value: object, ctx: _Context) -> tuple[Route, ...]:
    """One ``--route DOMAIN=TARGET``, split at the first ``=``."""
    text = _string(value, "DOMAIN=TARGET")
    domain, equals, target = text.partition("=")
    if not equals:
        raise _Invalid(f"expected DOMAIN=TARGET such as example.org=mx, got {text!r}")
    try:
        return (_route(domain.strip(), target.strip()),)
    except _Invalid as exc:
        raise _Invalid(f"{text!r}: {exc.problem}") from None


def _merge_routes(*layers: tuple[Route, ...]) -> tuple[Route, ...]:
    """Later layers replace earlier routes of the same domain; ``*`` goes last, mx if absent."""
    by_domain: dict[str, Route] = {}
    for layer in layers:
        for route in layer:
            by_domain[route.domain] = route
    default = by_domain.pop("*", DEFAULT_ROUTE)
    return (*by_domain.values(), default)


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else '"' + name + '"'


# ---------------------------------------------------------------------------
# The configuration object. Adding a key: one ``_setting`` line here, plus its
# entry in doc/configuration.rst and doc/examples/mtrkmta.toml.


def select_route(routes: Sequence[Route], local_domains: Collection[str], domain: str) -> Route:
    """The route for ``domain``.

    In order: its own route; maildir if it is local; the route of the nearest
    ``.parent`` pattern it falls under; the ``*`` route (``mx`` when there is none).
    """
    name = domain.lower().removesuffix(".")
    by_domain = {route.domain: route for route in routes}
    if name in by_domain:
        return by_domain[name]
    if name in local_domains:
        return Route(name, "maildir")
    labels = name.split(".")
    for start in range(1, len(labels)):
        parent = "." + ".".join(labels[start:])
        if parent in by_domain:
            return by_domain[parent]
    return by_domain.get("*", DEFAULT_ROUTE)


@dataclass(frozen=True, slots=True)
class Listeners:
    """Server endpoint descriptions of the listeners; None disables one."""

    smtp: str | None = field(default="tcp:2525:interface=127.0.0.1", metadata=_key(_listener))
    submission: str | None = field(default=None, metadata=_key(_listener))
    lmtp: str | None = field(default="tcp:2424:interface=127.0.0.1", metadata=_key(_listener))
    mtqp: str | None = field(default="tcp:1038:interface=127.0.0.1", metadata=_key(_listener))


@dataclass(frozen=True, slots=True)
class Relay:
    """Who may relay to any domain without authenticating."""

    trusted_networks: tuple[IPNetwork, ...] = field(default=(), metadata=_key(_networks))


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits; sizes in bytes, times in seconds."""

    message_size: int = field(default=35 * MiB, metadata=_key(_size(1)))
    recipients: int = field(default=1000, metadata=_key(_integer(1)))
    command_line: int = field(default=2048, metadata=_key(_integer(512)))
    idle_timeout: float = field(default=300.0, metadata=_key(_duration()))
    data_timeout: float = field(default=180.0, metadata=_key(_duration()))
    data_min_rate: int = field(default=500, metadata=_key(_integer(0)))
    session_time: float = field(default=HOUR, metadata=_key(_duration()))
    bare_line_ends: str = field(default="normalize", metadata=_key(_choice("normalize", "reject")))
    data_buffer: int = field(default=256 * KiB, metadata=_key(_size(4 * KiB)))
    max_connections: int = field(default=1000, metadata=_key(_integer(1)))
    max_connections_per_ip: int = field(default=50, metadata=_key(_integer(1)))
    min_free_space: int = field(default=100 * MiB, metadata=_key(_size(0)))
    max_received_headers: int = field(default=100, metadata=_key(_integer(1)))
    # RFC 5321 §4.5.3.1: the sizes a server must take at least, in octets.
    local_part_length: int = field(default=64, metadata=_key(_integer(64)))
    domain_length: int = field(default=255, metadata=_key(_integer(255)))
    path_length: int = field(default=256, metadata=_key(_integer(256)))
    helo_length: int = field(default=255, metadata=_key(_integer(255)))


@dataclass(frozen=True, slots=True)
class TLS:
    """Certificate chain and private key (PEM) for STARTTLS; both or neither."""

    certificate: Path | None = field(default=None, metadata=_key(_optional_file))
    private_key: Path | None = field(default=None, metadata=_key(_optional_file))

    @property
    def enabled(self) -> bool:
        """True when STARTTLS can be offered."""
        return self.certificate is not None


@dataclass(frozen=True, slots=True)
class Auth:
    """SMTP AUTH: the users file, and the limits that make guessing passwords slow."""

    users_file: Path | None = field(default=None, metadata=_key(_optional_file))
    max_failures: int = field(default=3, metadata=_key(_integer(1)))
    max_address_failures: int = field(default=10, metadata=_key(_integer(1)))
    failure_window: float = field(default=15 * MINUTE, metadata=_key(_duration(1.0)))
    failure_delay: float = field(default=1.0, metadata=_key(_duration()))
    max_failure_delay: float = field(default=30.0, metadata=_key(_duration()))
    threads: int = field(default=2, metadata=_key(_integer(1)))
    max_pending: int = field(default=16, metadata=_key(_integer(1)))


def _delimiter(value: object, ctx: _Context) -> str:
    """One character that separates a local part from its ``+detail``, or ``""`` for none."""
    if not isinstance(value, str) or len(value) > 1 or (value in '@"\\ ' and value):
        raise _Invalid(
            f"expected one character such as + or -, or an empty string, got {_got(value)}"
        )
    return value


def _mailbox_template(value: object, ctx: _Context) -> str:
    """A mailbox path under the mail directory, with {local} and optionally {domain}."""
    text = _string(value, "a template such as {local} or {domain}/{local}")
    problem = f"only {{local}} and {{domain}} may be used, got {_brief(text)}"
    # Only the bare names: "{local.foo}" or "{local[0]}" would reach into the string
    # object, and a conversion or format spec could fail on some local part.
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError:
        raise _Invalid(problem) from None
    for _, name, spec, conversion in fields:
        if name is not None and (name not in ("local", "domain") or spec or conversion):
            raise _Invalid(problem)
    if "{local}" not in text or text.startswith("/") or ".." in text.split("/"):
        raise _Invalid(f"expected a relative path containing {{local}}, got {text!r}")
    return text


def _local_parts(value: object, ctx: _Context) -> tuple[str, ...]:
    """A list of local parts (user names), compared without regard to case."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise _Invalid(f"expected a list of user names, got {_got(value)}")
    return tuple(v.lower() for v in value)


@dataclass(frozen=True, slots=True)
class Local:
    """Local delivery: mailboxes, users, aliases and lists."""

    aliases: Path | None = field(default=None, metadata=_key(_optional_file))
    recipient_delimiter: str = field(default="+", metadata=_key(_delimiter))
    mailbox: str = field(default="{local}", metadata=_key(_mailbox_template))
    users: tuple[str, ...] = field(default=(), metadata=_key(_local_parts))


@dataclass(frozen=True, slots=True)
class Tracking:
    """Message tracking (RFC 3885-3888): how long tracking records are kept."""

    default_retention: float = field(
        default=DEFAULT_RETENTION, metadata=_key(_duration(MIN_RETENTION))
    )
    max_retention: float = field(default=MAX_RETENTION, metadata=_key(_duration(MIN_RETENTION)))
    lenient_xtext: bool = field(default=False, metadata=_key(_boolean))
    purge_interval: float = field(default=HOUR, metadata=_key(_duration(MINUTE)))
    max_tracked_per_hour: int = field(default=10000, metadata=_key(_integer(0)))


# --- [mtqp] section: the MTQP tracking server (RFC 3887), mtrkmta.mtqp.server ---------
@dataclass(frozen=True, slots=True)
class Mtqp:
    """The MTQP server on ``listeners.mtqp``: TLS policy, idle timeout, per-address limits."""

    tls_required: bool = field(default=False, metadata=_key(_boolean))
    idle_timeout: float = field(default=10 * MINUTE, metadata=_key(_duration(10 * MINUTE)))
    session_time: float = field(default=HOUR, metadata=_key(_duration()))
    track_rate: int = field(default=60, metadata=_key(_integer(0)))
    failure_rate: int = field(default=10, metadata=_key(_integer(0)))


# --- end of the [mtqp] section ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Queue:
    """Retry schedule of the outgoing queue."""

    first_retry: float = field(default=5 * MINUTE, metadata=_key(_duration()))
    max_retry_interval: float = field(default=HOUR, metadata=_key(_duration()))
    max_lifetime: float = field(default=5 * DAY, metadata=_key(_duration()))
    delay_warning: float = field(default=4 * HOUR, metadata=_key(_duration()))


@dataclass(frozen=True, slots=True)
class Delivery:
    """How mail leaves: the SMTP port of MX hosts, TLS policy, concurrency, batching."""

    smtp_port: int = field(default=25, metadata=_key(_integer(1, 65535)))
    tls: str = field(default="may", metadata=_key(_choice(*TLS_POLICIES)))
    destination_concurrency: int = field(default=20, metadata=_key(_integer(1)))
    max_recipients: int = field(default=50, metadata=_key(_integer(1)))


@dataclass(frozen=True, slots=True)
class Durability:
    """Crash safety; turning fsync off is for tests only."""

    fsync: bool = field(default=True, metadata=_key(_boolean))


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration of one mtrkmta node."""

    hostname: str = field(metadata=_key(_hostname, "server.hostname"))
    data_dir: Path = field(metadata=_key(_path, "server.data_dir"))
    database: str = field(metadata=_key(_database, "server.database"))
    node_id: str = field(metadata=_key(_node_id, "server.node_id"))
    workers: int = field(default=1, metadata=_key(_integer(1), "server.workers"))
    listeners: Listeners = field(default_factory=Listeners, metadata=_section("listeners"))
    local_domains: tuple[str, ...] = field(
        default=("localhost",), metadata=_key(_domain_list, "domains.local")
    )
    routes: tuple[Route, ...] = field(default=(DEFAULT_ROUTE,), metadata=_key(_routes, "routes"))
    relay: Relay = field(default_factory=Relay, metadata=_section("relay"))
    limits: Limits = field(default_factory=Limits, metadata=_section("limits"))
    tls: TLS = field(default_factory=TLS, metadata=_section("tls"))
    auth: Auth = field(default_factory=Auth, metadata=_section("auth"))
    tracking: Tracking = field(default_factory=Tracking, metadata=_section("tracking"))
    mtqp: Mtqp = field(default_factory=Mtqp, metadata=_section("mtqp"))  # [mtqp] section
    queue: Queue = field(default_factory=Queue, metadata=_section("queue"))
    delivery: Delivery = field(default_factory=Delivery, metadata=_section("delivery"))
    local: Local = field(default_factory=Local, metadata=_section("local"))
    durability: Durability = field(default_factory=Durability, metadata=_section("durability"))

    def is_local(self, domain: str) -> bool:
        """Whether this node is the final destination for ``domain``."""
        return domain.lower().removesuffix(".") in self.local_domains

    def route_for(self, domain: str) -> Route:
        """The route for ``domain`` (see :func:`select_route`)."""
        return select_route(self.routes, self.local_domains, domain)


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


def _schema() -> tuple[_Key, ...]:
    keys: list[_Key] = []
    for outer in dataclasses.fields(Config):
        if _SECTION in outer.metadata:
            section = outer.metadata[_SECTION]
            for inner in dataclasses.fields(outer.default_factory):
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
    for name in ("smtp", "submission", "lmtp", "mtqp"):
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

    default = values["tracking.default_retention"].value
    longest = values["tracking.max_retention"].value
    if default > longest:
        raise fail(
            "tracking.default_retention",
            f"must not exceed tracking.max_retention ({_format_duration(longest)}), "
            f"got {_format_duration(default)}",
        )

    first = values["queue.first_retry"].value
    interval = values["queue.max_retry_interval"].value
    if first > interval:
        raise fail(
            "queue.first_retry",
            f"must not exceed queue.max_retry_interval ({_format_duration(interval)}), "
            f"got {_format_duration(first)}",
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
            top[outer.name] = outer.default_factory(**sections.get(outer.name, {}))
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
