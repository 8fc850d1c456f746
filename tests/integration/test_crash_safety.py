"""Crash safety: SIGKILL the server while clients send, restart it, and audit the data directory.

The contract under test: a 250 after DATA means the message is in the spool *and*
has its tracking record, so no crash may lose it; and a crash never leaves behind
a message the client was not told about, except one whose connection broke after
the final dot (the client cannot know; that is the documented duplicate risk).

The server runs as a real process (``python -m mtrkmta.cli.main serve``, the same
service as ``twistd -n mtrkmta``). After the kills, recovery runs once more in an
in-process node on the same data directory and tracking database, and the audit
reads the spool and the tracking store through it. The tracking database is
SQLite in the data directory, or a PostgreSQL database when the suite runs with
``--postgres`` (:func:`mtrkmta.testing.database_url`). Note that SIGKILL
tests ordering and recovery (250 only after the commit; leftovers cleaned up),
not fsync itself: the kernel keeps the page cache of a killed process.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest_twisted
from sqlalchemy import create_engine, text
from twisted.internet import threads

import mtrkmta
from mtrkmta.testing import database_url, node_config, start_node, stop_node

HOSTNAME = "mx.example.test"
SENDER = "crash@client.example"
# Mail for this domain is routed to a next hop where nothing listens: every accepted
# message stays in the queue (deferred), so the audit sees all of them.
RECIPIENT = "alice@hold.example"
DEAD_ROUTE = "hold.example=smtp:tcp:host=127.0.0.1:port=9"
TOKEN = re.compile(rb"^X-Crash-Token: (m\d{3}-a\d{3})\r$", re.MULTILINE)
QUEUED_AS = re.compile(r"^250 2\.0\.0 Ok: queued as ([A-Za-z0-9_-]+)$")
# The server process runs the mtrkmta this test imports (the same code the audit uses).
IMPORT_ROOT = str(Path(mtrkmta.__file__).resolve().parent.parent)
START_TIMEOUT = 20.0
IO_TIMEOUT = 10.0

# Outcomes of one attempt, as the client saw it.
ACCEPTED = "accepted"  # 250 after the final dot: must be in the queue
REJECTED = "rejected"  # 4xx/5xx after the final dot: must not be in the queue
INCOMPLETE = "incomplete"  # the final dot was never sent: must not be in the queue
UNKNOWN = "unknown"  # the connection broke after the dot was sent: either way


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the server process -------------------------------------------------------------


class ServerProcess:
    """``mtrkmta serve`` on one data directory, restartable, each run logging to a file."""

    def __init__(self, data_dir: Path, log_dir: Path) -> None:
        self.data_dir = data_dir
        self.database = database_url(data_dir)  # the one the audit node opens too
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.runs = 0
        self._log: Path | None = None

    def start(self) -> int:
        """Start on a fresh loopback port and wait for its greeting; return the port."""
        failures = []
        for _ in range(3):  # another process may take the free port before the server binds it
            try:
                return self._start_once()
            except ServerDied as e:
                failures.append(str(e))
        raise AssertionError("server did not start:\n" + "\n\n".join(failures))

    def _start_once(self) -> int:
        self.port = free_port()
        self.runs += 1
        self._log = self.log_dir / f"server-{self.runs}.log"
        command = [
            sys.executable,
            "-m",
            "mtrkmta.cli.main",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--database",
            self.database,
            "--smtp",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--lmtp",
            "none",
            "--mtqp",
            "none",
            "--http",
            "none",
            "--hostname",
            HOSTNAME,
            "--route",
            DEAD_ROUTE,
        ]
        with open(self._log, "wb") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=self.log_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(
                        p for p in (IMPORT_ROOT, os.environ.get("PYTHONPATH")) if p
                    ),
                },
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerDied(f"exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.settimeout(IO_TIMEOUT)
                    greeting = s.recv(512)
                    s.sendall(b"QUIT\r\n")
                if greeting.startswith(b"220 "):
                    return self.port
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"server not ready after {START_TIMEOUT}s:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL and reap (no-op if not running)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=IO_TIMEOUT)

    def terminate(self) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop in time. The exit status, or None."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=IO_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server ignored SIGTERM:\n{self.output()}") from None

    def recoveries(self) -> str:
        """What start-up recovery removed in every run (for the test report)."""
        found = re.findall(
            r"spool recovery(?: removed|:) (\d+) (incomplete|message file)",
            "".join(p.read_text("utf-8", "replace") for p in self.log_dir.glob("server-*.log")),
        )
        return ", ".join(f"{n} {kind}" for n, kind in found) or "nothing"

    def output(self, tail: int = 4000) -> str:
        if self._log is None or not self._log.exists():
            return ""
        return self._log.read_bytes()[-tail:].decode("utf-8", "replace")


class ServerDied(Exception):
    pass


# -- the client -----------------------------------------------------------------------


@dataclass
class Attempt:
    message: int
    token: str
    outcome: str = INCOMPLETE
    queue_id: str | None = None
    reply: str = ""


class ConnectionBroke(Exception):
    pass


class Lines:
    """Reads SMTP replies from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def reply(self) -> list[str]:
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionBroke("connection closed")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return lines


