"""The log observers `mtrkmta serve` gives twistd: text lines, JSON lines, syslog."""

from __future__ import annotations

import json
import os
import re
import socket
import string
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO, cast

from twisted.internet.interfaces import IReactorCore, IReactorFromThreads, IReactorTime
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

from mtrkmta.config import Logging

# What some common line splitter takes for the end of a line (str.splitlines: LF, VT, FF,
# CR, FS, GS, RS, NEL, U+2028, U+2029) and every other C0 or C1 control and DEL.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# The same except LF and TAB, the line's own structure (a traceback's own lines and the
# format's own line breaks, each continued with a tab).
_UNSAFE_IN_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


# Twisted's informational chatter: a factory started or stopped (once per outbound
# connection), the four lines of each DNS query's UDP port (twisted.names), a listening
# port opened and closed, and the resolver reading resolv.conf.
_CHATTER_FORMATS = ("Starting factory ", "Stopping factory ")
_CHATTER_TEXT = re.compile(
    r"(?:Starting|Stopping) protocol <twisted\.names\.|"
    r"DNSDatagramProtocol starting on \d+$|\(UDP Port \d+ Closed\)$|"
    # A port opened and closed: the server's own "smtp listening on ..." line says it.
    r"\w+ starting on .+$|\((?:TCP|UNIX) Port .+ Closed\)$|"
    # twisted.names' resolver reading /etc/resolv.conf at start-up.
    r"\S+ changed, reparsing$|Resolver (?:added|removed) .+ (?:to|from) server list$"
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


def _system(event: LogEvent, process: str | None) -> str:
    """The [system] part of a line: the event's system, else ``namespace#level``, after
    ``process`` (a worker's name) when there is one."""
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
        if process is not None:
            system = f"{process} {system}"
    return escape(str(system))


# Names every JSON object has; a field of the format with one of these names is left out.
_RESERVED = frozenset({"time", "level", "system", "queue_id", "event", "text", "traceback"})
_FORMATTER = string.Formatter()
_FIELD_NAME = re.compile(r"[^.\[]+")


def _format_fields(fmt: str) -> list[str]:
    """The event fields ``fmt`` names (``{delay:.0f}`` -> ``delay``, ``{a.b}`` -> ``a``)."""
    names = []
    try:
        for _, name, _, _ in _FORMATTER.parse(fmt):
            found = _FIELD_NAME.match(name or "")
            if found and found.group() not in names:
                names.append(found.group())
    except ValueError:
        return []
    return names


def _json_value(value: Any) -> Any:
    """``value`` as JSON holds it: str, int, float, bool and None as they are, else text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def structured(event: LogEvent, process: str | None = None) -> dict[str, Any]:
    """The structured form of one event, which the JSON-lines log writes as it is:
    ``time`` (ISO 8601, UTC), ``level``, ``system`` (as in a text line), ``queue_id``
    (null when the line is about no one message), ``event`` (the event's name, such
    as ``delivery``, else its format string: the same for every line of one kind),
    ``text`` (the line's text, as the text log writes it after the [system] part),
    then every field that text names, and ``traceback`` for a failure."""
    when = event.get("log_time")
    level = event.get("log_level")
    fmt = event.get("log_format")
    record: dict[str, Any] = {
        "time": None
        if when is None
        else datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds"),
        "level": level.name if level is not None else None,
        "system": _system(event, process),
        "queue_id": _json_value(event.get("queue_id")),
        "event": _json_value(event.get("event", fmt)),
        "text": formatEvent(event),
    }
    if type(fmt) is str:
        for name in _format_fields(fmt):
            if name not in _RESERVED and not name.startswith("log_") and name in event:
                record[name] = _json_value(event[name])
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["traceback"] = failure.getTraceback()
    return record


def json_line(event: LogEvent, process: str | None = None) -> str:
    """One event as one line of JSON (ASCII only: no value can end or forge a line)."""
    return json.dumps(structured(event, process), ensure_ascii=True, default=str) + "\n"


def json_observer(out: TextIO, process: str | None = None) -> FileLogObserver:
    """The JSON-lines log (one object per event, see :func:`structured`) to ``out``,
    without Twisted's chatter."""
    return FileLogObserver(
        out, lambda event: None if is_chatter(event) else json_line(event, process)
    )


LOG_MAIL = 2
"""The syslog facility ``mail`` (RFC 5424 §6.2.1, table 1)."""

# RFC 5424 §6.2.1, table 2: the severity of each level.
_SEVERITY = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}


@implementer(ILogObserver)
class SyslogObserver:
    """Sends each event to the syslog daemon's unix datagram socket (``/dev/log``) as
    ``twistd --syslog`` does: ``[system] text``, each line of a traceback in its own
    message, under ``prefix`` (with the process id, as syslog(3) sends it) and the
    facility mail; JSON-lines format sends the JSON object instead. Twisted's chatter
    is left out. When the daemon is away, messages are dropped, as syslog(3) drops
    them, and the socket is opened again for the next one."""

    def __init__(
        self,
        path: Path,
        prefix: str,
        *,
        json_format: bool = False,
        process: str | None = None,
        facility: int = LOG_MAIL,
        pid: int | None = None,
    ) -> None:
        self.path = path
        self.prefix = prefix
        self.json_format = json_format
        self.process = process
        self.facility = facility
        self.pid = os.getpid() if pid is None else pid
        self._socket: socket.socket | None = None

    def __call__(self, event: LogEvent) -> None:
        if is_chatter(event):
            return
        level = event.get("log_level")
        priority = self.facility * 8 + _SEVERITY.get(level, 6)
        when = event.get("log_time")
        stamp = time.strftime("%b %e %H:%M:%S", time.localtime(when))
        head = f"<{priority}>{stamp} {self.prefix}[{self.pid}]: "
        if self.json_format:
            messages = [json_line(event, self.process).rstrip("\n")]
        else:
            if self.process is not None and "log_system" not in event:
                event = {**event, "log_system": _system(event, self.process)}
            line = classic_line(event, _no_stamp)
            if line is None:
                return
            text = line.split(" ", 1)[1]  # after the "-" of _no_stamp
            parts = (part.lstrip("\t") for part in text.split("\n"))
            messages = [part for part in parts if part.strip()]
        for message in messages:
            self._send((head + message).encode("utf-8", "replace"))

    def _send(self, datagram: bytes) -> None:
        for _ in range(2):
            try:
                if self._socket is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    try:
                        sock.connect(str(self.path))
                    except OSError:
                        sock.close()
                        raise
                    self._socket = sock
                self._socket.send(datagram)
                return
            except OSError:
                self.close()

    def close(self) -> None:
        """Close the socket (the next event opens it again)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _no_stamp(when: float | None) -> str:
    """The time stamp of a line sent to syslog: none (the daemon's message has its own)."""
    return "-"


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


BATCH_LIMIT = 65536
"""Characters of log lines a :class:`BatchedOutput` keeps before it writes them at once."""

ATOMIC_WRITE = 4096
"""Octets one write of a :class:`BatchedOutput` holds at most (whole lines; a longer
line alone): ``PIPE_BUF``, so that the lines of worker processes sharing the output
(a pipe) never interleave within a line, as with one write per line."""


class BatchedOutput:
    """The log observers' stream: the lines of one turn of the reactor in one write.

    Twisted's ``FileLogObserver`` writes and flushes every line: one ``write(2)`` per
    line, in the reactor thread, several per message. This stream keeps the lines
    and writes them with one write and one flush at the end of the reactor's turn
    (``callLater(0)``; from another thread ``callFromThread``). It writes at once
    when :data:`BATCH_LIMIT` characters wait, when the reactor is not running
    (start-up, shutdown, the last lines of the process) and when told to
    (:meth:`write_pending`, which the observers call for an event at level warn or
    above). A process killed outright (``SIGKILL``) loses at most the lines of the
    turn it was in; any other end of the process writes them.
    """

    def __init__(
        self,
        out: TextIO,
        reactor: Any,
        limit: int = BATCH_LIMIT,
        in_reactor_thread: Callable[[], bool] = isInIOThread,
    ) -> None:
        self._out = out
        self._reactor = reactor
        self._limit = limit
        self._in_reactor_thread = in_reactor_thread
        # Re-entrant: a signal handler may log while this thread holds it.
        self._lock = threading.RLock()
        self._writing = threading.Lock()  # held by the one caller writing
        self._lines: list[str] = []
        self._size = 0
        self._scheduled = False

    def write(self, text: str) -> None:
        with self._lock:
            self._lines.append(text)
            self._size += len(text)
            at_once = self._size >= self._limit or not IReactorCore(self._reactor).running
            schedule = not at_once and not self._scheduled
            if schedule:
                self._scheduled = True
        if at_once:
            self.write_pending()
        elif schedule:
            if self._in_reactor_thread():
                IReactorTime(self._reactor).callLater(0, self.write_pending)
            else:
                IReactorFromThreads(self._reactor).callFromThread(self.write_pending)

    def flush(self) -> None:
        """Nothing: ``FileLogObserver`` flushes after every line, the batch is flushed
        when written (:meth:`write_pending`)."""

    def write_pending(self) -> None:
        """Write every line kept so far, in as few writes of at most :data:`ATOMIC_WRITE`
        octets as whole lines allow, each flushed.

        One caller writes at a time and writes until nothing is left; a call meanwhile
        (another thread, or this one from a signal handler that logs while a write is
        under way, as Twisted's SIGTERM handler does) leaves its lines to that writer.
        No lock is held while writing, so a line logged during a write never waits."""
        while True:
            if not self._writing.acquire(blocking=False):
                return
            try:
                while True:
                    with self._lock:
                        lines, self._lines = self._lines, []
                        self._size = 0
                        self._scheduled = False
                    if not lines:
                        break
                    self._write_lines(lines)
            finally:
                self._writing.release()
            with self._lock:
                if not self._lines:  # else logged just before the release: go on
                    return

    def _write_lines(self, lines: list[str]) -> None:
        chunk: list[str] = []
        octets = 0
        for line in lines:
            size = len(line) if line.isascii() else len(line.encode("utf-8", "replace"))
            if chunk and octets + size > ATOMIC_WRITE:
                self._emit(chunk)
                chunk, octets = [], 0
            chunk.append(line)
            octets += size
        if chunk:
            self._emit(chunk)

    def _emit(self, lines: list[str]) -> None:
        self._out.write("".join(lines))
        self._out.flush()


@implementer(ILogObserver)
class _Batched:
    """An observer writing to a :class:`BatchedOutput`, whose lines go out at once for a
    warning or worse (what an operator must see even if the process dies next)."""

    def __init__(self, observer: ILogObserver, stream: BatchedOutput) -> None:
        self._observer = observer
        self._stream = stream

    def __call__(self, event: LogEvent) -> None:
        self._observer(event)
        level = event.get("log_level")
        if level is not None and level >= LogLevel.warn:
            self._stream.write_pending()


def observer(process: str | None = None) -> FileLogObserver:
    """``twistd --logger=mtrkmta.logfile.observer``: the text log on standard output."""
    return text_observer(sys.stdout, process)


def configured_observer(
    settings: Logging,
    process: str | None = None,
    out: TextIO | None = None,
    reactor: Any = None,
) -> ILogObserver:
    """The observer the ``[logging]`` settings ask for: syslog (``logging.syslog``), else
    standard output (or ``out``); text lines or JSON objects (``logging.format``).

    With ``reactor``, the lines of one reactor turn go out in one write
    (:class:`BatchedOutput`); without, each line is written when logged."""
    json_format = settings.format == "json"
    if settings.syslog:
        return SyslogObserver(
            settings.syslog_socket, settings.prefix, json_format=json_format, process=process
        )
    stream: TextIO = sys.stdout if out is None else out
    if reactor is None:
        return json_observer(stream, process) if json_format else text_observer(stream, process)
    batched = BatchedOutput(stream, reactor)
    # Lines of the reactor's last turns: written once it has stopped (see BatchedOutput).
    IReactorCore(reactor).addSystemEventTrigger("after", "shutdown", batched.write_pending)
    target = cast(TextIO, batched)
    made = json_observer(target, process) if json_format else text_observer(target, process)
    return _Batched(made, batched)
