"""`mtrkmta queue ...` against a running node, over its control socket.

A whole node runs in-process and relays ``relay.example`` to a FakeMTA that answers
451 to the recipient, so the message stays deferred (next attempt in an hour) with
a last error. The CLI's ``main()`` talks to the node's ``data_dir/control.sock``
with a blocking socket, so it runs in a thread while the reactor serves it.
"""

from __future__ import annotations

import io
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_twisted
from fakemta import FakeMTA
from smtpwire import Wire, in_thread, queue_emptied, queue_id_of, until
from twisted.internet import reactor

from mtrkmta.cli.queue import main
from mtrkmta.queue.control import SOCKET_NAME
from mtrkmta.queue.service import QueueEvent
from mtrkmta.service import MTAService
from mtrkmta.testing import node_config, start_node, stop_node
from mtrkmta.tracking.interfaces import RecipientState, StoredMessage

RELAY_DOMAIN = "relay.example"
SENDER = "sender@localhost"  # any DSN goes to a local Maildir, not out by MX
RCPT = f"bob@{RELAY_DOMAIN}"
BUSY = f"451 4.2.1 <{RCPT}>: mailbox busy"
CERTIFIER_B64 = "ZGVmZ2hpamtsbW5vcHFyc3R1dnc="  # 20 octets
CONTENT = b"From: sender@localhost\r\nSubject: queued\r\n\r\nHello.\r\n"
UNKNOWN_ID = "nosuchqueueid000000"


# -- helpers -------------------------------------------------------------------------


@dataclass
class Run:
    """What one ``mtrkmta queue`` run did."""

    code: int
    out: str
    err: str
    prompts: list[str] = field(default_factory=list)


def run_cli(data_dir: Path, args: Sequence[str], answer: str | None = None) -> Run:
    """Blocking: ``mtrkmta queue --data-dir DATA_DIR ARGS``; ``answer`` replies to a prompt."""
    out, err = io.StringIO(), io.StringIO()
    prompts: list[str] = []

    def ask(prompt: str) -> str:
        prompts.append(prompt)
        if answer is None:
            raise AssertionError(f"unexpected prompt {prompt!r}")
        return answer

    code = main(["--data-dir", str(data_dir), *args], out, err, ask)
    return Run(code, out.getvalue(), err.getvalue(), prompts)


class Rig:
    """A node relaying ``relay.example`` to a FakeMTA that defers the recipient."""

    def __init__(self, tmp_path: Path, fake: FakeMTA, options: Sequence[tuple[str, object]]):
        self.fake = fake
        self.data_dir = tmp_path / "data"
        self.config = node_config(
            self.data_dir,
            listeners=("smtp",),
            options=(
                ("routes", f"{RELAY_DOMAIN}=smtp:{fake.endpoint};tls=none"),
                ("durability.fsync", False),
                *options,
            ),
        )
        self.node: MTAService | None = None
        self.events: list[QueueEvent] = []

    async def cli(self, *args: str, answer: str | None = None) -> Run:
        result: Run = await in_thread(run_cli, self.data_dir, args, answer)
        return result

    async def deferred_message(self, mail_params: str = "") -> str:
        """Send one message to RCPT and wait until its first attempt was deferred."""
        assert self.node is not None
        queue_id = await in_thread(send, self.node.port("smtp"), mail_params)
        await until(lambda: self.attempts(queue_id), "the first attempt")
        (rcpt,) = (await self.stored(queue_id)).recipients
        assert rcpt.state is RecipientState.DEFERRED
        return queue_id

    def attempts(self, queue_id: str) -> int:
        """How many attempts of ``queue_id`` the queue recorded so far."""
        return sum(1 for e in self.events if e.message.queue_id == queue_id)

    def rcpt_commands(self) -> int:
        """How many RCPT commands reached the fake: one per delivery attempt here."""
        return sum(len(t.rcpts) for t in self.fake.transactions)

    async def stored(self, queue_id: str) -> StoredMessage:
        assert self.node is not None and self.node.tracking is not None
        message = await self.node.tracking.message(queue_id)
        assert message is not None
        return message

    async def spooled(self) -> list[str]:
        assert self.node is not None and self.node.spool is not None
        return list(await self.node.spool.queue_ids())