def message_content(token: str, rng: random.Random) -> bytes:
    padding = "".join(f"line {i} of {token} " + "x" * rng.randrange(60) + "\r\n" for i in range(40))
    return (
        f"From: <{SENDER}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        f"Message-ID: <{token}@client.example>\r\n"
        f"Subject: crash test {token}\r\n"
        f"X-Crash-Token: {token}\r\n"
        "\r\n" + padding * rng.randrange(1, 8)
    ).encode("ascii")


def send(port: int, attempt: Attempt, content: bytes, pause_before_dot: float) -> None:
    """One SMTP transaction on a new connection; fills in ``attempt``'s outcome."""
    dot_sent = False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
            sock.settimeout(IO_TIMEOUT)
            lines = Lines(sock)

            def command(line: str, expected: int) -> None:
                sock.sendall(line.encode("ascii") + b"\r\n")
                reply = lines.reply()
                if not reply[-1].startswith(str(expected)):
                    raise ConnectionBroke(f"{line!r}: {reply!r}")

            greeting = lines.reply()
            if not greeting[-1].startswith("220"):
                raise ConnectionBroke(f"greeting {greeting!r}")
            command("EHLO client.example", 250)
            command(f"MAIL FROM:<{SENDER}> ENVID={attempt.token}", 250)
            command(f"RCPT TO:<{RECIPIENT}>", 250)
            command("DATA", 354)
            sock.sendall(content)
            if pause_before_dot:
                time.sleep(pause_before_dot)  # widen the window for a kill in mid-DATA
            dot_sent = True  # from here on the server may have the whole message
            sock.sendall(b".\r\n")
            final = lines.reply()[-1]
            attempt.reply = final
            match = QUEUED_AS.match(final)
            if match is not None:
                attempt.outcome, attempt.queue_id = ACCEPTED, match.group(1)
            elif final[:1] in ("4", "5"):
                attempt.outcome = REJECTED
            else:
                attempt.outcome = UNKNOWN
            try:
                sock.sendall(b"QUIT\r\n")
                lines.reply()
            except (OSError, ConnectionBroke):
                pass
    except (OSError, ConnectionBroke) as e:
        attempt.reply = repr(e)
        attempt.outcome = UNKNOWN if dot_sent else INCOMPLETE


@dataclass
class Traffic:
    """State shared by the client threads and the killer."""

    port: int
    deadline: float
    up: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    attempts: list[Attempt] = field(default_factory=list)
    delivered: int = 0
    errors: list[str] = field(default_factory=list)

    def client(self, messages: list[int], rng: random.Random) -> None:
        try:
            for message in messages:
                self._deliver(message, rng)
        except BaseException as e:  # reported by the test, never lost in a thread
            self.errors.append(f"client crashed: {e!r}")

    def _deliver(self, message: int, rng: random.Random) -> None:
        for n in range(1000):
            if time.monotonic() > self.deadline:
                self.errors.append(f"message {message} not delivered before the deadline")
                return
            self.up.wait(timeout=START_TIMEOUT)
            attempt = Attempt(message, f"m{message:03d}-a{n:03d}")
            pause = rng.uniform(0, 0.02) if rng.random() < 0.3 else 0.0
            send(self.port, attempt, message_content(attempt.token, rng), pause)
            with self.lock:
                self.attempts.append(attempt)
                if attempt.outcome == ACCEPTED:
                    self.delivered += 1
                    return
            time.sleep(0.02)
        self.errors.append(f"message {message}: too many attempts")


# -- the audit --------------------------------------------------------------------------


@dataclass
class Audit:
    spool: dict[str, str]  # queue id -> token found in its content
    tracked: set[str]  # queue ids with a tracking record (every row of the messages table)
    incoming: list[str]  # files left in spool/incoming after recovery


