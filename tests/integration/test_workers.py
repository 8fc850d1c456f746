"""`server.workers`: worker processes accept on the master's port, deliver their own mail,
answer `mtrkmta queue` through the master's data directory, and come back when killed."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import pytest_twisted
from servprocess import LISTENING
from sqlalchemy import create_engine, text
from twisted.internet import reactor
from twisted.internet.protocol import ServerFactory

import mtrkmta
from mtrkmta.testing import database_url
from mtrkmta.workers import take_turns

HOSTNAME = "mx.example.test"
IMPORT_ROOT = str(Path(mtrkmta.__file__).resolve().parent.parent)
TIMEOUT = 30.0
STARTED = re.compile(r"worker 1 started \(pid (\d+)\)")
ACCEPTING = "worker 1: smtp accepting on"


def child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (IMPORT_ROOT, env.get("PYTHONPATH")) if p)
    return env


def wait_for(check: Callable[[], object], what: str, log: Path) -> object:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text('utf-8', 'replace')}")


def mtrkmta_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mtrkmta.cli.main", *args]


@contextmanager
def running_server(
    tmp_path: Path, *options: str
) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """A master with one worker, ``options`` added to its command line; on leaving,
    the master stops and no worker may outlive it."""
    data, log = tmp_path / "data", tmp_path / "server.log"
    command = mtrkmta_command(
        "serve", "--data-dir", str(data), "--database", database_url(data),
        "--smtp", "tcp:0:interface=127.0.0.1",
        "--lmtp", "none", "--mtqp", "none", "--hostname", HOSTNAME,
        "--http", "none",
        "--local-domain", "example.test", "--workers", "2", *options,
    )  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=tmp_path, env=child_env(),
        )  # fmt: skip
    try:
        yield proc, data, log
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in (int(p) for p in STARTED.findall(log.read_text("utf-8", "replace"))):
            if not ended(pid):  # a worker left behind is a bug
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"worker process {pid} outlived its master")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    with running_server(tmp_path) as running:
        yield running


def cpus_of(pid: int) -> set[frozenset[int]]:
    """The sets of CPUs the threads of process ``pid`` may run on."""
    return {frozenset(os.sched_getaffinity(int(task))) for task in os.listdir(f"/proc/{pid}/task")}


def test_with_cpu_affinity_each_process_runs_on_a_cpu_of_its_own(tmp_path):
    # server.cpu_affinity: the master takes the first CPU this process may use, worker 1
    # the next (round-robin), and every thread of each inherits it.
    cpus = sorted(os.sched_getaffinity(0))
    config = tmp_path / "mtrkmta.toml"
    config.write_text("[server]\ncpu_affinity = true\n")
    with running_server(tmp_path, "--config", str(config)) as (proc, _, log):
        logged = lambda: log.read_text("utf-8", "replace")  # noqa: E731
        worker = int(wait_for(lambda: STARTED.search(logged()), "worker 1", log).group(1))
        wait_for(lambda: ACCEPTING in logged(), "worker 1 to accept", log)
        assert cpus_of(proc.pid) == {frozenset({cpus[0]})}
        assert cpus_of(worker) == {frozenset({cpus[1 % len(cpus)]})}
        assert f"process 0 pinned to CPU {cpus[0]}" in logged()
        assert f"process 1 pinned to CPU {cpus[1 % len(cpus)]}" in logged()


def send(port: int, count: int) -> list[str]:
    """``count`` messages, a connection each; their queue ids."""
    ids = []
    for n in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as smtp:
            smtp.ehlo("client.example")
            smtp.mail("sender@client.example")
            smtp.rcpt("alice@example.test")
            code, reply = smtp.data(f"Subject: worker test {n}\r\n\r\nbody {n}\r\n".encode())
            assert code == 250, reply
            ids.append(reply.decode().rsplit(" ", 1)[1])
    return ids


def test_a_worker_accepts_on_the_masters_port_and_delivers_its_own_mail(server):
    proc, data, log = server
    logged = lambda: log.read_text("utf-8", "replace")  # noqa: E731
    port = int(wait_for(lambda: LISTENING.search(logged()), "the smtp listener", log).group(1))
    worker_pid = int(wait_for(lambda: STARTED.search(logged()), "worker 1", log).group(1))
    wait_for(lambda: ACCEPTING in logged(), "worker 1 to accept", log)
    assert "[worker 1 mtrkmta.service#info] worker 1: smtp accepting on" in logged()
    # With the master stopped, only the worker can take the connections.
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        ids = send(port, 5)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    maildir = data / "mail" / "alice" / "new"  # the master's Maildirs
    wait_for(lambda: maildir.is_dir() and len(list(maildir.iterdir())) == 5, "delivery", log)
    # The outcome is committed just after the Maildir file is in place: wait for it too.
    expected = [(queue_id, f"{HOSTNAME}.w1", "delivered") for queue_id in sorted(ids)]
    engine = create_engine(database_url(data))  # SQLite, or PostgreSQL with --postgres
    try:

        def tracked() -> list[tuple[object, ...]]:
            with engine.connect() as db:
                rows = db.execute(
                    text(
                        "SELECT m.queue_id, m.node_id, r.state FROM messages m JOIN recipients r "
                        "ON r.queue_id = m.queue_id ORDER BY m.queue_id"
                    )
                ).all()
            return [tuple(row) for row in rows]

        wait_for(lambda: tracked() == expected, "the outcomes to be recorded", log)
    finally:
        engine.dispose()
    assert (data / "workers" / "1" / "spool").is_dir()
    assert not any((data / "spool" / "queue").glob("*/*"))
    # `mtrkmta queue` asks every process.
    held = send(port, 1)[0]  # taken by either process; found through the fan-out
    listing = subprocess.run(
        mtrkmta_command("queue", "--data-dir", str(data), "--json", "list"),
        capture_output=True, text=True, env=child_env(), timeout=TIMEOUT, check=True,
    )  # fmt: skip
    assert isinstance(json.loads(listing.stdout), list)
    shown = subprocess.run(
        mtrkmta_command("queue", "--data-dir", str(data), "--json", "show", held),
        capture_output=True, text=True, env=child_env(), timeout=TIMEOUT, check=False,
    )  # fmt: skip
    # Delivered already (gone from every queue) or still there: never "not running".
    assert shown.returncode == 0 or "in the queue of any process" in shown.stderr, shown.stderr
    # A killed worker is started again, on the same port.
    os.kill(worker_pid, signal.SIGKILL)
    wait_for(lambda: "worker 1 ended" in logged(), "the master to notice", log)
    wait_for(lambda: len(STARTED.findall(logged())) == 2, "worker 1 again", log)
    wait_for(lambda: logged().count(ACCEPTING) == 2, "worker 1 to accept again", log)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        send(port, 2)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    wait_for(lambda: len(list(maildir.iterdir())) == 8, "delivery by the new worker", log)
    # SIGTERM stops the master and its worker.
    proc.terminate()
    assert proc.wait(timeout=TIMEOUT) == -signal.SIGTERM or proc.returncode == 0, logged()
    assert "Traceback" not in logged(), logged()


def ended(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (its new parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_worker_stops_when_its_master_is_killed(server):
    # Its standard input (a pipe from the master) ends: it must not keep the port.
    proc, _, log = server
    logged = lambda: log.read_text("utf-8", "replace")  # noqa: E731
    worker_pid = int(wait_for(lambda: STARTED.search(logged()), "worker 1", log).group(1))
    wait_for(lambda: ACCEPTING in logged(), "worker 1 to accept", log)
    # server.cpu_affinity is off by default: every thread may run on every CPU.
    everywhere = frozenset(os.sched_getaffinity(0))
    assert cpus_of(proc.pid) == cpus_of(worker_pid) == {everywhere}
    proc.kill()
    proc.wait(timeout=TIMEOUT)
    wait_for(lambda: ended(worker_pid), "worker 1 to stop after its master", log)


@pytest_twisted.ensureDeferred
async def test_a_shared_port_takes_one_waiting_connection_per_wake_up():
    built: list[object] = []

    class Refuse(ServerFactory):
        def buildProtocol(self, addr: object) -> None:
            built.append(addr)  # and the port closes the connection

    port = reactor.listenTCP(0, Refuse(), interface="127.0.0.1")
    clients = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(4)]
    try:
        take_turns(port)
        for waited in range(1, 4):
            port.doRead()  # as the reactor does when the socket is readable
            assert len(built) == waited  # Twisted's own port would take all four at once
    finally:
        for client in clients:
            client.close()
        await port.stopListening()
