"""Units, the configuration error, and the converters that check each raw value."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from twisted.internet.endpoints import serverFromString

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

# The reactor handed to Twisted's endpoint parsers when a description is only checked:
# they store it for a later listen() or connect() and never use it while parsing. (Not a
# MemoryReactor: twisted.internet.testing brings trial, unittest and doctest into every
# process, about 1.8 MiB in all.)
PARSE_ONLY: Any = None


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


TLS_POLICIES = ("none", "may", "encrypt", "verify")

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
        serverFromString(PARSE_ONLY, text)
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