def send(port: int, mail_params: str) -> str:
    """Blocking: one message from SENDER to RCPT; its queue id."""
    with Wire(port) as wire:
        assert wire.ehlo().code == 250
        reply = wire.command(f"MAIL FROM:<{SENDER}> {mail_params}".rstrip())
        assert reply.code == 250, str(reply)
        assert wire.command(f"RCPT TO:<{RCPT}>").code == 250
        queue_id = queue_id_of(wire.data(CONTENT))
        assert wire.command("QUIT").code == 221
    return queue_id


@asynccontextmanager
async def queue_node(
    tmp_path: Path, options: Sequence[tuple[str, object]] = (("queue.first_retry", "1h"),)
) -> AsyncIterator[Rig]:
    """A FakeMTA deferring RCPT and a running node relaying to it; both stopped afterwards."""
    fake = await FakeMTA(reactor).start()
    fake.rcpt_replies[RCPT] = BUSY
    rig = Rig(tmp_path, fake, options)
    try:
        rig.node = await start_node(rig.config)
        assert rig.node.queue is not None
        rig.node.queue.observers.append(rig.events.append)
        yield rig
    finally:
        try:
            if rig.node is not None:
                await stop_node(rig.node)
        finally:
            await fake.stop()


def block_of(listing: str, queue_id: str) -> list[str]:
    """The lines of ``queue_id``'s block in a ``list`` output (up to the blank line)."""
    lines = listing.splitlines()
    (start,) = [
        i for i, line in enumerate(lines) if line.split()[:1] in ([queue_id], [queue_id + "!"])
    ]
    block = []
    for line in lines[start:]:
        if not line.strip():
            break
        block.append(line)
    return block


def show_fields(output: str) -> dict[str, str]:
    """``Name: value`` lines of a ``show`` output (the first of each name)."""
    fields: dict[str, str] = {}
    for line in output.splitlines():
        name, _, value = line.strip().partition(":")
        fields.setdefault(name, value.strip())
    return fields


# -- the control socket ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_control_socket_is_a_private_unix_socket(tmp_path):
    # Only the node's own user may drive the queue: the socket is mode 0600.
    async with queue_node(tmp_path) as rig:
        mode = os.stat(rig.data_dir / SOCKET_NAME).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600


# -- list and show ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_list_is_mailq_like_with_the_last_error(tmp_path):
    # The queue as the tracking store has it (RFC 3886 §3.3: queue state, last reply).
    async with queue_node(tmp_path) as rig:
        empty = await rig.cli("list")
        assert (empty.code, empty.out.strip(), empty.err) == (0, "Mail queue is empty", "")

        queue_id = await rig.deferred_message()
        stored = await rig.stored(queue_id)
        listed = await rig.cli("list")
        assert (listed.code, listed.err) == (0, "")
        head, *rest = block_of(listed.out, queue_id)
        assert head.split()[0] == queue_id  # no "!": not held
        assert head.split()[1] == str(stored.size)
        assert head.endswith(f"  {SENDER}")
        assert any(line.strip() == f"(smtp; {BUSY})" for line in rest)
        assert any(line.strip().startswith(f"{RCPT}  [deferred, next ") for line in rest)
        assert listed.out.rstrip().endswith("-- 1 message(s) in the queue")


