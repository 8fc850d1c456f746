"""sendmail's option parser and message preparation, the pickup file codec, and the node's
pickup of the files (with in-memory stores and a clock)."""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import fail, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from mtrkmta.cli.sendmail import (
    EX_DATAERR,
    EX_USAGE,
    Invocation,
    MessageTooBig,
    UsageProblem,
    complete_message,
    parse_args,
    read_content,
    run,
)
from mtrkmta.envelope import ClientInfo, Envelope, MailParams, Mtrk, RcptParams, Recipient
from mtrkmta.faults import POINTS
from mtrkmta.receive.acceptor import Accepted, Acceptor
from mtrkmta.receive.pickup import Pickup, checked_envelope, received_header
from mtrkmta.spool.memory import MemorySpool
from mtrkmta.spool.pickup import (
    DIR_MODE,
    FILE_MODE,
    TEMP_PREFIX,
    PickupError,
    encode_pickup,
    ensure_pickup_directory,
    read_pickup,
    write_pickup,
)
from mtrkmta.tracking.memory import MemoryTrackingStore

QUEUE_ID = "1k1stjc5j0m6dmztc75s"

# -- the option parser ----------------------------------------------------------------------


def test_cron_invocation():
    # What cron runs: sendmail -FCronDaemon -i -B8BITMIME -oem root
    invocation = parse_args(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"])
    assert invocation == Invocation(recipients=["root"], ignore_dots=True, full_name="CronDaemon")


def test_options_of_php_git_and_logwatch():
    assert parse_args(["-t", "-i"]) == Invocation(extract=True, ignore_dots=True)
    assert parse_args(["-oi", "-f", "me@x.example", "a@x.example"]).ignore_dots
    invocation = parse_args(["-fme@x.example", "-oi", "a@x.example, b@x.example"])
    assert (invocation.sender, invocation.recipients) == (
        "me@x.example",
        ["a@x.example", "b@x.example"],
    )
    assert parse_args(["-f", "<>", "a"]).sender == ""
    assert parse_args(["-r", "bounce@x.example", "a"]).sender == "bounce@x.example"


def test_options_may_follow_recipients_and_double_dash_ends_them():
    assert parse_args(["root", "-t", "-v"]).extract
    assert parse_args(["--", "-odd"]).recipients == ["-odd"]


def test_dsn_options():
    invocation = parse_args(["-N", "failure,delay", "-R", "hdrs", "-V", "env-1", "a"])
    assert invocation.notify == frozenset({"FAILURE", "DELAY"})
    assert (invocation.ret, invocation.envid) == ("HDRS", "env-1")
    assert parse_args(["-Nnever", "a"]).notify == frozenset({"NEVER"})


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["-N", "sometimes", "a"], "-N sometimes: expected never"),
        (["-R", "body", "a"], "-R body: expected full or hdrs"),
        (["-V", "two words", "a"], "-V 'two words': expected 1 to 100 printable"),
        (["-V", "x" * 101, "a"], "expected 1 to 100 printable"),
        (["-bd"], "-bd is not supported"),
        (["-Q", "a"], "option -Q not recognized"),
        (["-f"], "option -f requires argument"),
        ([], "no recipients: give them as arguments or use -t"),
        (["-i"], "no recipients"),
    ],
)
def test_usage_problems(args, problem):
    with pytest.raises(UsageProblem, match=problem.replace("(", r"\(")):
        parse_args(args)


def test_modes_and_program_names():
    assert parse_args(["-bs"]).mode == "smtp"
    assert parse_args(["-bp"]).mode == "mailq"
    assert parse_args(["-bi"]).mode == "newaliases"
    assert parse_args(["-I"]).mode == "newaliases"
    assert parse_args(["-bm", "a"]).mode == "deliver"
    assert parse_args([], "mailq").mode == "mailq"
    assert parse_args([], "newaliases").mode == "newaliases"
    assert parse_args(["-C", "/etc/x.toml", "-bp"]).config == Path("/etc/x.toml")


def test_ignored_options_change_nothing():
    plain = parse_args(["a"])
    for ignored in (["-odi"], ["-oem"], ["-B", "7BIT"], ["-h", "3"], ["-U"], ["-m"], ["-n"]):
        assert parse_args([*ignored, "a"]) == plain, ignored


