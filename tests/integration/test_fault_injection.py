"""Fault injection: stop the server at every named step (mtrkmta.faults.POINTS), or make a
write fail there, then restart, drain and check that no acknowledged message was lost or
delivered twice locally and that the tracking records agree with where each message is.

Each case runs ``python -m mtrkmta.cli.main serve --config FILE`` with ``MTRKMTA_FAULTS``
set, on a loopback port chosen at run time. Mail for ``local.example`` goes into Maildir
under the data directory; mail for ``relay.example`` goes by SMTP to a recording next hop
in this process (tests/integration/fakemta.py). The client sends a few messages, one
attempt each; the server dies at the point (``crash``: SIGKILL, no clean-up runs) or
answers 451 / defers the delivery (``enospc``, ``eio``). Then a node starts in-process on
the same data directory (start-up recovery runs), the client sends again what was not
acknowledged, the queue drains, and the audit reads the Maildir, the next hop's
transactions, the spool and the tracking database.

A 250 the client never read (the crash came between the commit and the reply) leaves a
message the client sends again: two copies, each under its own attempt token, which the
audit allows (RFC 5321 §6.1). A crash after the next hop took the message and before its
outcome was committed makes the retry send it again: the next hop may see it twice
(RFC 1047). Nothing else may be duplicated, and the Maildir never is.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_twisted
from fakemta import FakeMTA
from smtpwire import queue_emptied, until
from sqlalchemy import create_engine, text
from test_crash_safety import (
    ACCEPTED,
    IMPORT_ROOT,
    INCOMPLETE,
    IO_TIMEOUT,
    REJECTED,
    START_TIMEOUT,
    UNKNOWN,
    Lines,
    free_port,
)
from test_crash_safety import Attempt as SentAttempt
from test_sendmail_pickup import run_sendmail
from twisted.internet import threads

from mtrkmta.faults import ENVIRONMENT, POINTS
from mtrkmta.testing import database_url, node_config, start_node, stop_node
from mtrkmta.tracking.interfaces import RecipientState

HOSTNAME = "mx.example.test"
SENDER = "faults@client.example"
LOCAL = "local.example"
REMOTE = "relay.example"
# Each message's recipients: local only, next hop only, both, and a second local mailbox.
MESSAGES: tuple[tuple[str, ...], ...] = (
    (f"alice@{LOCAL}",),
    (f"bob@{REMOTE}",),
    (f"alice@{LOCAL}", f"carol@{REMOTE}"),
    (f"dave@{LOCAL}",),
)
TOKEN = re.compile(rb"^X-Fault-Token: (m\d-a\d)\r?$", re.MULTILINE)
DELIVERED_TO = re.compile(rb"^Delivered-To: <([^>]+)>$", re.MULTILINE)
QUEUED_AS = re.compile(r"^250 2\.0\.0 Ok: queued as ([A-Za-z0-9_-]+)$")
# After these points the next hop has the message while its outcome is not committed:
# the retry may give it a second copy (RFC 1047). The crash at any other point may catch
# another message's relay in that same window (Found.in_flight); everything else: one copy.
NEXT_HOP_MAY_DUPLICATE = frozenset({"transport.data_sent", "transport.reply_received"})
# Failed writes: on the spool (ENOSPC, EIO), in the Maildir, and in the tracking database
# (the arrival's transaction, then the second write, whichever that is).
ERRORS = (
    "spool.write:enospc",
    "spool.write:eio",
    "maildir.write:enospc",
    "maildir.write:eio",
    "tracking.write:enospc",
    "tracking.write:eio",
    "tracking.write:eio:2",
)
# Every named step, in order; the suite crashes at each (test_every_point_is_covered).
CRASH_POINTS = (
    "spool.write",
    "spool.written",
    "spool.synced",
    "spool.renamed",
    "spool.dir_synced",
    "tracking.write",
    "tracking.arrival_committed",
    "smtp.reply_sent",
    "pickup.queued",
    "maildir.write",
    "maildir.tmp_written",
    "maildir.tmp_synced",
    "maildir.renamed",
    "maildir.dir_synced",
    "transport.data_sent",
    "transport.reply_received",
    "tracking.outcome_committed",
    "queue.outcome_committed",
    "queue.spool_removed",
)
# Steps of the node's pickup of sendmail's files (test_crash_in_pickup_at).
PICKUP_POINTS = ("pickup.queued",)
# A crash at these leaves the first message's file in the queue without a tracking record:
# start-up moves it to spool/quarantine/ (its client got no 250).
QUARANTINED_AT = frozenset({"spool.renamed", "spool.dir_synced", "tracking.write"})
FAULT_WAIT = 20.0  # seconds for the server to reach the point

# Where a delivered recipient's record may stand: delivered into the Maildir or by LMTP;
# relayed to an SMTP next hop.
FINAL_STATES = (RecipientState.DELIVERED, RecipientState.RELAYED)

# Outcomes of one attempt as the client saw it (ACCEPTED: must be delivered; REJECTED,
# INCOMPLETE: must not be; UNKNOWN: either way, at most once): as in test_crash_safety.


@dataclass
class Attempt(SentAttempt):
    """One message sent, as test_crash_safety records it, with its body's padding."""

    padding: int = 0  # lines of 64 octets added to the body
    bdat: bool = False  # sent with BDAT LAST (RFC 3030) instead of DATA

    @property
    def recipients(self) -> tuple[str, ...]:
        return MESSAGES[self.message]


