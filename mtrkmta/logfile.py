"""The text log observer `mtrkmta serve` gives twistd: its format, one time stamp per second."""

from __future__ import annotations

import sys
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


def text_observer(out: TextIO, process: str | None = None) -> FileLogObserver:
    """Lines as twistd writes them by default (time stamp, [system], text), to ``out``.

    ``process`` (a worker's name) goes first in the [system] part of every line.
    """
    stamps = SecondStamps()
    if process is None:
        return FileLogObserver(out, lambda event: formatEventAsClassicLogText(event, stamps))

    def format_event(event: LogEvent) -> str | None:
        if "log_system" not in event:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
            event = {**event, "log_system": f"{process} {system}"}
        return formatEventAsClassicLogText(event, stamps)

    return FileLogObserver(out, format_event)


def observer(process: str | None = None) -> FileLogObserver:
    """``twistd --logger=mtrkmta.logfile.observer``: the text log on standard output."""
    return text_observer(sys.stdout, process)
