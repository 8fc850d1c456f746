"""`mtrkmta tracking set-max-retention DURATION`: lower the tracking retention cap at runtime."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from twisted.python import usage

from mtrkmta.cli.queue import ControlOptions, control_socket, request_every_node
from mtrkmta.config import parse_duration
from mtrkmta.queue.control import ControlError


class TrackingOptions(ControlOptions):
    """The same server-locating options as ``mtrkmta queue``."""

    program = "mtrkmta tracking"
    synopsis = "[options] set-max-retention DURATION"
    longdesc = (
        "Act on the running server's message tracking (over its control socket). Exit "
        "status: 0 done, 1 refused or not reachable, 2 usage error."
    )
    commands = (
        (
            "set-max-retention DURATION",
            "lower the retention cap (e.g. 2d), for the records already kept too",
        ),
    )

    # As for QueueOptions.parseArgs: usage.Options checks the arguments against this signature.
    def parseArgs(self, command: str, value: str | None = None) -> None:  # type: ignore[override]
        if command != "set-max-retention" or value is None:
            raise usage.UsageError("expected: set-max-retention DURATION (e.g. 2d)")
        try:
            self["seconds"] = parse_duration(value)
        except ValueError as error:
            raise usage.UsageError(str(error)) from None
        self["command"] = command


def main(args: Sequence[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out  # the current ones, as main() may replace them
    err = sys.stderr if err is None else err
    options = TrackingOptions()
    path = control_socket(options, args, err)
    if isinstance(path, int):
        return path
    try:
        changed = request_every_node(path, "set-max-retention", seconds=options["seconds"])
    except ControlError as error:
        print(f"mtrkmta: {error}", file=err)
        return 1
    print(
        f"tracking retention capped at {options['seconds']:g}s; "
        f"{changed} record(s) now expire earlier",
        file=out,
    )
    return 0