def test_a_usage_error_is_one_line_and_exit_64():
    err = io.StringIO()
    assert run("sendmail", ["-R", "x", "a"], io.BytesIO(), io.StringIO(), err) == EX_USAGE
    assert err.getvalue() == "sendmail: -R x: expected full or hdrs\n"


# -- reading and completing the message -------------------------------------------------------


def test_a_lone_dot_ends_the_message_unless_i():
    data = b"Subject: x\n\nline\n.\nafter\n"
    assert read_content(io.BytesIO(data), ignore_dots=False, limit=1000) == (
        b"Subject: x\r\n\r\nline\r\n"
    )
    assert read_content(io.BytesIO(data), ignore_dots=True, limit=1000) == (
        b"Subject: x\r\n\r\nline\r\n.\r\nafter\r\n"
    )
    assert read_content(io.BytesIO(b"a\r\n..\r\n"), ignore_dots=False, limit=100) == (
        b"a\r\n..\r\n"
    )


def test_a_message_over_the_limit_is_refused():
    with pytest.raises(MessageTooBig, match=r"limits.message_size \(10 octets\)"):
        read_content(io.BytesIO(b"0123456789\n"), ignore_dots=True, limit=10)


def complete(content: bytes, invocation: Invocation) -> tuple[bytes, list[str]]:
    return complete_message(
        content,
        invocation,
        sender="cron@mx.example",
        full_name="Cron Daemon",
        queue_id=QUEUE_ID,
        hostname="mx.example",
        now=0.0,
    )


def test_t_takes_to_cc_and_bcc_and_removes_bcc():
    content = (
        b"To: a@x.example,\r\n B <b@x.example>\r\nCc: c@x.example\r\n"
        b"Bcc: hidden@x.example,\r\n\tother@x.example\r\nFrom: me@x.example\r\n"
        b"Date: Thu, 1 Jan 1970 00:00:00 +0000\r\nMessage-ID: <m@x>\r\n\r\nbody\r\n"
    )
    out, recipients = complete(content, Invocation(extract=True, recipients=["arg@x.example"]))
    assert recipients == [
        "arg@x.example",
        "a@x.example",
        "b@x.example",
        "c@x.example",
        "hidden@x.example",
        "other@x.example",
    ]
    assert b"Bcc" not in out and b"hidden" not in out and b"other@" not in out
    assert out.endswith(
        b"From: me@x.example\r\nDate: Thu, 1 Jan 1970 00:00:00 +0000\r\n"
        b"Message-ID: <m@x>\r\n\r\nbody\r\n"
    )


def test_from_date_and_message_id_are_added_when_missing():
    out, recipients = complete(
        b"Subject: cron output\r\n\r\nok\r\n", Invocation(recipients=["root"])
    )
    fields, _, body = out.partition(b"\r\n\r\n")
    lines = fields.split(b"\r\n")
    assert lines[0] == b"Subject: cron output"
    assert lines[1] == b"From: Cron Daemon <cron@mx.example>"
    assert lines[2].startswith(b"Date: ")
    assert lines[3] == f"Message-ID: <{QUEUE_ID}@mx.example>".encode()
    assert (body, recipients) == (b"ok\r\n", ["root"])


def test_a_message_without_header_gets_one():
    out, _ = complete(b"just text\r\n", Invocation(recipients=["root"]))
    assert out.startswith(b"From: Cron Daemon <cron@mx.example>\r\nDate: ")
    assert out.endswith(b"\r\n\r\njust text\r\n")


# -- the pickup file codec ----------------------------------------------------------------


def envelope(**changes: object) -> Envelope:
    fields: dict[str, object] = {
        "queue_id": QUEUE_ID,
        "sender": "alice",
        "recipients": (Recipient("root", RcptParams(notify=frozenset({"FAILURE"}))),),
        "params": MailParams(envid="env 1", ret="HDRS"),
        "arrival": 1.0,
        "client": ClientInfo(address="", protocol="local", listener="pickup"),
    }
    fields.update(changes)
    return Envelope(**fields)  # type: ignore[arg-type]


