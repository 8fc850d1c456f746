"""The text log observer `mtrkmta serve` gives twistd: its format, made cheap to produce."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from twisted.logger import FileLogObserver, LogEvent, formatEventAsClassicLogText, formatTime


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
    """
    text = None
    fmt = event.get("log_format")
    if type(fmt) is str and "log_failure" not in event and "log_flattened" not in event:
        try:
            text = fmt.format_map(event)
        except Exception:
            text = None
    if not text:
        return formatEventAsClassicLogText(event, stamps)
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
    elif type(system) is not str:
        return formatEventAsClassicLogText(event, stamps)
    line = f"{stamps(event.get('log_time'))} [{system}] {text}"
    return line.replace("\n", "\n\t") + "\n"


def text_observer(out: TextIO, process: str | None = None) -> FileLogObserver:
    """Lines as twistd writes them by default (time stamp, [system], text), to ``out``.

    ``process`` (a worker's name) goes first in the [system] part of every line.
    """
    stamps = SecondStamps()
    if process is None:
        return FileLogObserver(out, lambda event: classic_line(event, stamps))

    def format_event(event: LogEvent) -> str | None:
        if "log_system" not in event:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
            event = {**event, "log_system": f"{process} {system}"}
        return classic_line(event, stamps)

    return FileLogObserver(out, format_event)


def observer(process: str | None = None) -> FileLogObserver:
    """``twistd --logger=mtrkmta.logfile.observer``: the text log on standard output."""
    return text_observer(sys.stdout, process)