@pytest_twisted.ensureDeferred
async def test_json_list_gives_the_records_without_the_certifier(tmp_path):
    # RFC 3885 §3.1 stores B; the admin listing says the message is tracked, no more.
    async with queue_node(tmp_path) as rig:
        queue_id = await rig.deferred_message(f"ENVID=q@cli.test MTRK={CERTIFIER_B64}:3600")
        listed = await rig.cli("--json", "list")
        assert listed.code == 0
        (record,) = json.loads(listed.out)
        assert record["queue_id"] == queue_id
        assert (record["sender"], record["envid"], record["held"]) == (SENDER, "q@cli.test", False)
        assert record["certifier"] == "(set)"  # tracked, but the certifier is not shown
        assert CERTIFIER_B64 not in listed.out
        (rcpt,) = record["recipients"]
        assert (rcpt["address"], rcpt["state"], rcpt["status"]) == (RCPT, "deferred", "4.2.1")
        assert rcpt["diagnostic"] == f"smtp; {BUSY}"
        assert rcpt["next_attempt"] > time.time() + 3000  # queue.first_retry = 1h


@pytest_twisted.ensureDeferred
async def test_show_gives_the_message_and_its_recipients(tmp_path):
    # RFC 3886 §3.3: per recipient, state, Status, Remote-MTA, diagnostic, attempt times.
    async with queue_node(tmp_path) as rig:
        queue_id = await rig.deferred_message()
        shown = await rig.cli("show", queue_id)
        assert (shown.code, shown.err) == (0, "")
        fields = show_fields(shown.out)
        assert fields["Queue-Id"] == queue_id
        assert fields["Held"] == "no"
        assert fields["Sender"] == f"<{SENDER}>"
        assert fields["Recipient"] == f"<{RCPT}>"
        assert fields["State"] == "deferred"
        assert fields["Status"] == "4.2.1"
        assert fields["Diagnostic"] == f"smtp; {BUSY}"
        assert fields["Remote-mta"] == "dns; [127.0.0.1]"
        assert fields["Attempts"] == "1"
        assert "Next-attempt" in fields


def event_lines(output: str) -> list[list[str]]:
    """The ``Events:`` section of a ``show`` output: each line split into its time (four
    words), kind, recipient and detail."""
    lines = output.splitlines()
    start = lines.index("Events:")
    rows = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        words = line.split(None, 6)
        rows.append([" ".join(words[:4]), *words[4:]])
    return rows


@pytest_twisted.ensureDeferred
async def test_show_lists_the_events_in_time_order(tmp_path):
    # Deferred once (451), held and released by the administrator, then relayed: each
    # change is an event with its time, the attempts with their next hop.
    async with queue_node(tmp_path) as rig:
        queue_id = await rig.deferred_message()
        assert (await rig.cli("hold", queue_id)).code == 0
        rig.fake.rcpt_replies.clear()  # the next attempt is accepted
        assert (await rig.cli("release", queue_id)).code == 0
        assert (await rig.cli("flush", queue_id)).code == 0  # not due for an hour
        await until(lambda: rig.attempts(queue_id) == 2, "the attempt after release")
        shown = await rig.cli("show", queue_id)
        assert (shown.code, shown.err) == (0, "")
        rows = event_lines(shown.out)
        assert [row[1:3] for row in rows] == [
            ["arrived", "-"],
            ["deferred", f"<{RCPT}>"],
            ["held", "-"],
            ["released", "-"],
            ["relayed", f"<{RCPT}>"],
        ]
        arrived, deferred, held, _, relayed = (row[3] if len(row) > 3 else "" for row in rows)
        assert "listener=smtp" in arrived and "client=" in arrived
        port = rig.fake.endpoint.rpartition("=")[2]
        assert f"relay=127.0.0.1[127.0.0.1]:{port}" in deferred
        assert "status=4.2.1" in deferred and f'diagnostic="smtp; {BUSY}"' in deferred
        assert "next-attempt=" in deferred
        assert held == 'reason="held by the administrator"'
        assert f"relay=127.0.0.1[127.0.0.1]:{port}" in relayed and "status=2." in relayed
        # The same events, in JSON, for scripts.
        record = json.loads((await rig.cli("--json", "show", queue_id)).out)
        assert [e["kind"] for e in record["events"]] == [row[1] for row in rows]
        assert record["events"][1]["recipient"] == 0
        times = [e["time"] for e in record["events"]]
        assert times == sorted(times)


