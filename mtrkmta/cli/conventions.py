"""What every `mtrkmta` command shares: --version, --help, options anywhere, usage errors."""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Collection, Sequence
from typing import TextIO

from twisted.python import usage

import mtrkmta
from mtrkmta.config import EXIT_CONFIG_ERROR

#: The version every command's ``--version`` prints; ``mtrkmta.__version__`` is the one
#: source (pyproject.toml reads it too).
VERSION = f"mtrkmta {mtrkmta.__version__}"
#: Exit status of a usage error (an unknown option, a missing argument): that of a
#: configuration error, as for ``check-config``.
EXIT_USAGE = EXIT_CONFIG_ERROR

_UNKNOWN = re.compile(r"option (-{1,2})(\S+) not recognized")
_NEEDS_VALUE = re.compile(r"option (-{1,2}\S+) requires argument")
_NOT_UNIQUE = re.compile(r"option --(\S+) not a unique prefix")
_NO_VALUE = re.compile(r"option (--\S+) must not have an argument")


def options_first(options: usage.Options, args: Sequence[str]) -> list[str]:
    """``args`` with every option (and its value) moved before the operands, so that
    ``mtrkmta queue list --json`` works as ``mtrkmta queue --json list`` does:
    twisted.python.usage stops at the first operand. An unknown option is moved too,
    so that it is refused as an option; ``--`` ends the options. UsageError when the
    last argument is an option that wants a value."""
    takes = {name.rstrip("="): name.endswith("=") for name in options.longOpt}
    short_parameters = set(re.findall(r"(\w):", options.shortOpt))
    front: list[str] = []
    operands: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":  # getopt drops it: what follows is operands, whatever it looks like
            return [*front, "--", *operands, *args[index + 1 :]]
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            index += 1
            continue
        if arg.startswith("--"):
            name = None if "=" in arg else _long_name(arg[2:], takes)
            takes_value = name is not None and takes[name]
        else:
            takes_value = len(arg) == 2 and arg[1] in short_parameters
        if takes_value and index + 1 < len(args):
            front += [arg, args[index + 1]]
            index += 2
        elif takes_value:  # getopt would take an operand (`list --config`) for its value
            raise usage.UsageError(f"option {arg} requires argument")
        else:
            front.append(arg)
            index += 1
    return front + operands


def _long_name(prefix: str, names: Collection[str]) -> str | None:
    """The option ``prefix`` abbreviates (getopt takes unique prefixes), or None."""
    if prefix in names:
        return prefix
    found = [name for name in names if name.startswith(prefix)]
    return found[0] if len(found) == 1 else None


class CommandOptions(usage.Options):
    """The options of one `mtrkmta` command, with the conventions of them all.

    ``program`` is the command as users type it (``mtrkmta queue``); ``commands``
    lists its subcommands, one ``(synopsis, description)`` each, for ``--help``.
    """

    program = "mtrkmta"
    commands: tuple[tuple[str, str], ...] = ()

    def __init__(self) -> None:
        super().__init__()
        # The help of an opt_ method is its docstring: one line however it is wrapped.
        self.docs = {name: text and " ".join(text.split()) for name, text in self.docs.items()}

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        args = sys.argv[1:] if options is None else options
        super().parseOptions(options_first(self, args))

    def getSynopsis(self) -> str:
        if self.parent is not None:  # under twistd: `twistd [options] mtrkmta ...`
            return super().getSynopsis()
        synopsis = getattr(self, "synopsis", "[options]")
        return f"Usage: {self.program} {synopsis}".rstrip()

    def getUsage(self, width: int | None = None) -> str:
        text = super().getUsage(width)
        if not self.commands:
            return text
        column = max(len(synopsis) for synopsis, _ in self.commands) + 4
        lines = [f"  {synopsis:<{column - 2}}{about}" for synopsis, about in self.commands]
        return text + "\nCommands:\n" + "\n".join(lines) + "\n"

    def opt_version(self) -> None:
        """Print the version of mtrkmta and exit."""
        print(VERSION)
        raise SystemExit(0)

    def opt_help(self) -> None:
        """Print this help and exit."""
        print(self)
        raise SystemExit(0)


def problem_of(options: usage.Options, error: usage.UsageError) -> str:
    """The usage error as one line, with the option meant when one was mistyped."""
    text = str(error)
    unknown = _UNKNOWN.fullmatch(text)
    if unknown:
        dashes, name = unknown.groups()
        if dashes == "-":
            return f"unknown option -{name}"
        known = sorted(name.rstrip("=") for name in options.longOpt)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        return f"unknown option --{name}{hint}"
    needs = _NEEDS_VALUE.fullmatch(text)
    if needs:
        return f"option {needs.group(1)} needs a value"
    ambiguous = _NOT_UNIQUE.fullmatch(text)
    if ambiguous:
        prefix = ambiguous.group(1)
        names = sorted(name.rstrip("=") for name in options.longOpt if name.startswith(prefix))
        return f"option --{prefix} is ambiguous: --{', --'.join(names)}"
    no_value = _NO_VALUE.fullmatch(text)
    if no_value:
        return f"option {no_value.group(1)} takes no value"
    if text == "Wrong number of arguments.":
        return "wrong number of arguments"
    return text


def usage_error(program: str, problem: str, err: TextIO, status: int = EXIT_USAGE) -> int:
    """Print a usage error as two lines, the problem and where help is; the exit status
    (``status``: a command whose 2 means something else passes its own)."""
    print(f"{program}: {problem}\nTry '{program} --help'.", file=err)
    return status


def parse(
    options: CommandOptions,
    args: Sequence[str],
    err: TextIO | None = None,
    status: int = EXIT_USAGE,
) -> int | None:
    """Parse ``args`` into ``options``: None when the command is to go on, else its exit
    status (0 after --help or --version, ``status`` after a usage error, printed on
    ``err``)."""
    err = sys.stderr if err is None else err
    try:
        options.parseOptions(args)
    except usage.UsageError as error:
        return usage_error(options.program, problem_of(options, error), err, status)
    except SystemExit as done:  # --help, --version
        return done.code if isinstance(done.code, int) else 0
    return None
