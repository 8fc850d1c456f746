"""The `mtrkmta` command: serve, check-config and db."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from mtrkmta.config import EXIT_CONFIG_ERROR, Config, check_config_file, load_config

USAGE = """\
usage: mtrkmta COMMAND [options]

commands:
  serve [options]          run the MTA in the foreground (same options as `twistd -n mtrkmta`)
  check-config FILE        validate a configuration file: exit 0 when valid, 2 when not
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
  track mtqp://HOST[:PORT]/track/ENVID/SECRET | --server HOST ENVID SECRET | --last
                           ask where a message is, hop by hop (MTQP, RFC 3887)
  tracking [--config FILE | --data-dir DIR] set-max-retention DURATION
                           lower the tracking retention cap, for existing records too
"""


def serve(args: Sequence[str]) -> int:
    """Run the same service as the twistd plugin, in the foreground."""
    from twisted.scripts.twistd import run

    sys.argv = [
        "mtrkmta serve",
        "--nodaemon",
        "--pidfile=",
        "--logger=mtrkmta.logfile.observer",
        "mtrkmta",
        *args,
    ]
    run()
    return 0


def check_config(args: Sequence[str]) -> int:
    if len(args) != 1:
        print("usage: mtrkmta check-config FILE", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    error = check_config_file(Path(args[0]))
    if error is not None:
        print(f"mtrkmta: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    problem = dry_run(load_config(Path(args[0])))
    if problem is not None:
        print(f"mtrkmta: {args[0]}: {problem}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(f"{args[0]}: configuration is valid")
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


def track(args: Sequence[str]) -> int:  # `mtrkmta track` (message tracking)
    from mtrkmta.cli.track import main as track_main

    return track_main(args)


COMMANDS = {
    "serve": serve,
    "check-config": check_config,
    "db": db,
    "queue": queue,
    "tracking": tracking,
    "send": send,
    "track": track,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else EXIT_CONFIG_ERROR
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"mtrkmta: unknown command {args[0]!r}\n{USAGE}", file=sys.stderr, end="")
        return EXIT_CONFIG_ERROR
    return command(args[1:])


if __name__ == "__main__":
    sys.exit(main())