# -- hold, release, flush ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hold_marks_the_message_and_stops_its_retries(tmp_path):
    # A held message stays queued (still `delayed`, still tracked) but is not tried on
    # flush. (That its retry time passes without an attempt is tested on a clock in
    # tests/unit/test_queue_service.py.)
    async with queue_node(tmp_path) as rig:
        queue_id = await rig.deferred_message()
        held = await rig.cli("hold", queue_id)
        assert (held.code, held.out.strip()) == (0, f"{queue_id}: hold done")
        (rcpt,) = (await rig.stored(queue_id)).recipients
        assert rcpt.next_attempt is not None

        listed = await rig.cli("list")
        assert block_of(listed.out, queue_id)[0].split()[0] == f"{queue_id}!"
        shown = await rig.cli("show", queue_id)
        assert show_fields(shown.out)["Held"] == "yes"
        # A flush does not get it tried while it is held.
        flushed = await rig.cli("flush", queue_id)
        assert flushed.code == 0
        assert (await rig.cli("show", queue_id)).code == 0  # the flush request was handled
        assert rig.rcpt_commands() == 1
        assert rig.attempts(queue_id) == 1
        assert queue_id in await rig.spooled()


@pytest_twisted.ensureDeferred
async def test_release_lets_a_held_message_be_tried_again(tmp_path):
    async with queue_node(tmp_path) as rig:
        queue_id = await rig.deferred_message()
        assert (await rig.cli("hold", queue_id)).code == 0
        released = await rig.cli("release", queue_id)
        assert (released.code, released.out.strip()) == (0, f"{queue_id}: release done")
        assert (await rig.stored(queue_id)).held is False
        listed = await rig.cli("list")
        assert block_of(listed.out, queue_id)[0].split()[0] == queue_id
        assert (await rig.cli("flush", queue_id)).code == 0
        await until(lambda: rig.attempts(queue_id) == 2, "the attempt after release")
        assert rig.rcpt_commands() == 2


@pytest_twisted.ensureDeferred
async def test_flush_attempts_at_once_ignoring_the_retry_time(tmp_path):
    # Each flushed attempt is recorded like any other (RFC 3886 §3.3.3 `relayed`).
    async with queue_node(tmp_path) as rig:
        queue_id = await rig.deferred_message()
        (rcpt,) = (await rig.stored(queue_id)).recipients
        assert rcpt.next_attempt > time.time() + 3000  # not due for an hour
        flushed = await rig.cli("flush")
        assert (flushed.code, flushed.out.strip()) == (0, "flushed 1 message(s)")
        await until(lambda: rig.attempts(queue_id) == 2, "the flushed attempt")
        assert rig.rcpt_commands() == 2
        (rcpt,) = (await rig.stored(queue_id)).recipients
        assert (rcpt.state, rcpt.attempts) == (RecipientState.DEFERRED, 2)

        rig.fake.rcpt_replies.clear()
        one = await rig.cli("flush", queue_id)
        assert (one.code, one.out.strip()) == (0, "flushed 1 message(s)")
        await until(lambda: rig.attempts(queue_id) == 3, "the second flushed attempt")
        (rcpt,) = (await rig.stored(queue_id)).recipients
        assert (rcpt.state, rcpt.status) == (RecipientState.RELAYED, "2.1.9")


