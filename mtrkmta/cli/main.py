"""The `mtrkmta` command: its subcommands, and what happens on a closed pipe or Ctrl-C."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from twisted.python import usage

from mtrkmta.cli.conventions import VERSION, CommandOptions, parse, usage_error
from mtrkmta.config import EXIT_CONFIG_ERROR, Config, check_config_file, load_config

#: Exit status after Ctrl-C (SIGINT): 128 + 2, as a shell reports a command the signal ended.
EXIT_INTERRUPTED = 130
#: Exit status when standard output was closed early (``mtrkmta queue list | head -1``):
#: 128 + 13, what a shell reports for a command that SIGPIPE ended, as ``cat`` would be.
EXIT_BROKEN_PIPE = 141

USAGE = """\
usage: mtrkmta COMMAND [options]

commands:
  serve [options]          run the MTA in the foreground (same options as `twistd -n mtrkmta`)
  check-config FILE        validate a configuration file: exit 0 when valid, 2 when not
  show-config [--config FILE] [-d | -n] [KEY...]
                           print the effective configuration (-d: the defaults,
                           -n: only what differs from them), as TOML
  example-config           print the commented example configuration file
  example-unit             print the systemd unit (mtrkmta.service)
  db upgrade [options]     create or migrate the tracking database to the current schema
                           (options: --config FILE, --database URL, --data-dir DIR)
  db recover [options] [--force]
                           move a damaged SQLite tracking database aside and rebuild it
                           from the spool (same options; the server must be stopped)
  queue [--config FILE | --data-dir DIR] [--json] [--yes] COMMAND
                           list | show ID | flush [ID] | hold ID | release ID |
                           delete ID | bounce ID  (talks to the running server)
  send --server HOST[:PORT] --from ADDR --to ADDR [options] [FILE]
                           submit a message with tracking (MTRK); print its mtqp:// URI
  sent [--secrets FILE] [--json] [-n N]
                           list the messages sent, newest first (for `track --pick N`)
  track mtqp://HOST[:PORT]/track/ENVID/SECRET | --server HOST ENVID SECRET | --last
      | --pick N           ask where a message is, hop by hop (MTQP, RFC 3887)
  tracking [--config FILE | --data-dir DIR] set-max-retention DURATION
                           lower the tracking retention cap, for existing records too
  passwd [--users-file FILE | --config FILE] [--scheme S] [--stdin] USER
                           set USER's password in the users file (auth.users_file)
"""
HELP_END = """
Every command takes --help (what it does and its options) and --version; options may
come before or after its other arguments. Exit status: 0 done, 1 failed, 2 usage or
configuration error, 130 interrupted (Ctrl-C), 141 output closed early (| head).
See doc/running.rst, "Command line".
"""


def serve(args: Sequence[str]) -> int:
    """Run the same service as the twistd plugin, in the foreground."""
    from mtrkmta.cli.options import ServeOptions
    from mtrkmta.cli.twistd import run

    status = parse(ServeOptions(), args)  # --help, --version and usage errors, as elsewhere
    if status is not None:
        return status
    run(args)  # logging as the [logging] settings say
    return 0


class CheckConfigOptions(CommandOptions):
    program = "mtrkmta check-config"
    synopsis = "FILE"
    longdesc = (
        "Load FILE as start-up does, then every file it names (aliases, users, TLS "
        "certificate and key), creating nothing and binding no port. Exit status: 0 when "
        "the configuration is valid, 2 when not."
    )

    def parseArgs(self, *paths: str) -> None:
        if len(paths) != 1:
            raise usage.UsageError("give one configuration FILE")
        self["file"] = paths[0]


def check_config(args: Sequence[str]) -> int:
    options = CheckConfigOptions()
    status = parse(options, args)
    if status is not None:
        return status
    file = options["file"]
    error = check_config_file(Path(file))
    if error is not None:
        print(f"mtrkmta: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    problem = dry_run(load_config(Path(file)))
    if problem is not None:
        print(f"mtrkmta: {file}: {problem}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(f"{file}: configuration is valid")
    return 0


def dry_run(config: Config) -> str | None:
    """Load every file start-up loads, as start-up does, without writing or binding:
    the first problem as one line, or None."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from mtrkmta.auth import PasswordFileError, parse_users
    from mtrkmta.routing.aliases import AliasBook, AliasError
    from mtrkmta.tls import TLSFileError, load_pair

    try:
        make_url(config.database).get_dialect()
    except (ArgumentError, NoSuchModuleError) as error:
        return f"server.database {config.database!r}: {error}; check the URL's scheme"
    aliases = config.local.aliases
    if aliases is not None:
        try:
            AliasBook.parse(aliases.read_text("utf-8"), f"local.aliases {aliases}")
        except AliasError as error:
            return str(error)
        except (OSError, UnicodeDecodeError) as error:
            return f"local.aliases {aliases}: {error}"
    tls = config.tls
    if tls.certificate is not None and tls.private_key is not None:
        try:
            load_pair(tls.certificate, tls.private_key)
        except TLSFileError as error:
            return str(error)
    users = config.auth.users_file
    if users is not None:
        try:
            parse_users(users.read_text("utf-8"), f"auth.users_file {users}")
        except PasswordFileError as error:
            return str(error)
        except (OSError, UnicodeDecodeError) as error:
            return f"auth.users_file {users}: {error}"
    return None