def content_of(attempt: Attempt) -> bytes:
    return (
        f"From: <{SENDER}>\r\n"
        f"Message-ID: <{attempt.token}@client.example>\r\n"
        f"Subject: fault injection {attempt.token}\r\n"
        f"X-Fault-Token: {attempt.token}\r\n"
        "\r\n"
        f"message {attempt.message}, attempt {attempt.token}\r\n"
        + f"{'padding ' * 7}{attempt.message:04d}\r\n" * attempt.padding
        + ".\r\n"
    ).encode("ascii")


def send(port: int, attempt: Attempt) -> Attempt:
    """One transaction on a new connection (blocking); fills in the attempt's outcome."""
    dot_sent = False
    try:
        with socket_to(port) as sock:
            lines = Lines(sock)

            def command(line: str, expected: str) -> None:
                sock.sendall(line.encode("ascii") + b"\r\n")
                reply = lines.reply()[-1]
                if not reply.startswith(expected):
                    raise OSError(f"{line!r}: {reply!r}")

            if not lines.reply()[-1].startswith("220"):
                raise OSError("no greeting")
            command("EHLO client.example", "250")
            command(f"MAIL FROM:<{SENDER}> ENVID={attempt.token}", "250")
            for recipient in attempt.recipients:
                command(f"RCPT TO:<{recipient}>", "250")
            if attempt.bdat:
                content = content_of(attempt)[: -len(b".\r\n")]
                dot_sent = True
                sock.sendall(b"BDAT %d LAST\r\n" % len(content) + content)
            else:
                command("DATA", "354")
                dot_sent = True
                sock.sendall(content_of(attempt))
            attempt.reply = lines.reply()[-1]
            match = QUEUED_AS.match(attempt.reply)
            if match is not None:
                attempt.outcome, attempt.queue_id = ACCEPTED, match.group(1)
            else:
                attempt.outcome = REJECTED if attempt.reply[:1] in "45" else UNKNOWN
            try:
                sock.sendall(b"QUIT\r\n")
                lines.reply()
            except Exception:  # the server may die right after the 250: nothing lost
                pass
    except Exception as e:  # refused, reset, closed (Lines raises ConnectionBroke)
        if attempt.outcome == INCOMPLETE:
            attempt.reply = repr(e)
            attempt.outcome = UNKNOWN if dot_sent else INCOMPLETE
    return attempt


