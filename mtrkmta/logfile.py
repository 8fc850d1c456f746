"""The text log observer `mtrkmta serve` gives twistd: its format, made cheap to produce."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from twisted.logger import (
    FileLogObserver,
    LogEvent,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
)

# What some common line splitter takes for the end of a line (str.splitlines: LF, VT, FF,
# CR, FS, GS, RS, NEL, U+2028, U+2029) and every other C0 or C1 control and DEL.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# The same except LF and TAB, the line's own structure (a traceback's own lines and the
# format's own line breaks, each continued with a tab).
_UNSAFE_IN_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


# Twisted's informational chatter: a factory started or stopped (once per outbound
# connection), and the four lines of each DNS query's UDP port (twisted.names).
_CHATTER_FORMATS = ("Starting factory ", "Stopping factory ")
_CHATTER_TEXT = re.compile(
    r"(?:Starting|Stopping) protocol <twisted\.names\.|"
    r"DNSDatagramProtocol starting on \d+$|\(UDP Port \d+ Closed\)$"
)


def is_chatter(event: LogEvent) -> bool:
    """Whether ``event`` is Twisted's informational chatter, which the log leaves out:
    "Starting factory"/"Stopping factory" and a DNS query's UDP port opened and closed.
    Nothing at level warn or above is chatter."""
    fmt = event.get("log_format")
    if type(fmt) is not str or event.get("log_namespace", "").startswith("mtrkmta"):
        return False
    level = event.get("log_level")
    if level is not None and level >= LogLevel.warn:
        return False
    if fmt.startswith(_CHATTER_FORMATS):
        return True
    text = event.get("log_text")
    return fmt == "{log_text}" and type(text) is str and _CHATTER_TEXT.match(text) is not None


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every line break and control character written as ``\\x0b`` or
    ``\\u2028``, so that a value never ends or forges a log line."""
    return _UNSAFE.sub(_escape_char, text)


class _Escaped:
    """A logged value whose text, however it is formatted, comes out escaped."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def __format__(self, spec: str) -> str:
        return escape(format(self._value, spec))

    def __str__(self) -> str:
        return escape(str(self._value))

    def __repr__(self) -> str:
        return escape(repr(self._value))

    def __getattr__(self, name: str) -> _Escaped:
        return _Escaped(getattr(self._value, name))

    def __getitem__(self, key: Any) -> _Escaped:
        return _Escaped(self._value[key])

    def __call__(self) -> _Escaped:
        return _Escaped(self._value())


class _EscapedFields(Mapping[str, Any]):
    """An event's fields for ``str.format_map``, each value wrapped in :class:`_Escaped`."""

    def __init__(self, event: Mapping[str, Any]) -> None:
        self._event = event

    def __getitem__(self, key: str) -> _Escaped:
        return _Escaped(self._event[key])

    def __iter__(self) -> Any:
        return iter(self._event)

    def __len__(self) -> int:
        return len(self._event)


def _escaped_event(event: LogEvent) -> LogEvent:
    """A copy of ``event`` for Twisted's formatter whose values all come out escaped."""
    escaped: dict[str, Any] = {
        key: value if key.startswith("log_") else _Escaped(value) for key, value in event.items()
    }
    flattened = event.get("log_flattened")
    if isinstance(flattened, dict):
        escaped["log_flattened"] = {key: escape(str(value)) for key, value in flattened.items()}
    return escaped


class SecondStamps:
    """Twisted's default log time stamp, formatted once per second instead of per event.

    The default format (``%Y-%m-%dT%H:%M:%S%z``) has no sub-second part, so the
    stamp of every event within one second is the same text. Formatting it costs
    more than the rest of a log line (a time-zone lookup per event).
    """

    def __init__(self) -> None:
        self._cached: tuple[int, str] | None = None

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(when)
        second = int(when)
        cached = self._cached
        if cached is None or cached[0] != second:
            cached = self._cached = (second, formatTime(second))
        return cached[1]


def classic_line(event: LogEvent, stamps: Callable[[float | None], str]) -> str | None:
    """``formatEventAsClassicLogText(event, stamps)``, without Twisted's pure-Python
    formatter for the common case.

    An event with a plain format string (fields looked up by name, with the usual
    conversions and format specs) is formatted by ``str.format_map``, which is what
    Twisted's formatter amounts to for such a string. Anything else (a failure to
    render, the ``{f()}`` call syntax, a flattened or unformattable event) is left to
    Twisted, so the output is the same line either way.

    Every value put into the line is escaped (:func:`escape`): whatever a client
    managed to put into an address or a host name, one event is one line for every
    common line splitter (``str.splitlines()`` included), and its own further lines
    (a traceback's) begin with a tab. Text that is printable as it is (the common
    case) costs one ``str.isprintable()``.
    """
    text = None
    fmt = event.get("log_format")
    if type(fmt) is str and "log_failure" not in event and "log_flattened" not in event:
        try:
            text = fmt.format_map(event)
            if not text.isprintable():
                text = fmt.format_map(_EscapedFields(event))
        except Exception:
            text = None
    if not text:
        return _twisted_line(event, stamps)
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
    elif type(system) is not str:
        return _twisted_line(event, stamps)
    if not system.isprintable():
        system = escape(system)
    line = f"{stamps(event.get('log_time'))} [{system}] {text}"
    return line.replace("\n", "\n\t") + "\n"


def _twisted_line(event: LogEvent, stamps: Callable[[float | None], str]) -> str | None:
    """Twisted's own line for ``event``, with the event's values escaped; what is left
    (a traceback's lines, a report of an unformattable event) keeps only LF and TAB."""
    line = formatEventAsClassicLogText(_escaped_event(event), stamps)
    if line is None or line.isprintable():
        return line
    return _UNSAFE_IN_TEXT.sub(_escape_char, line)


def text_observer(out: TextIO, process: str | None = None) -> FileLogObserver:
    """Lines as twistd writes them by default (time stamp, [system], text), to ``out``,
    without Twisted's chatter (:func:`is_chatter`).

    ``process`` (a worker's name) goes first in the [system] part of every line.
    """
    stamps = SecondStamps()
    if process is None:
        return FileLogObserver(
            out, lambda event: None if is_chatter(event) else classic_line(event, stamps)
        )

    def format_event(event: LogEvent) -> str | None:
        if is_chatter(event):
            return None
        if "log_system" not in event:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
            event = {**event, "log_system": f"{process} {system}"}
        return classic_line(event, stamps)

    return FileLogObserver(out, format_event)


def observer(process: str | None = None) -> FileLogObserver:
    """``twistd --logger=mtrkmta.logfile.observer``: the text log on standard output."""
    return text_observer(sys.stdout, process)