async def audit(data_dir: Path) -> Audit:
    """Start a node on ``data_dir`` (recovery runs), read everything back, stop it."""
    node = await start_node(
        node_config(data_dir, hostname=HOSTNAME, listeners=(), options=(("routes", DEAD_ROUTE),)),
        deliver=False,
    )
    try:
        assert node.spool is not None and node.tracking is not None
        on_disk = await node.spool.queue_ids()
        known = await node.tracking.known(on_disk)
        queued = set(await node.tracking.queued_messages(node.config.node_id))
        spool: dict[str, str] = {}
        for queue_id in on_disk:
            envelope, content = await node.spool.load(queue_id)  # SpoolCorruption fails the test
            tokens = TOKEN.findall(content)
            assert len(tokens) == 1, f"{queue_id}: tokens {tokens!r} in {content[:300]!r}"
            token = tokens[0].decode()
            spool[queue_id] = token
            assert envelope.sender == SENDER
            assert [r.address for r in envelope.recipients] == [RECIPIENT]
            record = await node.tracking.message(queue_id)
            if record is not None:
                assert record.envid == token, f"{queue_id}: record of {record.envid}, file {token}"
                assert record.sender == SENDER
                assert [r.address for r in record.recipients] == [RECIPIENT]
                # The arrival's event committed with the record (no event lost).
                events = await node.tracking.events(queue_id)
                assert [e.kind.value for e in events][:1] == ["arrived"], f"{queue_id}: {events}"
        assert known == set(on_disk), f"spool files without a record: {set(on_disk) - known}"
        assert queued == set(on_disk), f"queued records vs spool: {queued ^ set(on_disk)}"
        incoming = sorted(os.listdir(node.spool.root / "incoming"))
    finally:
        await stop_node(node)
    return Audit(spool, await threads.deferToThread(every_record, database_url(data_dir)), incoming)


def every_record(database: str) -> set[str]:
    """The queue id of every row of the messages table, whatever its state (blocking)."""
    engine = create_engine(database)
    try:
        with engine.connect() as conn:
            return set(conn.scalars(text("SELECT queue_id FROM messages")))
    finally:
        engine.dispose()


def check(attempts: list[Attempt], found: Audit, messages: int, context: str) -> None:
    """Every 250 is in the queue with its record; nothing that was refused or cut short is."""
    accepted = {a.token: a for a in attempts if a.outcome == ACCEPTED}
    by_token = {a.token: a for a in attempts}
    assert len(by_token) == len(attempts), context
    assert found.incoming == [], f"incoming/ not emptied: {found.incoming}; {context}"
    assert found.tracked == set(found.spool), (
        f"records without spool file: {sorted(found.tracked - set(found.spool))}, "
        f"spool files without record: {sorted(set(found.spool) - found.tracked)}; {context}"
    )
    # Each message got exactly one 250 (the client stops there), under a distinct queue id.
    assert sorted(a.message for a in accepted.values()) == list(range(messages)), context
    assert len({a.queue_id for a in accepted.values()}) == messages, context
    # Every 250 survived, under the queue id the client was told, with its own content.
    lost = [
        f"{a.token} ({a.queue_id})"
        for a in accepted.values()
        if found.spool.get(a.queue_id or "") != a.token
    ]
    assert not lost, f"acknowledged messages lost after SIGKILL: {lost}; {context}"
    # Nothing else: every queued message is an acknowledged one or one whose outcome was
    # unknown to its client, and no attempt is stored twice.
    tokens = list(found.spool.values())
    assert len(set(tokens)) == len(tokens), f"an attempt stored twice; {context}"
    strays = {
        queue_id: (token, by_token[token].outcome if token in by_token else "never sent")
        for queue_id, token in found.spool.items()
        if token not in by_token or by_token[token].outcome not in (ACCEPTED, UNKNOWN)
    }
    assert not strays, f"queued messages the client was told were not taken: {strays}; {context}"
    for token in found.spool.values():
        if by_token[token].outcome == UNKNOWN:
            # A duplicate of a message that was later acknowledged: the documented risk.
            assert by_token[token].message in {a.message for a in accepted.values()}, context


# -- the tests ------------------------------------------------------------------------------


MESSAGES = 200
CLIENTS = 5
KILLS = 6