def socket_to(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    return sock


# -- the server process with a fault plan ----------------------------------------------------


class FaultyServer:
    """``mtrkmta serve --config FILE`` with MTRKMTA_FAULTS; its output read line by line."""

    def __init__(
        self, data_dir: Path, log_dir: Path, next_hop: str, plan: str, settings: str = ""
    ) -> None:
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.next_hop = next_hop  # the route target of relay.example
        self.plan = plan
        self.settings = settings  # more TOML for its configuration file
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self.eof = False
        self.changed = threading.Condition()

    def start(self) -> int:
        """Start on a fresh loopback port; return it once the SMTP listener is open."""
        failures = []
        for _ in range(3):  # another process may take the free port before the server binds it
            self.port = free_port()
            config = self.log_dir / "mtrkmta.toml"
            config.write_text(
                server_config(self.data_dir, self.port, self.next_hop) + self.settings, "utf-8"
            )
            self.lines, self.eof = [], False
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mtrkmta.cli.main", "serve", "--config", str(config)],
                cwd=self.log_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    ENVIRONMENT: self.plan,
                    "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(
                        p for p in (IMPORT_ROOT, os.environ.get("PYTHONPATH")) if p
                    ),
                },
            )
            threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
            if self.wait_for("smtp listening on", START_TIMEOUT):
                return self.port
            self.kill()
            failures.append(self.output())
        raise AssertionError("server did not start:\n" + "\n\n".join(failures))

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with open(self.log_dir / f"server-{proc.pid}.log", "wb") as log:  # kept for a failure
            for raw in proc.stdout:
                log.write(raw)
                with self.changed:
                    self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                    self.changed.notify_all()
        with self.changed:
            self.eof = True
            self.changed.notify_all()

    def wait_for(self, needle: str, timeout: float) -> bool:
        """Wait for a line of output holding ``needle``; False if the output ends first."""
        with self.changed:
            self.changed.wait_for(
                lambda: self.eof or any(needle in line for line in self.lines), timeout
            )
            return any(needle in line for line in self.lines)

    def died(self, timeout: float) -> int | None:
        """Wait for the process to end; its status, or None if it still runs."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.died(IO_TIMEOUT) is None:
                self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=IO_TIMEOUT)

    def output(self, tail: int = 60) -> str:
        with self.changed:
            return "\n".join(self.lines[-tail:])


def server_config(data_dir: Path, port: int, next_hop: str) -> str:
    return f"""
[server]
hostname = "{HOSTNAME}"
data_dir = "{data_dir}"
database = "{database_url(data_dir)}"

[listeners]
smtp = "tcp:{port}:interface=127.0.0.1"
submission = "none"
lmtp = "none"
mtqp = "none"
http = "none"

[domains]
local = ["{LOCAL}"]

[routes]
"{REMOTE}" = "{next_hop}"

[queue]
first_retry = "1s"
"""


def faulty_run(
    server: FaultyServer, plan: str, padding: int = 0, bdat: bool = False
) -> list[Attempt]:
    """Send every message once to the faulty server until it dies or the fault fires
    (blocking); the attempts as the client saw them."""
    point, action = plan.split(":")[:2]
    attempts = []
    try:
        port = server.start()
        for message in range(len(MESSAGES)):
            attempt = Attempt(message, f"m{message}-a0", padding=padding, bdat=bdat)
            attempts.append(send(port, attempt))
        if action == "crash":
            status = server.died(FAULT_WAIT)
            assert status == -signal.SIGKILL, (
                f"{plan}: the point was never reached (status {status}):\n{server.output()}"
            )
        else:
            assert server.wait_for(f"injected at {point}", FAULT_WAIT), (
                f"{plan}: no injected error in the log:\n{server.output()}"
            )
            # The error is passing: the same process finishes every message it took (a
            # deferred delivery comes back after queue.first_retry), without a restart.
            for attempt in attempts:
                if attempt.outcome == ACCEPTED:
                    done = f"{attempt.queue_id}: removed (every recipient final)"
                    assert server.wait_for(done, FAULT_WAIT), (
                        f"{plan}: {attempt.token} not finished:\n{server.output()}"
                    )
    finally:
        server.terminate()
    return attempts


# -- drain and audit ----------------------------------------------------------------------------


@dataclass
class Found:
    local: Counter[tuple[str, str]] = field(default_factory=Counter)  # (recipient, token)
    next_hop: Counter[tuple[str, str]] = field(default_factory=Counter)
    records: dict[str, object] = field(default_factory=dict)  # queue id -> StoredMessage
    quarantined: list[str] = field(default_factory=list)  # tokens of quarantined files
    # (recipient, token) the next hop took before the crash whose outcome was not committed
    in_flight: set[tuple[str, str]] = field(default_factory=set)


def read_maildirs(mail_root: Path) -> Counter[tuple[str, str]]:
    """Every copy in new/ or cur/ of every mailbox, by (Delivered-To, token)."""
    copies: Counter[tuple[str, str]] = Counter()
    for path in sorted(mail_root.glob("*/*/*")):
        if path.parent.name in ("new", "cur"):
            data = path.read_bytes()
            copies[(DELIVERED_TO.findall(data)[0].decode(), token_of(data))] += 1
    return copies


def read_new_mail(mail_root: Path) -> None:
    """Do what a mail reader does between the crash and the restart: move every copy from
    new/ to cur/ with the seen flag. (A retry must find the copy by its delivery key in
    either; in new/ the same name written again in the same second would hide a copy.)"""
    for path in sorted(mail_root.glob("*/new/*")):
        path.rename(path.parent.parent / "cur" / f"{path.name}:2,S")


def token_of(data: bytes) -> str:
    tokens = TOKEN.findall(data)
    assert len(tokens) == 1, f"tokens {tokens!r} in {data[:300]!r}"
    return tokens[0].decode()


def uncommitted_at_next_hop(database: str, fake: FakeMTA) -> set[tuple[str, str]]:
    """After the crash, before the restart: the (recipient, token) pairs the next hop has
    taken while the recipient's record is not final, which the retry sends again."""
    taken = {
        (recipient, token_of(t.content))
        for t in fake.transactions
        if t.content is not None
        for recipient in t.accepted
    }
    engine = create_engine(database)
    try:
        with engine.connect() as conn:
            final = {
                (address, envid)
                for address, envid in conn.execute(
                    text(
                        "SELECT r.address, m.envid FROM recipients r"
                        " JOIN messages m ON m.queue_id = r.queue_id"
                        " WHERE r.state IN ('relayed', 'transferred')"
                    )
                )
            }
    finally:
        engine.dispose()
    return taken - final