def test_pickup_files_round_trip_with_their_owner(tmp_path):
    directory = ensure_pickup_directory(tmp_path)
    assert stat.S_IMODE(directory.stat().st_mode) == DIR_MODE
    old = os.umask(0o077)
    try:
        path = write_pickup(directory, envelope(), b"Subject: x\r\n\r\nbody\r\n")
    finally:
        os.umask(old)
    assert path == directory / QUEUE_ID
    assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE
    assert not any(p.name.startswith(TEMP_PREFIX) for p in directory.iterdir())
    assert read_pickup(path, 1000) == (envelope(), b"Subject: x\r\n\r\nbody\r\n", os.getuid())
    assert path.read_bytes() == encode_pickup(envelope(), b"Subject: x\r\n\r\nbody\r\n")


def bad_file(tmp_path: Path, data: bytes, name: str = QUEUE_ID) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_hostile_pickup_files_are_refused(tmp_path):
    good = encode_pickup(envelope(), b"x" * 100)
    cases = {
        "truncated: 5 octets": bad_file(tmp_path, good[:5]),
        "checksum mismatch": bad_file(tmp_path, good[:-3] + b"}}}", "a1"),
        "bad magic": bad_file(tmp_path, b"Z" * 40, "a2"),
        "message of 100 octets over limits.message_size (99)": None,
        "is not a queue id": bad_file(tmp_path, good, ".hidden"),
    }
    for problem, path in cases.items():
        if path is None:
            path = bad_file(tmp_path, good, "a3")
            with pytest.raises(PickupError, match=problem.replace("(", r"\(").replace(")", r"\)")):
                read_pickup(path, 99)
            continue
        with pytest.raises(PickupError, match=problem):
            read_pickup(path, 1000)
    (tmp_path / "d1").mkdir()
    with pytest.raises(PickupError, match="not a regular file"):
        read_pickup(tmp_path / "d1", 1000)
    os.mkfifo(tmp_path / "f1")
    with pytest.raises(PickupError, match="not a regular file"):
        read_pickup(tmp_path / "f1", 1000)
    (tmp_path / "l1").symlink_to(bad_file(tmp_path, good, "target"))
    with pytest.raises(OSError):
        read_pickup(tmp_path / "l1", 1000)  # O_NOFOLLOW: never through a link


def test_the_size_is_checked_before_the_content_is_read(tmp_path):
    # A header claiming a huge content is refused at once, whatever follows it.
    good = encode_pickup(envelope(), b"x")
    huge = good[:10] + struct.pack(">Q", 1 << 40) + good[18:]
    with pytest.raises(PickupError, match=r"over limits\.message_size"):
        read_pickup(bad_file(tmp_path, huge), 35 << 20)


def test_the_envelope_is_checked_and_the_origin_is_the_uid():
    checked = checked_envelope(
        envelope(
            params=MailParams(envid="env 1", ret="HDRS", mtrk=Mtrk(b"x" * 20), auth="someone"),
            client=ClientInfo(address="10.0.0.1", authenticated_as="admin", listener="smtp"),
        ),
        domain="mx.example",
        uid=1000,
        arrival=5.0,
    )
    assert checked.sender == "alice@mx.example"
    assert checked.recipients == (
        Recipient("root@mx.example", RcptParams(notify=frozenset({"FAILURE"}))),
    )
    assert checked.params == MailParams(envid="env 1", ret="HDRS")
    assert checked.client == ClientInfo(address="", protocol="local", listener="pickup")
    assert checked.arrival == 5.0


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"recipients": ()}, "no recipients"),
        ({"recipients": (Recipient("a b@x"),)}, "recipient <a b@x>: Bad recipient address"),
        ({"sender": "x@@y"}, "sender <x@@y>: Bad sender address"),
        ({"params": MailParams(ret="ALL")}, "Invalid RET"),
        (
            {"recipients": (Recipient("a@x.example", RcptParams(notify=frozenset({"LOUD"}))),)},
            "NOTIFY",
        ),
    ],
)
def test_a_bad_envelope_is_refused(changes, problem):
    with pytest.raises(PickupError, match=problem):
        checked_envelope(envelope(**changes), domain="mx.example", uid=0, arrival=0)


def test_received_header_names_the_uid():
    assert received_header("mx.example", 1000, QUEUE_ID, 0) == (
        b"Received: by mx.example (mtrkmta, from userid 1000)\r\n"
        b"\tid 1k1stjc5j0m6dmztc75s; Thu, 01 Jan 1970 00:00:00 +0000\r\n"
    )


def test_the_pickup_has_a_fault_point():
    assert "pickup.queued" in POINTS


# -- the node's pickup --------------------------------------------------------------------


