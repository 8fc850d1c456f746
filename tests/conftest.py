"""Shared test fixtures: the leak guard, and the PostgreSQL server of ``--postgres`` runs.

``pytest --postgres`` (or ``MTRKMTA_TEST_POSTGRES=1``, as the tox env ``postgres``
sets) starts a throw-away PostgreSQL server for the session: ``initdb`` and
``pg_ctl`` in a temporary directory, as the ``postgres`` system user when run as
root, listening on 127.0.0.1 only, on a port chosen at run time. Every node made
by :func:`mtrkmta.testing.node_config` then keeps its tracking store in a fresh
database of that server (see :func:`mtrkmta.testing.database_url`) instead of
SQLite, and migrates it from empty at start-up like any node.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

# Speed is measured by bench/, never asserted by tests: no per-example deadline, which
# on a loaded two-CPU machine fails property tests at random.
hypothesis_settings.register_profile("mtrkmta", deadline=None)
hypothesis_settings.load_profile("mtrkmta")

POSTGRES_ENV = "MTRKMTA_TEST_POSTGRES"
POSTGRES_INSTALL = (
    "apt-get install -y --no-install-recommends postgresql (postgresql-15 on Debian 12); "
    "tools/bootstrap.sh test does it when run as root"
)
POSTGRES_DRIVER = "psycopg"
POSTGRES_START_TIMEOUT = 60


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--postgres",
        action="store_true",
        default=os.environ.get(POSTGRES_ENV, "") not in ("", "0"),
        help=f"keep test nodes' tracking stores on a throw-away PostgreSQL server "
        f"(default from {POSTGRES_ENV}=1)",
    )


def _reactor_sockets(reactor: object) -> set[object]:
    """The reactor's selectables, less its own wakers (they appear once it runs)."""
    readers = set(getattr(reactor, "getReaders", list)())
    writers = set(getattr(reactor, "getWriters", list)())
    internal = set(getattr(reactor, "_internalReaders", ()))
    return (readers | writers) - internal


