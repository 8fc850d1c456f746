"""``mtrkmta example-config`` and ``mtrkmta example-unit``: print a file the package ships."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import resources
from typing import TextIO

from mtrkmta.cli.conventions import CommandOptions, parse

EXAMPLE = "example.toml"  # in the mtrkmta.config package, as is the unit
UNIT = "mtrkmta.service"


def packaged(name: str) -> str:
    """The text of a file of the ``mtrkmta.config`` package (the wheel carries no doc/)."""
    return resources.files("mtrkmta.config").joinpath(name).read_text(encoding="utf-8")


def example() -> str:
    """The commented example configuration file."""
    return packaged(EXAMPLE)


def unit() -> str:
    """The systemd unit (doc/running.rst, "Running as a service", includes it)."""
    return packaged(UNIT)


class ExampleConfigOptions(CommandOptions):
    program = "mtrkmta example-config"
    synopsis = ""
    longdesc = (
        "Print the commented example configuration: every section and every key, each "
        "explained. Start a configuration with: mtrkmta example-config > /etc/mtrkmta/mtrkmta.toml"
    )


class ExampleUnitOptions(CommandOptions):
    program = "mtrkmta example-unit"
    synopsis = ""
    longdesc = (
        "Print the systemd unit for mtrkmta (Type=notify, SIGHUP reload, watchdog, "
        "hardening). Install it with: mtrkmta example-unit > /etc/systemd/system/mtrkmta.service"
    )


def _print(options: CommandOptions, name: str, args: Sequence[str], out: TextIO | None) -> int:
    status = parse(options, args)
    if status is not None:
        return status
    (sys.stdout if out is None else out).write(packaged(name))
    return 0


def example_main(args: Sequence[str], out: TextIO | None = None) -> int:
    """``mtrkmta example-config``: the example file on standard output."""
    return _print(ExampleConfigOptions(), EXAMPLE, args, out)


def unit_main(args: Sequence[str], out: TextIO | None = None) -> int:
    """``mtrkmta example-unit``: the unit on standard output."""
    return _print(ExampleUnitOptions(), UNIT, args, out)