class Node:
    def __init__(self, data_dir: Path) -> None:
        self.clock = Clock()
        self.spool = MemorySpool()
        self.tracking = MemoryTrackingStore(self.clock)
        self.queued: list[Accepted] = []
        self.acceptor = Acceptor(
            spool=self.spool,
            tracking=self.tracking,
            new_queue_id=lambda: "unused",
            reporting_mta="mx.example",
            node_id="node1",
            clock=self.clock,
        )
        self.pickup = Pickup(
            data_dir=data_dir,
            acceptor=self.acceptor,
            hostname="mx.example",
            domain="mx.example",
            message_size=1000,
            poll_interval=10.0,
            clock=self.clock,
            blocking=maybeDeferred,
            enqueue=self.queued.append,
        )


@pytest.fixture
def log_lines():
    lines: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace", "").startswith("mtrkmta.receive.pickup"):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_the_node_queues_a_pickup_file_and_then_removes_it(tmp_path):
    node = Node(tmp_path)
    directory = ensure_pickup_directory(tmp_path)
    write_pickup(directory, envelope(), b"Subject: x\n\nbody\n")
    await node.pickup.start()
    try:
        assert [a.envelope.queue_id for a in node.queued] == [QUEUE_ID]
        assert list(directory.iterdir()) == []
        stored, content = await node.spool.load(QUEUE_ID)
        assert stored.recipients[0].address == "root@mx.example"
        assert content.startswith(b"Received: by mx.example (mtrkmta, from userid ")
        assert content.endswith(b"\r\nSubject: x\r\n\r\nbody\r\n")
        record = await node.tracking.message(QUEUE_ID)
        assert record is not None and record.client.listener == "pickup"
    finally:
        await node.pickup.stop()


@pytest_twisted.ensureDeferred
async def test_a_file_already_queued_is_only_removed(tmp_path, log_lines):
    # The crash at pickup.queued: spool file and record durable, the pickup file still there.
    node = Node(tmp_path)
    directory = ensure_pickup_directory(tmp_path)
    write_pickup(directory, envelope(), b"body\r\n")
    await node.acceptor.accept_content(envelope(), b"body\r\n")
    await node.pickup.start()
    try:
        assert node.queued == []
        assert list(directory.iterdir()) == []
        assert log_lines == [f"{QUEUE_ID}: pickup file already queued: removed"]
    finally:
        await node.pickup.stop()


@pytest_twisted.ensureDeferred
async def test_bad_files_are_moved_aside_with_one_line_each(tmp_path, log_lines):
    node = Node(tmp_path)
    directory = ensure_pickup_directory(tmp_path)
    (directory / "a1").write_bytes(b"garbage")
    (directory / "a2").write_bytes(encode_pickup(envelope(queue_id="a2"), b"x" * 2000))
    (directory / "a3").write_bytes(encode_pickup(envelope(queue_id="a3", sender="x@@y"), b"x"))
    write_pickup(directory, envelope(), b"good\r\n")
    await node.pickup.start()
    try:
        assert [a.envelope.queue_id for a in node.queued] == [QUEUE_ID]
        assert list(directory.iterdir()) == []
        assert sorted(p.name for p in (tmp_path / "pickup-rejected").iterdir()) == [
            "a1",
            "a2",
            "a3",
        ]
        rejected = [line for line in log_lines if "rejected" in line]
        assert len(rejected) == 3
        assert "a1: truncated: 7 octets; moved to" in rejected[0]
        assert "a2: message of 2000 octets over limits.message_size (1000)" in rejected[1]
        assert "a3: sender <x@@y>: Bad sender address syntax" in rejected[2]
    finally:
        await node.pickup.stop()


@pytest_twisted.ensureDeferred
async def test_the_directory_is_scanned_every_poll_interval(tmp_path):
    node = Node(tmp_path)
    await node.pickup.start()
    try:
        directory = tmp_path / "pickup"
        write_pickup(directory, envelope(), b"late\r\n")
        node.clock.advance(9.9)
        assert node.queued == []
        node.clock.advance(0.1)
        assert [a.envelope.queue_id for a in node.queued] == [QUEUE_ID]
    finally:
        await node.pickup.stop()