# -- delete and bounce ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delete_asks_for_confirmation(tmp_path):
    # Deleting drops the message without any DSN: destructive, so it is confirmed first.
    # Until then RFC 3885 §3.1 holds: queued means tracked. Its record stays, for
    # tracking: failed by the administrator.
    async with queue_node(tmp_path) as rig:
        queue_id = await rig.deferred_message()
        declined = await rig.cli("delete", queue_id, answer="n")
        assert (declined.code, declined.out, declined.err.strip()) == (1, "", "nothing done")
        assert len(declined.prompts) == 1 and queue_id in declined.prompts[0]
        assert queue_id in await rig.spooled()
        assert (await rig.stored(queue_id)).recipients[0].state is RecipientState.DEFERRED

        deleted = await rig.cli("--yes", "delete", queue_id)  # asks nothing
        assert (deleted.code, deleted.out.strip()) == (0, f"{queue_id}: delete done")
        assert queue_id not in await rig.spooled()
        (rcpt,) = (await rig.stored(queue_id)).recipients
        assert (rcpt.state, rcpt.diagnostic) == (
            RecipientState.FAILED,
            "x-local; deleted by the administrator",
        )
        assert queue_id not in (await rig.cli("list")).out
        shown = await rig.cli("show", queue_id)
        assert event_lines(shown.out)[-1][1:3] == ["deleted", f"<{RCPT}>"]


@pytest_twisted.ensureDeferred
async def test_bounce_fails_every_queued_recipient(tmp_path):
    # RFC 3886 §3.3.3, RFC 3461 §5.2.6: the administrator gives up on the message: its recipients
    # fail 5.0.0 (RFC 3463 "other undefined status"), the diagnostic says the administrator
    # bounced it, then the last remote reply (which is not the reason), and the message
    # leaves the spool.
    async with queue_node(tmp_path) as rig:
        queue_id = await rig.deferred_message()
        bounced = await rig.cli("--yes", "bounce", queue_id)
        assert (bounced.code, bounced.out.strip()) == (0, f"{queue_id}: bounce done")
        assert queue_id not in await rig.spooled()
        (rcpt,) = (await rig.stored(queue_id)).recipients
        assert (rcpt.state, rcpt.action, rcpt.status) == (RecipientState.FAILED, "failed", "5.0.0")
        assert (
            rcpt.diagnostic == f"x-local; bounced by the administrator (last attempt: smtp; {BUSY})"
        )
        # (The failure DSN to the sender may be in the queue for a moment.)
        assert queue_id not in (await rig.cli("list")).out


# -- damaged queue files ----------------------------------------------------------------------


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:30])
    elif how == "bit-flipped":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1 :])
    elif how == "zeroed":
        path.write_bytes(bytes(len(data)))
    else:  # a directory where the file was
        path.unlink()
        path.mkdir()


