"""``mtrkmta example-unit``: prints the systemd unit that ships with the package."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import resources
from typing import TextIO

from mtrkmta.cli.conventions import CommandOptions, parse

UNIT = "mtrkmta.service"


def unit() -> str:
    """The text of the systemd unit (doc/examples/systemd/mtrkmta.service is the same)."""
    return resources.files("mtrkmta.config").joinpath(UNIT).read_text(encoding="utf-8")


class ExampleUnitOptions(CommandOptions):
    program = "mtrkmta example-unit"
    synopsis = ""
    longdesc = (
        "Print the systemd unit for mtrkmta (Type=notify, SIGHUP reload, watchdog, "
        "hardening). Install it with: mtrkmta example-unit > /etc/systemd/system/mtrkmta.service"
    )


def main(args: Sequence[str], out: TextIO | None = None) -> int:
    """``mtrkmta example-unit``: the unit on standard output."""
    status = parse(ExampleUnitOptions(), args)
    if status is not None:
        return status
    (sys.stdout if out is None else out).write(unit())
    return 0
