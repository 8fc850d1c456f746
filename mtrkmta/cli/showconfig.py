"""`mtrkmta show-config`: the effective settings, as postconf shows them."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from typing import TextIO

from twisted.python import usage

from mtrkmta.cli.conventions import parse, usage_error
from mtrkmta.cli.options import ServeOptions
from mtrkmta.config import EXIT_CONFIG_ERROR, ConfigError, load_config, setting_names
from mtrkmta.config.show import differing, render


class ShowConfigOptions(ServeOptions):
    """The server's options (the settings they override show as set), and -d, -n."""

    program = "mtrkmta show-config"
    synopsis = "[--config FILE] [options] [-d | -n] [KEY...]"
    longdesc = (
        "Print the configuration `mtrkmta serve` would run with, the same options given, "
        "as TOML: one `section.key = value` line per setting, in the order of "
        "doc/configuration.rst. KEY (a setting such as limits.message_size, or a section "
        "such as limits) limits the output to those settings. The output of -n, saved as "
        "a file, configures the same node."
    )
    optFlags = (
        ("defaults", "d", "Print the default values, whatever the file and options say."),
        ("non-default", "n", "Print only the settings whose value is not the default."),
    )

    def parseArgs(self, *keys: str) -> None:
        self["keys"] = keys

    def postOptions(self) -> None:
        if self["defaults"] and self["non-default"]:
            raise usage.UsageError("-d and -n exclude each other")


def selected(keys: Sequence[str]) -> list[str] | str:
    """The settings ``keys`` name, in schema order (all without keys); or the problem."""
    names = setting_names()
    if not keys:
        return list(names)
    sections = {name.partition(".")[0] for name in names}
    for key in keys:
        if key not in names and key not in sections:
            close = difflib.get_close_matches(key, [*names, *sections], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return f"unknown setting {key!r}{hint}"
    return [n for n in names if n in keys or n.partition(".")[0] in keys]


def main(args: Sequence[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``mtrkmta show-config ARGS``: 0, or 2 for a usage or configuration error."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    options = ShowConfigOptions()
    status = parse(options, args, err)
    if status is not None:
        return status
    names = selected(options["keys"])
    if isinstance(names, str):
        return usage_error(options.program, names, err)
    try:
        # The defaults only when asked for: they need a valid name for this machine.
        config = load_config() if options["defaults"] else options.load_config()
        if options["non-default"]:
            names = [name for name in differing(config, load_config()) if name in names]
    except ConfigError as error:
        print(f"mtrkmta: {error}", file=err)
        return EXIT_CONFIG_ERROR
    for line in render(config, names):
        print(line, file=out)
    return 0
