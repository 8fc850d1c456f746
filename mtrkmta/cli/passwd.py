"""`mtrkmta passwd USER`: add or replace one entry of the users file, written atomically."""

from __future__ import annotations

import fcntl
import getpass
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from twisted.python import usage

from mtrkmta.auth import SCHEME, SHA512_CRYPT, PasswordFileError, make_hash, parse_users
from mtrkmta.cli.conventions import EXIT_USAGE, CommandOptions, parse
from mtrkmta.config import ConfigError, load_config

PROGRAM = "mtrkmta passwd"
#: The mode of a users file this command creates: the hashes are secrets too.
NEW_FILE_MODE = 0o640
#: How a running server comes to use the changed file.
PICKUP = "the server reads it again at its next login attempt"

# A password prompt: (prompt) -> the password typed, not echoed (getpass.getpass's shape).
Ask = Callable[[str], str]


class PasswdOptions(CommandOptions):
    program = PROGRAM
    synopsis = "[--users-file FILE | --config FILE] [--scheme S] [--stdin] USER"
    longdesc = (
        "Set USER's password in the users file (auth.users_file): replace USER's hash, or add "
        "a line for USER; every other line, comments included, stays as it is. The password "
        "is asked twice on the terminal, without echo, or read once (its first line) from "
        "standard input with --stdin or when standard input is not a terminal. The file is "
        "replaced atomically, keeping its mode and owner; a new one is made with mode 0640. "
        "Exit status: 0 written, 1 not written, 2 usage or configuration error."
    )
    optParameters = (
        ("users-file", None, None, "The users file to write (created when missing)."),
        (
            "config",
            None,
            None,
            "The server's configuration file: write the users file its auth.users_file names.",
        ),
        (
            "scheme",
            None,
            SCHEME,
            f"The hash to write: {SCHEME}, or {SHA512_CRYPT} (which Dovecot also reads).",
        ),
    )
    optFlags = (("stdin", None, "Read the password from standard input, once."),)

    def parseArgs(self, *users: str) -> None:
        if len(users) != 1:
            raise usage.UsageError("give one USER")
        user = users[0]
        if not user or user.startswith("#") or any(c == ":" or c.isspace() for c in user):
            raise usage.UsageError(
                f"user name {user!r} cannot be written: it must not be empty, start with '#', "
                f"or hold ':' or white space"
            )
        self["user"] = user

    def postOptions(self) -> None:
        if self["users-file"] and self["config"]:
            raise usage.UsageError("give --users-file or --config, not both")
        scheme = self["scheme"]
        for known in (SCHEME, SHA512_CRYPT):
            if scheme.lower() == known.lower():
                self["scheme"] = known
                return
        raise usage.UsageError(f"unknown --scheme {scheme!r} (use {SCHEME} or {SHA512_CRYPT})")


def main(
    args: Sequence[str],
    *,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    ask: Ask = getpass.getpass,
) -> int:
    """``mtrkmta passwd ARGS``; the exit status."""
    stdin = sys.stdin if stdin is None else stdin
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    options = PasswdOptions()
    status = parse(options, args, err)
    if status is not None:
        return status
    try:
        path = users_file(options)
    except ConfigError as error:
        print(f"{PROGRAM}: {error}", file=err)
        return EXIT_USAGE
    if path is None:
        print(
            f"{PROGRAM}: no users file: give --users-file FILE, or --config FILE with "
            f"auth.users_file set",
            file=err,
        )
        return EXIT_USAGE
    user = options["user"]
    try:
        if options["stdin"] or not stdin.isatty():
            password = stdin.readline().removesuffix("\n").removesuffix("\r")
        else:
            password = ask(f"Password for {user}: ")
            if ask(f"Retype password for {user}: ") != password:
                print(f"{PROGRAM}: the passwords differ; nothing written", file=err)
                return 1
    except EOFError:  # Ctrl-D at the prompt
        password = ""
    except UnicodeDecodeError as error:
        print(f"{PROGRAM}: the password is not {error.encoding} text; nothing written", file=err)
        return 1
    if not password:
        print(f"{PROGRAM}: empty password refused; nothing written", file=err)
        return 1
    stored = make_hash(password, options["scheme"])
    written = ""
    replaced = False

    def update(text: str) -> str:
        nonlocal written, replaced
        written, replaced = set_entry(text, user, stored)
        return written

    try:
        rewrite(path, update)
    except OSError as error:
        print(f"{PROGRAM}: cannot write {path}: {_reason(error)}; nothing written", file=err)
        return 1
    except UnicodeDecodeError:
        print(f"{PROGRAM}: {path} is not UTF-8 text; nothing written", file=err)
        return 1
    done = f"set {user}'s password in" if replaced else f"added {user} to"
    print(f"{PROGRAM}: {done} {path}; {PICKUP}", file=out)
    try:
        parse_users(written, str(path))
    except PasswordFileError as error:
        print(f"{PROGRAM}: but the server refuses the file until it is fixed: {error}", file=err)
        return 1
    return 0


def users_file(options: PasswdOptions) -> Path | None:
    """The file --users-file names, or else the --config file's auth.users_file (None when
    neither names one). ConfigError when the configuration cannot be loaded."""
    if options["users-file"]:
        return Path(options["users-file"])
    if options["config"]:
        return load_config(Path(options["config"])).auth.users_file
    return None


def set_entry(text: str, user: str, stored: str) -> tuple[str, bool]:
    """``text`` (a users file) with ``user``'s hash set to ``stored``, and whether ``user``
    had a line: that line keeps its other fields (Dovecot's ``:uid:gid:...``); any other
    line is left as it is. A new user's line goes at the end."""
    lines = text.splitlines(keepends=True)
    replaced = False
    for index, line in enumerate(lines):
        content = line.strip()
        if not content or content.startswith("#"):
            continue
        fields = content.split(":")
        if fields[0] != user:
            continue
        fields[1:2] = [stored]
        ending = line[len(line.rstrip("\r\n")) :]
        lines[index] = ":".join(fields) + (ending or "\n")
        replaced = True
    if not replaced:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(f"{user}:{stored}\n")
    return "".join(lines), replaced


def rewrite(path: Path, update: Callable[[str], str]) -> None:
    """Replace the file ``path`` (a symbolic link's target) with ``update`` of its text,
    atomically: a temporary file in the same directory, given the old file's mode and
    owner (NEW_FILE_MODE and the caller's when there was none), written and flushed to
    disk, renamed over the old one, then the directory flushed. Another `mtrkmta passwd`
    on the same directory waits (a lock on the directory) so that neither loses the
    other's change. OSError when any step fails; the old file is then untouched."""
    target = path.resolve()
    directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        try:
            with open(target, encoding="utf-8", newline="") as old:
                info = os.fstat(old.fileno())
                text = old.read()
            mode, owner = stat.S_IMODE(info.st_mode), (info.st_uid, info.st_gid)
        except FileNotFoundError:
            text, mode, owner = "", NEW_FILE_MODE, None
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with open(fd, "w", encoding="utf-8", newline="") as new:
                new.write(update(text))
                new.flush()
                os.fchmod(new.fileno(), mode)
                if owner is not None:
                    os.fchown(new.fileno(), *owner)
                os.fsync(new.fileno())
            os.replace(temporary, target)
        except BaseException:
            os.unlink(temporary)
            raise
        os.fsync(directory)
    finally:
        os.close(directory)


def _reason(error: OSError) -> str:
    reason = error.strerror or str(error)
    if isinstance(error, PermissionError):
        reason += " (run it as root, or as the owner of the file and its directory)"
    return reason