def crash_run(data_dir: Path, log_dir: Path, seed: int) -> tuple[list[Attempt], list[str]]:
    """Send MESSAGES from CLIENTS threads while killing the server KILLS times (blocking)."""
    rng = random.Random(seed)
    server = ServerProcess(data_dir, log_dir)
    events: list[str] = []
    traffic = Traffic(port=0, deadline=time.monotonic() + 50)
    clients: list[threading.Thread] = []
    try:
        traffic.port = server.start()
        traffic.up.set()
        for i in range(CLIENTS):
            messages = list(range(i, MESSAGES, CLIENTS))
            thread = threading.Thread(
                target=traffic.client,
                args=(messages, random.Random(rng.random())),
                name=f"crash-client-{i}",
                daemon=True,
            )
            clients.append(thread)
            thread.start()
        # Kill points: one in each of KILLS equal stretches of the traffic, at a random
        # count of acknowledged messages plus a random delay of up to 30 ms.
        span = (MESSAGES - 20) // KILLS
        for k in range(KILLS):
            threshold = 10 + k * span + rng.randrange(span - 5)
            floor = traffic.delivered + 3  # let traffic resume after a restart first
            target = max(threshold, floor)
            while traffic.delivered < target:
                assert time.monotonic() < traffic.deadline, f"no progress to {target}: {events}"
                assert not traffic.errors, traffic.errors
                assert server.proc is not None and server.proc.poll() is None, server.output()
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.03))
            traffic.up.clear()
            server.kill()
            events.append(f"kill {k + 1} after {traffic.delivered} acknowledged")
            traffic.port = server.start()
            traffic.up.set()
        for thread in clients:
            thread.join(timeout=max(0.0, traffic.deadline - time.monotonic()) + IO_TIMEOUT)
        assert not any(t.is_alive() for t in clients), f"clients still running: {events}"
        assert not traffic.errors, f"{traffic.errors}; {events}"
        status = server.terminate()  # twistd re-raises SIGTERM once it has shut down
        assert status in (0, -signal.SIGTERM), f"exit status {status}:\n{server.output()}"
        assert "Server Shut Down." in server.output(), server.output()
        events.append(f"recovery removed {server.recoveries()}")
    finally:
        traffic.deadline = 0  # let clients give up quickly if anything failed
        traffic.up.set()
        server.kill()
        for thread in clients:
            thread.join(timeout=IO_TIMEOUT)
    return traffic.attempts, events


@pytest_twisted.ensureDeferred
async def test_sigkill_during_traffic_loses_no_acknowledged_message(tmp_path):
    seed = int(os.environ.get("MTRKMTA_CRASH_SEED", random.randrange(2**32)))
    data_dir, log_dir = tmp_path / "data", tmp_path / "logs"
    log_dir.mkdir()
    started = time.monotonic()
    attempts, events = await threads.deferToThread(crash_run, data_dir, log_dir, seed)
    found = await audit(data_dir)
    outcomes = (ACCEPTED, REJECTED, INCOMPLETE, UNKNOWN)
    counts = {o: sum(a.outcome == o for a in attempts) for o in outcomes}
    context = (
        f"seed={seed} (rerun with MTRKMTA_CRASH_SEED={seed}); {events}; outcomes {counts}, "
        f"{len(attempts)} attempts; {len(found.spool)} queued; "
        f"{time.monotonic() - started:.1f}s"
    )
    print(context)
    assert sum(e.startswith("kill") for e in events) == KILLS, context
    check(attempts, found, MESSAGES, context)


def burst_then_kill(data_dir: Path, log_dir: Path) -> tuple[list[Attempt], list[Attempt]]:
    """Acknowledge a burst of messages, leave transactions open mid-way, then SIGKILL."""
    server = ServerProcess(data_dir, log_dir)
    rng = random.Random(1)
    burst = [Attempt(m, f"m{m:03d}-a000") for m in range(40)]
    open_sockets: list[socket.socket] = []
    try:
        port = server.start()
        # Two transactions the server must forget: one stopped after RCPT, one in
        # the middle of its content (the final dot never sent).
        cut = [Attempt(100, "m100-a000"), Attempt(101, "m101-a000")]
        for attempt, stop_after in zip(cut, ("RCPT", "content"), strict=True):
            sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
            open_sockets.append(sock)
            lines = Lines(sock)
            lines.reply()
            for line in (
                "EHLO client.example",
                f"MAIL FROM:<{SENDER}> ENVID={attempt.token}",
                f"RCPT TO:<{RECIPIENT}>",
            ):
                sock.sendall(line.encode() + b"\r\n")
                assert lines.reply()[-1].startswith("250")
            if stop_after == "content":
                sock.sendall(b"DATA\r\n")
                assert lines.reply()[-1].startswith("354")
                sock.sendall(message_content(attempt.token, rng))
        # A burst from four clients; the kill comes the moment the last 250 arrives.
        workers = [
            threading.Thread(
                target=lambda part: [send(port, a, message_content(a.token, rng), 0) for a in part],
                args=(burst[i::4],),
                daemon=True,
            )
            for i in range(4)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=30)
        server.kill()
        assert not any(w.is_alive() for w in workers)
        return burst, cut
    finally:
        server.kill()
        for sock in open_sockets:
            sock.close()


@pytest_twisted.ensureDeferred
async def test_sigkill_right_after_a_burst_keeps_every_acknowledged_message(tmp_path):
    data_dir, log_dir = tmp_path / "data", tmp_path / "logs"
    log_dir.mkdir()
    burst, cut = await threads.deferToThread(burst_then_kill, data_dir, log_dir)
    assert [a.outcome for a in burst] == [ACCEPTED] * len(burst), [a.reply for a in burst]
    assert [a.outcome for a in cut] == [INCOMPLETE, INCOMPLETE]
    found = await audit(data_dir)
    check(burst + cut, found, len(burst), "burst then SIGKILL")
    assert sorted(found.spool) == sorted(a.queue_id for a in burst)