def every_queue_id(database: str) -> list[str]:
    engine = create_engine(database)
    try:
        with engine.connect() as conn:
            return list(conn.scalars(text("SELECT queue_id FROM messages")))
    finally:
        engine.dispose()


async def drain_and_audit(
    data_dir: Path, fake: FakeMTA, route: str, attempts: list[Attempt]
) -> tuple[list[Attempt], Found]:
    """Restart (in-process, no faults), send again what was not acknowledged, drain, read."""
    found = Found()
    found.in_flight = await threads.deferToThread(
        uncommitted_at_next_hop, database_url(data_dir), fake
    )
    node = await start_node(
        node_config(
            data_dir,
            hostname=HOSTNAME,
            listeners=("smtp",),
            options=(
                ("domains.local", (LOCAL,)),
                ("routes", f"{REMOTE}={route}"),
                ("queue.first_retry", "1s"),
            ),
        )
    )
    try:
        assert node.spool is not None and node.tracking is not None
        acknowledged = {a.message for a in attempts if a.outcome == ACCEPTED}
        for message in range(len(MESSAGES)):
            if message not in acknowledged:
                again = await threads.deferToThread(
                    send, node.port("smtp"), Attempt(message, f"m{message}-a1")
                )
                assert again.outcome == ACCEPTED, f"after restart: {again}"
                attempts.append(again)
        await queue_emptied(node, timeout=20)
        assert await node.tracking.queued_messages(node.config.node_id) == []
        assert os.listdir(node.spool.root / "incoming") == []
        for queue_id in await threads.deferToThread(every_queue_id, database_url(data_dir)):
            found.records[queue_id] = await node.tracking.message(queue_id)
        quarantine = node.spool.root / "quarantine"
        if quarantine.exists():
            found.quarantined = [token_of(p.read_bytes()) for p in sorted(quarantine.iterdir())]
    finally:
        await stop_node(node)
    found.local = read_maildirs(data_dir / "mail")
    for transaction in fake.transactions:
        if transaction.content is not None:
            token = token_of(transaction.content)
            for recipient in transaction.accepted:
                found.next_hop[(recipient, token)] += 1
    return attempts, found


