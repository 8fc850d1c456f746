"""`mtrkmta passwd USER` at a real terminal (a pseudo-terminal as its controlling tty): it
asks twice, echoes nothing, and refuses two different answers."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

from mtrkmta.auth import parse_users, verify_password

TIMEOUT = 30.0


# The child makes the terminal its controlling tty (a session leader without one gets the
# first terminal it opens), as a login shell has it: getpass talks to /dev/tty.
LAUNCH = (
    "import os, sys; os.close(os.open(os.ttyname(0), os.O_RDWR)); "
    "from mtrkmta.cli.main import main; sys.exit(main(sys.argv[1:]))"
)


class Terminal:
    """`mtrkmta ARGS` in a session of its own on a pseudo-terminal."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.fd, tty = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, *args],
            stdin=tty,
            stdout=tty,
            stderr=tty,
            env=env,
            start_new_session=True,
        )
        os.close(tty)
        self.seen = b""

    def read_until(self, marker: bytes) -> bytes:
        """Everything shown up to and including ``marker`` (waits on the terminal's output)."""
        deadline = time.monotonic() + TIMEOUT
        while marker not in self.seen:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(remaining, 0))
            assert ready, f"no {marker!r} on the terminal in {TIMEOUT}s: {self.seen!r}"
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the program ended and closed the terminal
                chunk = b""
            assert chunk, f"the terminal closed before {marker!r}: {self.seen!r}"
            self.seen += chunk
        return self.seen

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def finish(self) -> tuple[int, bytes]:
        """The exit status and everything the terminal showed."""
        while True:
            ready, _, _ = select.select([self.fd], [], [], TIMEOUT)
            assert ready, f"the program did not end in {TIMEOUT}s: {self.seen!r}"
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            self.seen += chunk
        status = self.proc.wait(timeout=TIMEOUT)
        os.close(self.fd)
        return status, self.seen


def test_the_password_is_asked_twice_without_echo(tmp_path: Path):
    users = tmp_path / "users"
    terminal = Terminal("passwd", "--users-file", str(users), "alice")
    terminal.read_until(b"Password for alice: ")
    terminal.type("typed secret")
    terminal.read_until(b"Retype password for alice: ")
    terminal.type("typed secret")
    status, shown = terminal.finish()
    assert status == 0, shown
    assert b"typed secret" not in shown  # not echoed
    assert f"mtrkmta passwd: added alice to {users}".encode() in shown
    assert verify_password(b"typed secret", parse_users(users.read_text())["alice"])


def test_two_different_answers_write_nothing(tmp_path: Path):
    users = tmp_path / "users"
    terminal = Terminal("passwd", "--users-file", str(users), "alice")
    terminal.read_until(b"Password for alice: ")
    terminal.type("one")
    terminal.read_until(b"Retype password for alice: ")
    terminal.type("two")
    status, shown = terminal.finish()
    assert status == 1, shown
    assert b"mtrkmta passwd: the passwords differ; nothing written" in shown
    assert not users.exists()