@pytest_twisted.ensureDeferred
async def test_damaged_queue_files_are_quarantined_listed_released_and_deleted(tmp_path):
    # The node is stopped, four queue files are damaged four ways, and it starts again:
    # each is moved to quarantine at its first read, its recipient fails (5.3.0), the
    # sender gets a DSN built from the tracking record, and `queue list` shows them.
    ways = ("truncated", "bit-flipped", "zeroed", "a-directory")
    async with queue_node(tmp_path) as rig:
        ids = [await rig.deferred_message() for _ in ways]
        assert rig.node is not None and rig.node.spool is not None
        paths = [rig.node.spool.queue_path(queue_id) for queue_id in ids]
        originals = [path.read_bytes() for path in paths]
        await stop_node(rig.node)
        for path, how in zip(paths, ways, strict=True):
            damage(path, how)
        rig.node = await start_node(rig.config)
        node = rig.node
        # Their retries are an hour away: the flush makes this their first read.
        assert (await rig.cli("flush")).out.strip() == "flushed 4 message(s)"
        quarantine = rig.data_dir / "spool" / "quarantine"
        await until(
            lambda: (
                quarantine.is_dir() and sorted(p.name for p in quarantine.iterdir()) == sorted(ids)
            ),
            "quarantine",
        )

        async def all_failed() -> bool:
            for queue_id in ids:
                (rcpt,) = (await rig.stored(queue_id)).recipients
                if rcpt.state is not RecipientState.FAILED:
                    return False
            return True

        def dsns() -> list[bytes]:
            return [
                p.read_bytes()
                for p in (rig.data_dir / "mail").rglob("*")
                if p.is_file() and p.parent.name == "new"
            ]

        await until(all_failed, "the four recipients recorded as failed")
        await until(lambda: len(dsns()) == 4, "the four DSNs in the sender's Maildir")
        await queue_emptied(node)
        for queue_id in ids:
            (rcpt,) = (await rig.stored(queue_id)).recipients
            assert (rcpt.state, rcpt.status) == (RecipientState.FAILED, "5.3.0")
        assert sum(b"Status: 5.3.0" in dsn for dsn in dsns()) == 4

        listed = await rig.cli("list")
        assert listed.code == 0
        assert listed.out.startswith("Mail queue is empty")
        lines = {line.split()[0]: line for line in listed.out.splitlines() if line.strip()}
        assert all(queue_id in lines for queue_id in ids)
        assert "checksum mismatch" in lines[ids[1]]
        assert "a directory" in lines[ids[3]]
        assert "-- 4 message(s) in quarantine" in listed.out
        shown = await rig.cli("show", ids[0])
        assert show_fields(shown.out)["Quarantined"].startswith(f"{ids[0]}: ")
        assert show_fields(shown.out)["State"] == "failed"

        refused = await rig.cli("release", ids[2])
        assert refused.code == 1
        assert "still damaged" in refused.err
        (quarantine / ids[2]).write_bytes(originals[2])  # repaired
        released = await rig.cli("release", ids[2])
        assert (released.code, released.out.strip()) == (0, f"{ids[2]}: release done")
        assert (await rig.stored(ids[2])).quarantine_reason is None

        async def deferred_again() -> bool:
            (rcpt,) = (await rig.stored(ids[2])).recipients
            return rcpt.state is RecipientState.DEFERRED  # the next hop still defers

        await until(deferred_again, "the attempt after release")
        assert rig.rcpt_commands() == len(ways) + 1

        deleted = await rig.cli("--yes", "delete", ids[0])
        assert deleted.code == 0
        assert sorted(p.name for p in quarantine.iterdir()) == sorted([ids[1], ids[3]])


# -- errors -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_queue_id_is_an_error(tmp_path):
    # An unknown id is an error for every command that takes one (exit status 1).
    async with queue_node(tmp_path) as rig:
        for args in (
            ("show", UNKNOWN_ID),
            ("hold", UNKNOWN_ID),
            ("release", UNKNOWN_ID),
            ("--yes", "delete", UNKNOWN_ID),
            ("--yes", "bounce", UNKNOWN_ID),
        ):
            run = await rig.cli(*args)
            assert run.code == 1, args
            assert run.out == ""
            assert run.err.strip() == f"mtrkmta: no message {UNKNOWN_ID} in this node's queue"


@pytest_twisted.ensureDeferred
async def test_no_server_running(tmp_path):
    never = await in_thread(run_cli, tmp_path / "never-started", ["list"])
    assert (never.code, never.out) == (1, "")
    assert never.err.startswith("mtrkmta: ")
    assert never.err.rstrip().endswith("is mtrkmta running?")

    async with queue_node(tmp_path):
        pass
    stopped = await in_thread(run_cli, tmp_path / "data", ["list"])
    assert (stopped.code, stopped.out) == (1, "")
    assert stopped.err.rstrip().endswith("is mtrkmta running?")


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([], id="no-command"),
        pytest.param(["frobnicate"], id="unknown-command"),
        pytest.param(["show"], id="show-without-id"),
        pytest.param(["hold"], id="hold-without-id"),
        pytest.param(["list", "QID"], id="list-with-id"),
        pytest.param(["--bogus", "list"], id="unknown-option"),
        pytest.param(["show", "a", "b"], id="too-many-arguments"),
    ],
)
def test_usage_errors_exit_2(tmp_path, args):
    run = run_cli(tmp_path / "data", args)
    assert (run.code, run.out, run.prompts) == (2, "", [])
    # One line naming the problem, one saying where help is (no usage text).
    problem, help_line = run.err.splitlines()
    assert problem.startswith("mtrkmta queue: ")
    assert help_line == "Try 'mtrkmta queue --help'."