def check(plan: str, attempts: list[Attempt], found: Found) -> None:
    point = plan.split(":")[0]
    context = f"{plan}: attempts {[(a.token, a.outcome, a.reply) for a in attempts]}; {found}"
    by_token = {a.token: a for a in attempts}
    # What start-up recovery did with the first message's file (doc/architecture.rst).
    # (A crash in the delivery path may also catch a later message in that window.)
    if plan.endswith(":crash") and point in QUARANTINED_AT:
        assert found.quarantined == ["m0-a0"], f"quarantined; {context}"
    if point == "transport.reply_received":
        # The next hop took it, the outcome was not recorded: the retry sends it again.
        assert 2 in found.next_hop.values(), context
    if point == "tracking.arrival_committed":
        # Committed, then the crash: kept and delivered, though its client saw no 250 and
        # sent it again (RFC 5321 §6.1): message 0 arrives twice, under two tokens.
        assert by_token["m0-a0"].outcome == UNKNOWN, context
        assert found.local[(MESSAGES[0][0], "m0-a0")] == 1, context
    # Every message acknowledged exactly once in the end (the client stops at its 250).
    assert sorted(a.message for a in attempts if a.outcome == ACCEPTED) == list(
        range(len(MESSAGES))
    ), context
    # Every copy anywhere belongs to an attempt that may have been taken.
    for (_, token), _count in (found.local + found.next_hop).items():
        assert by_token[token].outcome in (ACCEPTED, UNKNOWN), f"{token} delivered; {context}"
    # A quarantined file was never acknowledged.
    for token in found.quarantined:
        assert by_token[token].outcome != ACCEPTED, f"{token} quarantined; {context}"
    # Every tracking record: of an attempt that may have been taken, every recipient final
    # and delivered, and its state agrees with where the message is.
    records = {}
    for queue_id, record in found.records.items():
        assert record is not None and record.envid in by_token, f"{queue_id}; {context}"
        records[record.envid] = record
        for recipient in record.recipients:
            assert recipient.state in FINAL_STATES, (
                f"{record.envid} {recipient.address} {recipient.state}; {context}"
            )
            where = found.local if recipient.address.endswith(LOCAL) else found.next_hop
            assert where[(recipient.address, record.envid)] >= 1, (
                f"{record.envid} to {recipient.address} recorded delivered, not there; {context}"
            )
    for attempt in attempts:
        tracked = records.get(attempt.token)
        if attempt.outcome == ACCEPTED:
            assert tracked is not None and tracked.queue_id == attempt.queue_id, (
                f"acknowledged {attempt.token} has no record; {context}"
            )
        for recipient in attempt.recipients:
            key = (recipient, attempt.token)
            if recipient.endswith(LOCAL):
                copies = found.local[key]
                assert copies <= 1, f"{key}: {copies} copies in the Maildir; {context}"
            else:
                copies = found.next_hop[key]
                may_repeat = point in NEXT_HOP_MAY_DUPLICATE or key in found.in_flight
                limit = 2 if may_repeat else 1
                assert copies <= limit, f"{key}: {copies} copies at the next hop; {context}"
            if attempt.outcome == ACCEPTED:
                assert copies >= 1, f"acknowledged {key} lost; {context}"
            if tracked is None:
                assert copies == 0, f"{key} delivered without a tracking record; {context}"


async def run_case(
    tmp_path: Path, plan: str, protocol: str = "smtp", *, streamed: bool = False, bdat: bool = False
) -> None:
    """One fault plan, with an SMTP (or LMTP) next hop for relay.example; ``streamed``:
    messages larger than limits.data_buffer, written to spool/incoming/ as they arrive."""
    data_dir, log_dir = tmp_path / "data", tmp_path / "logs"
    log_dir.mkdir()
    fake = await FakeMTA(lmtp=protocol == "lmtp", hostname="next-hop.example.test").start()
    route = f"{protocol}:{fake.endpoint}"
    try:
        settings = '\n[limits]\ndata_buffer = "4K"\n' if streamed else ""
        server = FaultyServer(data_dir, log_dir, route, plan, settings)
        padding = 200 if streamed else 0  # 12.8 KiB: streamed in more than one write
        attempts = await threads.deferToThread(faulty_run, server, plan, padding, bdat)
        if plan == "spool.write:crash":
            # What recovery will find: the file of the first message, created and, when
            # streamed, holding the content that arrived (the envelope not yet appended).
            left = [p.stat().st_size for p in (data_dir / "spool" / "incoming").iterdir()]
            assert len(left) == 1 and (left[0] > 4096 if streamed else left[0] == 0), left
        read_new_mail(data_dir / "mail")
        attempts, found = await drain_and_audit(data_dir, fake, route, attempts)
    finally:
        await fake.stop()
    how = f"{protocol}, streamed" if streamed else protocol
    outcomes = [(a.token, a.outcome) for a in attempts]
    print(f"fault point covered: {plan} ({how}): {outcomes}; in flight {sorted(found.in_flight)}")
    check(plan, attempts, found)


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("point", [p for p in CRASH_POINTS if p not in PICKUP_POINTS])
@pytest_twisted.ensureDeferred
async def test_crash_at(tmp_path, point):
    await run_case(tmp_path, f"{point}:crash")