@pytest.fixture(autouse=True)
def no_leaked_reactor_state(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves DelayedCalls pending or sockets open in the global reactor.

    Pure unit tests never touch the global reactor, so for them this costs nothing;
    integration tests must stop their listeners, close their connections and cancel
    their timers before they end.
    """
    from twisted.internet import reactor

    before_sockets = _reactor_sockets(reactor)
    before_calls = {id(c) for c in reactor.getDelayedCalls()}
    yield
    leaked_calls = [
        c for c in reactor.getDelayedCalls() if c.active() and id(c) not in before_calls
    ]
    leaked_sockets = _reactor_sockets(reactor) - before_sockets
    for call in leaked_calls:
        call.cancel()
    for selectable in leaked_sockets:
        reactor.removeReader(selectable)
        reactor.removeWriter(selectable)
        lose = getattr(selectable, "loseConnection", None) or getattr(
            selectable, "stopListening", None
        )
        if lose is not None:
            lose()
    problems = [f"pending DelayedCall {c}" for c in leaked_calls]
    problems += [f"open socket {s!r}" for s in leaked_sockets]
    if problems:
        pytest.fail("test left reactor state behind:\n  " + "\n  ".join(problems), pytrace=False)


# -- the reaper: stops the servers tests start, should pytest itself be killed ------------------

_REAPER = r"""
import json, os, shutil, signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
pending = {}
for line in sys.stdin:  # until pytest closes the pipe, or dies
    message = json.loads(line)
    if message["steps"] is None:
        pending.pop(message["key"], None)
    else:
        pending[message["key"]] = message["steps"]
for steps in reversed(list(pending.values())):  # the last started goes first
    for step in steps:
        try:
            if step[0] == "kill":  # [kill, pid, program]: only if it still runs that program
                with open(f"/proc/{step[1]}/cmdline", "rb") as f:
                    if step[2].encode() in f.read():
                        os.kill(step[1], signal.SIGTERM)
                        time.sleep(1)
            elif step[0] == "run":
                subprocess.run(step[1], timeout=60, capture_output=True)
            elif step[0] == "rmtree":
                shutil.rmtree(step[1], ignore_errors=True)
        except Exception:
            pass
"""


class Reaper:
    """A watchdog process that undoes what the tests started if pytest dies without teardown.

    Fixtures ``add`` the steps that stop a server (``["kill", pid, program]``,
    ``["run", argv]``, ``["rmtree", path]``) and ``remove`` them once they stopped it
    themselves. The watchdog reads them from a pipe; when the pipe closes with steps
    left (pytest was killed, even by SIGKILL), it carries them out.
    """

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _REAPER],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not in pytest's process group: Ctrl-C does not reach it
            text=True,
        )

    def _send(self, key: object, steps: list[list[object]] | None) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"key": str(id(key)), "steps": steps}) + "\n")
        self._proc.stdin.flush()

    def add(self, key: object, steps: list[list[object]]) -> None:
        self._send(key, steps)

    def remove(self, key: object) -> None:
        self._send(key, None)

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(timeout=120)


@pytest.fixture(scope="session")
def reaper() -> Iterator[Reaper]:
    """The session's :class:`Reaper`."""
    watchdog = Reaper()
    try:
        yield watchdog
    finally:
        watchdog.close()


# -- the PostgreSQL server of --postgres runs ------------------------------------------------


def _postgres_bindir() -> Path:
    """The directory holding initdb and pg_ctl (Debian keeps them off PATH), newest version."""
    found = shutil.which("initdb")
    if found is not None and shutil.which("pg_ctl", path=os.path.dirname(found)):
        return Path(found).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0,
    )
    if not candidates:
        pytest.fail(f"--postgres: no initdb found; install it: {POSTGRES_INSTALL}", pytrace=False)
    return Path(candidates[-1]).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, run by an unprivileged user.

    As root the cluster belongs to the ``postgres`` system user (the server refuses
    to run as root) and commands run through ``runuser``; otherwise to the caller.
    Durability settings are off: the tests exercise the store's SQL, not the disk.
    """

    def __init__(self) -> None:
        self.bindir = _postgres_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="mtrkmta-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.user = "mtrkmta"
        self.password = secrets.token_hex(16)
        self.port = 0
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
        self.root.chmod(0o700)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [*self._as, *args]
        proc = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}{log}"
            )
        return proc

    def start(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as:
            shutil.chown(pwfile, "postgres", "postgres")
        pwfile.chmod(0o600)
        self._run(
            str(self.bindir / "initdb"),
            "--pgdata",
            str(self.data),
            "--username",
            self.user,
            "--pwfile",
            str(pwfile),
            "--auth",
            "scram-sha-256",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
        )
        pwfile.unlink()
        for attempt in range(3):  # another process may take the port before the server binds it
            self.port = _free_port()
            options = " ".join(
                f"-c {setting}"
                for setting in (
                    "listen_addresses=127.0.0.1",
                    f"port={self.port}",
                    f"unix_socket_directories={self.root}",
                    "max_connections=300",
                    "lock_timeout=60s",  # a lock wait that long is a bug: fail, do not hang
                    "fsync=off",
                    "synchronous_commit=off",
                    "full_page_writes=off",
                )
            )
            try:
                self._run(
                    str(self.bindir / "pg_ctl"),
                    "--pgdata",
                    str(self.data),
                    "--log",
                    str(self.log),
                    "--options",
                    options,
                    "--wait",
                    "--timeout",
                    str(POSTGRES_START_TIMEOUT),
                    "start",
                )
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the maintenance database ``postgres``, as the superuser."""
        return (
            f"postgresql+{POSTGRES_DRIVER}://{self.user}:{self.password}"
            f"@127.0.0.1:{self.port}/postgres"
        )

    def cleanup_steps(self) -> list[list[object]]:
        """For the reaper: stop the server at once, remove its directory."""
        pg_ctl = str(self.bindir / "pg_ctl")
        stop = [*self._as, pg_ctl, "--pgdata", str(self.data), "--mode", "immediate", "stop"]
        return [["run", stop], ["rmtree", str(self.root)]]

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                pg_ctl = str(self.bindir / "pg_ctl")
                self._run(pg_ctl, "--pgdata", str(self.data), "--mode", "fast", "--wait", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server(reaper: Reaper) -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session (started on first use, stopped at the end)."""
    try:
        __import__(POSTGRES_DRIVER)
    except ImportError:
        pytest.fail(
            f"PostgreSQL tests need the {POSTGRES_DRIVER} driver: pip install 'psycopg[binary]'",
            pytrace=False,
        )
    server = PostgresServer()
    reaper.add(server, server.cleanup_steps())
    try:
        server.start()
        yield server
    finally:
        server.stop()
        reaper.remove(server)


@pytest.fixture(scope="session", autouse=True)
def postgres_for_nodes(request: pytest.FixtureRequest) -> Iterator[None]:
    """With ``--postgres``: announce the session's server to :func:`node_config`."""
    if not request.config.getoption("--postgres"):
        yield
        return
    from mtrkmta.testing import DATABASE_SERVER_ENV  # not at import: keep the reactor unset

    server: PostgresServer = request.getfixturevalue("postgres_server")
    previous = os.environ.get(DATABASE_SERVER_ENV)
    os.environ[DATABASE_SERVER_ENV] = server.url
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(DATABASE_SERVER_ENV, None)
        else:
            os.environ[DATABASE_SERVER_ENV] = previous