@pytest_twisted.ensureDeferred
async def test_a_stale_unfinished_file_is_removed(tmp_path, log_lines):
    node = Node(tmp_path)
    directory = ensure_pickup_directory(tmp_path)
    stale = directory / f"{TEMP_PREFIX}{QUEUE_ID}"
    stale.write_bytes(b"half")
    fresh = directory / f"{TEMP_PREFIX}other"
    fresh.write_bytes(b"being written")
    os.utime(stale, (0, 0))
    await node.pickup.start()
    try:
        assert sorted(directory.iterdir()) == [fresh]
        assert log_lines == [f"pickup: removed {stale.name}, unfinished for an hour"]
    finally:
        await node.pickup.stop()


def test_sendmail_refuses_a_bad_recipient_in_one_line(tmp_path):
    err = io.StringIO()
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path}"\nhostname = "mx.example"\n')
    status = run("sendmail", ["-C", str(config), "a b@@"], io.BytesIO(b"x\n"), io.StringIO(), err)
    assert (status, err.getvalue()) == (
        EX_DATAERR,
        "sendmail: recipient <a b@@>: Bad recipient address syntax\n",
    )
    assert not (tmp_path / "pickup").exists()


class FailingOnce(MemoryTrackingStore):
    """A tracking store whose first arrival write fails, as a full disk makes it fail."""

    failed = False

    def record_arrival(self, *args, **kwargs):
        if not self.failed:
            self.failed = True
            return fail(OSError(errno.ENOSPC, "No space left on device"))
        return super().record_arrival(*args, **kwargs)


@pytest_twisted.ensureDeferred
async def test_a_failed_acceptance_leaves_the_file_for_the_next_scan(tmp_path, log_lines):
    node = Node(tmp_path)
    node.tracking = node.acceptor.tracking = FailingOnce(node.clock)
    directory = ensure_pickup_directory(tmp_path)
    write_pickup(directory, envelope(), b"body\r\n")
    await node.pickup.start()
    try:
        # The spool took it, the record did not: the file stays, the scans go on.
        assert node.queued == [] and [p.name for p in directory.iterdir()] == [QUEUE_ID]
        assert log_lines == [
            f"pickup: {QUEUE_ID} not queued now ([Errno 28] No space left on device); "
            "tried again at the next scan"
        ]
        node.clock.advance(10)
        assert [a.envelope.queue_id for a in node.queued] == [QUEUE_ID]
        assert list(directory.iterdir()) == []
        assert await node.spool.queue_ids() == [QUEUE_ID]
    finally:
        await node.pickup.stop()


@pytest_twisted.ensureDeferred
async def test_a_file_name_cannot_forge_a_log_line(tmp_path, log_lines):
    node = Node(tmp_path)
    directory = ensure_pickup_directory(tmp_path)
    (directory / "x\n2026 forged: delivered").write_bytes(b"junk")
    await node.pickup.start()
    try:
        [line] = log_lines
        assert "\n" not in line
        assert line.startswith("pickup: rejected 'x\\n2026 forged: delivered': ")
    finally:
        await node.pickup.stop()


def test_the_control_socket_answers_the_node_commands_it_has():
    from twisted.internet.testing import StringTransport

    from mtrkmta.queue.control import ControlFactory

    asked: list[str] = []
    factory = ControlFactory(None, {"pickup": lambda: asked.append("pickup")})  # type: ignore[arg-type]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b'{"command": "pickup"}\n{"command": "reload-aliases"}\n')
    assert asked == ["pickup"]
    first, second = transport.value().splitlines()
    assert first == b'{"ok":true,"result":true}'
    assert second.startswith(b'{"ok":false,"error":"unknown command; expected one of list')


@pytest_twisted.ensureDeferred
async def test_a_quarantined_copy_from_before_a_crash_gives_way_to_the_pickup_file(tmp_path):
    # A crash between the spool and the tracking commit: start-up quarantined the spool
    # file (no record); the pickup file is still there and is queued again.
    node = Node(tmp_path)
    directory = ensure_pickup_directory(tmp_path)
    write_pickup(directory, envelope(), b"body\r\n")
    await node.spool.store(envelope(), b"partial copy\r\n")
    await node.spool.quarantine([QUEUE_ID])
    await node.pickup.start()
    try:
        assert [a.envelope.queue_id for a in node.queued] == [QUEUE_ID]
        assert await node.spool.quarantined() == []
        _, content = await node.spool.load(QUEUE_ID)
        assert content.endswith(b"\r\nbody\r\n")
    finally:
        await node.pickup.stop()