@pytest.mark.parametrize("point", ["spool.synced", "tracking.arrival_committed", "smtp.reply_sent"])
@pytest_twisted.ensureDeferred
async def test_crash_with_bdat_at(tmp_path, point):
    """BDAT LAST (RFC 3030) reaches the same accept path as DATA: the same guarantees."""
    await run_case(tmp_path, f"{point}:crash", bdat=True)


@pytest.mark.parametrize("point", PICKUP_POINTS)
@pytest_twisted.ensureDeferred
async def test_crash_in_pickup_at(tmp_path, point):
    """sendmail's message queued from the pickup directory, then the crash before its file
    is removed: the restarted node finds it queued, removes the file and delivers it once."""
    data_dir, log_dir = tmp_path / "data", tmp_path / "logs"
    log_dir.mkdir()
    settings = '\n[pickup]\npoll_interval = "1s"\n'
    server = FaultyServer(
        data_dir, log_dir, "smtp:tcp:host=127.0.0.1:port=9", f"{point}:crash", settings
    )
    try:
        await threads.deferToThread(server.start)
        config = log_dir / "mtrkmta.toml"
        done = await threads.deferToThread(
            run_sendmail,
            config,
            [f"alice@{LOCAL}"],
            b"Subject: pickup\nX-Fault-Token: m0-a0\n\nbody\n",
        )
        assert done.returncode == 0, done.stderr
        status = await threads.deferToThread(server.died, FAULT_WAIT)
        assert status == -signal.SIGKILL, f"{point} never reached:\n{server.output()}"
    finally:
        server.terminate()
    [left] = list((data_dir / "pickup").iterdir())  # queued, not yet removed
    node = await start_node(
        node_config(
            data_dir, hostname=HOSTNAME, listeners=(), options=(("domains.local", (LOCAL,)),)
        )
    )
    try:
        await queue_emptied(node, timeout=20)
        # The pickup's first scan finds the message queued and only removes its file; it
        # may finish after the delivery (a slower store, e.g. PostgreSQL).
        await until(lambda: not list((data_dir / "pickup").iterdir()), "the file's removal")
        record = await node.tracking.message(left.name)
        assert [r.state for r in record.recipients] == [RecipientState.DELIVERED]
    finally:
        await stop_node(node)
    assert read_maildirs(data_dir / "mail") == Counter({(f"alice@{LOCAL}", "m0-a0"): 1})
    print(f"fault point covered: {point}:crash (pickup)")


@pytest.mark.parametrize("point", ["transport.data_sent", "transport.reply_received"])
@pytest_twisted.ensureDeferred
async def test_crash_at_lmtp_next_hop(tmp_path, point):
    await run_case(tmp_path, f"{point}:crash", "lmtp")


@pytest.mark.parametrize(
    "plan", ["spool.write:crash", "spool.written:crash", "spool.renamed:crash", "spool.write:eio"]
)
@pytest_twisted.ensureDeferred
async def test_streamed_message_at(tmp_path, plan):
    await run_case(tmp_path, plan, streamed=True)


@pytest.mark.parametrize("plan", ERRORS)
@pytest_twisted.ensureDeferred
async def test_failed_write_at(tmp_path, plan):
    await run_case(tmp_path, plan)


def test_every_point_is_covered():
    """Every point of mtrkmta.faults.POINTS has its crash case, and each injected error names
    a known point: a new point fails here until it is added to CRASH_POINTS."""
    assert list(CRASH_POINTS) == list(POINTS)
    assert {plan.split(":")[0] for plan in ERRORS} <= set(POINTS)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("spool.nowhere:crash", "unknown point 'spool.nowhere'"),
        ("spool.write:explode", "unknown action 'explode'"),
    ],
)
def test_a_bad_fault_plan_is_a_one_line_start_up_error(tmp_path, spec, problem):
    result = subprocess.run(
        [sys.executable, "-m", "mtrkmta.cli.main", "serve", "--data-dir", str(tmp_path)],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=START_TIMEOUT,
        env={**os.environ, ENVIRONMENT: spec, "PYTHONPATH": IMPORT_ROOT},
    )
    assert result.returncode == 2, result
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mtrkmta: {ENVIRONMENT}: {problem}"), lines