def show_config(args: Sequence[str]) -> int:
    from mtrkmta.cli.showconfig import main as show_config_main

    return show_config_main(args)


def example_config(args: Sequence[str]) -> int:
    from mtrkmta.cli.examples import example_main

    return example_main(args)


def example_unit(args: Sequence[str]) -> int:  # the systemd unit
    from mtrkmta.cli.examples import unit_main

    return unit_main(args)


def db(args: Sequence[str]) -> int:
    from mtrkmta.cli.db import main as db_main

    return db_main(args)


def queue(args: Sequence[str]) -> int:
    from mtrkmta.cli.queue import main as queue_main

    return queue_main(args)


def tracking(args: Sequence[str]) -> int:
    from mtrkmta.cli.tracking import main as tracking_main

    return tracking_main(args)


def send(args: Sequence[str]) -> int:  # `mtrkmta send` (message tracking)
    from mtrkmta.cli.send import main as send_main

    return send_main(args)


def sent(args: Sequence[str]) -> int:  # `mtrkmta sent` (the messages `send` recorded)
    from mtrkmta.cli.sent import main as sent_main

    return sent_main(args)


def track(args: Sequence[str]) -> int:  # `mtrkmta track` (message tracking)
    from mtrkmta.cli.track import main as track_main

    return track_main(args)


def passwd(args: Sequence[str]) -> int:  # `mtrkmta passwd USER` (the users file)
    from mtrkmta.cli.passwd import main as passwd_main

    return passwd_main(args)


COMMANDS = {
    "serve": serve,
    "check-config": check_config,
    "show-config": show_config,
    "example-config": example_config,
    "example-unit": example_unit,
    "db": db,
    "queue": queue,
    "tracking": tracking,
    "send": send,
    "sent": sent,
    "track": track,
    "passwd": passwd,
}


def run(args: Sequence[str]) -> int:
    """Run the command ``args`` names; its exit status."""
    if not args:
        return usage_error("mtrkmta", f"no command given ({', '.join(COMMANDS)})", sys.stderr)
    name = args[0]
    if name == "help" and len(args) > 1:  # `mtrkmta help queue` is `mtrkmta queue --help`
        return run([args[1], "--help"])
    if name in ("-h", "--help", "help"):
        print(USAGE + HELP_END, end="")
        return 0
    if name in ("-V", "--version"):
        print(VERSION)
        return 0
    command = COMMANDS.get(name)
    if command is None:
        what = "option" if name.startswith("-") else "command"
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return usage_error("mtrkmta", f"unknown {what} {name!r}{hint}", sys.stderr)
    return command(args[1:])


def main(argv: Sequence[str] | None = None) -> int:
    """``mtrkmta ARGS``; the exit status. A closed standard output (``| head -1``) and
    Ctrl-C end the command quietly, without a traceback, once and for all commands here."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        status = run(args)
        sys.stdout.flush()  # a closed pipe shows here if it did not while printing
    except BrokenPipeError:
        # As the Python documentation recommends (library/signal, "Note on SIGPIPE"):
        # point standard output at /dev/null so that the flush at exit fails no more.
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return status


def _discard_stdout() -> None:
    try:
        fileno = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (tests capture it)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fileno)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
