"""Resource limits on the receive path over real loopback sockets: message size, recipients,
connections, idle timeout, command-line length, the free-space floor and mail loops."""

from __future__ import annotations

import threading
import time

import pytest_twisted
from smtpwire import (
    Wire,
    WireError,
    data_block,
    in_thread,
    message,
    nothing_queued,
    queue_id_of,
    queued_everywhere,
    running_node,
    until,
)

SENDER = "MAIL FROM:<sender@client.example>"
RCPT = "RCPT TO:<alice@localhost>"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"


def _start(wire: Wire, mail: str = SENDER) -> None:
    wire.ehlo()
    assert wire.command(mail).code == 250
    assert wire.command(RCPT).code == 250


def _content_of_size(size: int) -> bytes:
    """A message of exactly ``size`` octets as the server counts them (CRLF line ends)."""
    head = b"Subject: size\r\n\r\n"
    filler = size - len(head) - 2
    lines, rest = divmod(filler, 80)
    body = (b"b" * 78 + b"\r\n") * lines + b"c" * rest
    content = head + body + b"\r\n"
    assert len(content) == size
    return content


# -- message size (RFC 1870) -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_size_parameter_over_the_limit_is_refused_at_mail(tmp_path):
    async with running_node(tmp_path, options=(("limits.message_size", "1K"),)) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                ehlo = wire.ehlo()
                over = wire.command(f"{SENDER} SIZE=1025")
                rcpt = wire.command(RCPT)
                at_limit = wire.command(f"{SENDER} SIZE=1024")
                return ehlo, over, rcpt, at_limit

        ehlo, over, rcpt, at_limit = await in_thread(talk)
    assert "SIZE 1024" in ehlo.keywords
    assert over.line == TOO_BIG
    assert rcpt.line == "503 5.5.1 Need MAIL before RCPT"
    assert at_limit.line == "250 2.1.0 Ok"


@pytest_twisted.ensureDeferred
async def test_message_over_the_limit_is_refused_at_end_of_data(tmp_path):
    async with running_node(tmp_path, options=(("limits.message_size", "1K"),)) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                _start(wire, f"{SENDER} SIZE=100")  # the client under-declared
                assert wire.command("DATA").code == 354
                wire.send(data_block(_content_of_size(1025)))
                return wire.reply(), wire.command("NOOP"), wire.command(RCPT)

        data, noop, rcpt = await in_thread(talk)
        assert data.line == TOO_BIG
        assert noop.line == "250 2.0.0 Ok"
        assert rcpt.line == "503 5.5.1 Need MAIL before RCPT"
        await nothing_queued(node)


@pytest_twisted.ensureDeferred
async def test_message_of_exactly_the_limit_is_accepted(tmp_path):
    async with running_node(tmp_path, options=(("limits.message_size", "1K"),)) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                _start(wire)
                return wire.data(_content_of_size(1024))

        queue_id = queue_id_of(await in_thread(talk))
        stored = await queued_everywhere(node, queue_id)
        _, content = await node.spool.load(queue_id)
        assert content.endswith(_content_of_size(1024))
        assert stored.size == len(content)


# -- recipients per message ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_too_many_recipients(tmp_path):
    async with running_node(tmp_path, options=(("limits.recipients", 2),)) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                wire.command(SENDER)
                replies = [wire.command(f"RCPT TO:<r{n}@localhost>") for n in range(4)]
                return replies, wire.data(message())

        replies, done = await in_thread(talk)
        assert [r.line for r in replies] == [
            "250 2.1.5 Ok",
            "250 2.1.5 Ok",
            "452 4.5.3 Too many recipients",
            "452 4.5.3 Too many recipients",
        ]
        stored = await queued_everywhere(node, queue_id_of(done))
        assert [r.address for r in stored.recipients] == ["r0@localhost", "r1@localhost"]


# -- connections ----------------------------------------------------------------------------


def _admitted_after_close(port: int, source: str) -> Wire:
    """Connect until admitted: the server notices a closed connection asynchronously."""
    deadline = time.monotonic() + 5
    while True:
        wire = Wire(port, source=source)
        if wire.greeting.code == 220:
            return wire
        wire.close()
        if time.monotonic() > deadline:
            raise WireError("still refused 5 s after a connection closed")
        time.sleep(0.02)


@pytest_twisted.ensureDeferred
async def test_per_ip_connection_limit(tmp_path):
    options = (("limits.max_connections_per_ip", 2),)
    async with running_node(tmp_path, options=options) as node:
        port = node.port("smtp")

        def talk():
            first, second = Wire(port), Wire(port)
            try:
                with Wire(port) as third:
                    refused = third.greeting
                    rest = third.expect_closed()
                with Wire(port, source="127.0.0.2") as other_ip:
                    other = other_ip.greeting
                first.close()
                with _admitted_after_close(port, "127.0.0.1") as again:
                    noop = again.command("NOOP")
                return refused, rest, other, noop, second.command("NOOP")
            finally:
                first.close()
                second.close()

        refused, rest, other, noop, still_open = await in_thread(talk)
    assert refused.line == "421 4.7.0 mx.example.test Too many connections from you"
    assert rest == b""  # and the connection was closed
    assert other.line == "220 mx.example.test ESMTP mtrkmta"
    assert noop.line == "250 2.0.0 Ok"
    assert still_open.line == "250 2.0.0 Ok"


@pytest_twisted.ensureDeferred
async def test_total_connection_limit(tmp_path):
    options = (("limits.max_connections", 2), ("limits.max_connections_per_ip", 2))
    async with running_node(tmp_path, options=options) as node:
        port = node.port("smtp")

        def talk():
            with Wire(port, source="127.0.0.2"), Wire(port, source="127.0.0.3"):
                with Wire(port, source="127.0.0.4") as third:
                    return third.greeting, third.expect_closed()

        refused, rest = await in_thread(talk)
    assert refused.line == "421 4.7.0 mx.example.test Too many connections"
    assert rest == b""


@pytest_twisted.ensureDeferred
async def test_idle_timeout(tmp_path):
    # A socket smoke test of the deadline: its timing, and that activity gives each
    # command a fresh one, are tested on a clock in tests/unit/test_smtp_server_limits.py.
    async with running_node(tmp_path, options=(("limits.idle_timeout", "1s"),)) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                return wire.reply(), wire.expect_closed()

        timeout, rest = await in_thread(talk)
    assert timeout.line == "421 4.4.2 mx.example.test Idle timeout, closing"
    assert rest == b""


@pytest_twisted.ensureDeferred
async def test_data_timeout_in_the_middle_of_data(tmp_path):
    # RFC 5321 §4.5.3.2.6: content that stops coming ends the session.
    async with running_node(tmp_path, options=(("limits.data_timeout", "1s"),)) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                _start(wire)
                wire.command("DATA")
                wire.send(b"Subject: never finished\r\n\r\npartial")
                return wire.reply(), wire.expect_closed()

        timeout, rest = await in_thread(talk)
        assert timeout.line == (
            "421 4.4.2 mx.example.test Timeout: message content too slow, closing"
        )
        assert rest == b""
        await nothing_queued(node)


# -- command-line length (project decision, doc/conformance.rst 3885-P2) ---------------------


@pytest_twisted.ensureDeferred
async def test_command_line_limit_is_2048_octets(tmp_path):
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                longest = "NOOP " + "x" * (2048 - 2 - 5)
                assert len(longest) + 2 == 2048
                return (
                    wire.command(longest),
                    wire.command(longest + "x"),
                    wire.command("NOOP"),
                )

        at_limit, over, after = await in_thread(talk)
    assert at_limit.line == "250 2.0.0 Ok"
    assert over.line == "500 5.5.2 Line too long"
    assert after.line == "250 2.0.0 Ok"


@pytest_twisted.ensureDeferred
async def test_overlong_command_line_inside_a_pipeline(tmp_path):
    # The over-long line is answered once, the lines around it still run, in order; a
    # huge line sent in many pieces is discarded without ending early.
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                wire.send(f"{SENDER}\r\nRCPT TO:<{'a' * 3000}@localhost>\r\n{RCPT}\r\n".encode())
                pipelined = wire.replies(3)
                for _ in range(40):
                    wire.send(b"RCPT TO:<" + b"z" * 2500)
                wire.send(b"@localhost>\r\n")
                huge = wire.reply()
                return pipelined, huge, wire.data(message())

        pipelined, huge, done = await in_thread(talk)
        assert [r.line for r in pipelined] == [
            "250 2.1.0 Ok",
            "500 5.5.2 Line too long",
            "250 2.1.5 Ok",
        ]
        assert huge.line == "500 5.5.2 Line too long"
        stored = await queued_everywhere(node, queue_id_of(done))
        assert [r.address for r in stored.recipients] == ["alice@localhost"]


# -- free-space floor -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_free_space_floor_refuses_mail(tmp_path):
    # A floor far above any real disk's free space: MAIL is refused temporarily.
    options = (("limits.min_free_space", "1048576T"),)
    async with running_node(tmp_path, options=options) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                return wire.command(SENDER), wire.command(RCPT)

        mail, rcpt = await in_thread(talk)
        assert mail.line == "452 4.3.1 Insufficient system storage; try again later"
        assert rcpt.line == "503 5.5.1 Need MAIL before RCPT"
        await nothing_queued(node)


@pytest_twisted.ensureDeferred
async def test_declared_size_beyond_free_space_refuses_mail(tmp_path):
    # SIZE= larger than the free space above the floor: 452 4.3.1, not 552.
    options = (("limits.message_size", "1048576T"), ("limits.min_free_space", "0"))
    async with running_node(tmp_path, options=options) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                return wire.command(f"{SENDER} SIZE={2**60}"), wire.command(f"{SENDER} SIZE=10")

        huge, small = await in_thread(talk)
    assert huge.line == "452 4.3.1 Insufficient system storage; try again later"
    assert small.line == "250 2.1.0 Ok"


# -- mail loops -------------------------------------------------------------------------------


def _looping_message(hops: int) -> bytes:
    received = [f"Received: from hop{n}.example by hop{n + 1}.example; x" for n in range(hops)]
    return message(headers=received)


@pytest_twisted.ensureDeferred
async def test_more_than_100_received_headers_is_a_mail_loop(tmp_path):
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                _start(wire)
                looping = wire.data(_looping_message(101))
                return looping, wire.command("NOOP")

        looping, noop = await in_thread(talk)
        assert looping.line == "554 5.4.6 Too many Received: headers: mail loop detected"
        assert noop.line == "250 2.0.0 Ok"
        await nothing_queued(node)


@pytest_twisted.ensureDeferred
async def test_100_received_headers_are_accepted(tmp_path):
    # RFC 5321 §6.3: the loop threshold is normally at least 100.
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                _start(wire)
                return wire.data(_looping_message(100))

        queue_id = queue_id_of(await in_thread(talk))
        await queued_everywhere(node, queue_id)
        _, content = await node.spool.load(queue_id)
        assert content.count(b"\r\nReceived: ") + content.startswith(b"Received: ") == 101


# -- hostile input: streaming content and unread replies -------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_large_message_streams_to_the_spool_and_is_stored_whole(tmp_path):
    # Past limits.data_buffer the content is appended to spool/incoming/ while it
    # arrives, in pieces, never more than the buffer held in memory at once.
    content = _content_of_size(3 * 1024 * 1024)
    options = (("limits.data_buffer", "64K"),)
    async with running_node(tmp_path, options=options) as node:
        appended: list[int] = []
        append = node.spool._append

        def recording_append(queue_id, fd, chunk, crc):
            appended.append(len(chunk))
            return append(queue_id, fd, chunk, crc)

        node.spool._append = recording_append

        def talk():
            with Wire(node.port("smtp")) as wire:
                _start(wire)
                return wire.data(content)

        reply = await in_thread(talk)
        assert reply.code == 250
        assert len(appended) > 2 and sum(appended) > len(content) - 64 * 1024
        assert max(appended) <= 2 * 64 * 1024 + 65536  # the buffer and one read, at most
        queue_id = queue_id_of(reply)
        await queued_everywhere(node, queue_id)
        _, stored = await node.spool.load(queue_id)
        assert stored.endswith(content) and stored.startswith(b"Received: ")
        assert list((node.spool.root / "incoming").iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_its_replies_stops_being_read(tmp_path):
    # 13 MB of HELP without reading a reply grew the server by 225 MB: the session is
    # its transport's producer now, so once 64 KiB of replies wait, it stops reading.
    async with running_node(tmp_path) as node:
        factory = node.factories["smtp"]
        stalled, checked = threading.Event(), threading.Event()

        def flood():
            with Wire(node.port("smtp")) as wire:
                wire.sock.settimeout(1.0)
                chunk = b"HELP\r\n" * 10_000
                sent = 0
                try:
                    while sent < 13 * 1024 * 1024:
                        wire.sock.sendall(chunk)
                        sent += len(chunk)
                except TimeoutError:
                    pass  # the server stopped reading: the kernel's buffers are full
                stalled.set()
                checked.wait(10)
                return sent

        sending = in_thread(flood)
        await until(stalled.is_set, "the flood to stall")
        (session,) = factory.sessions
        transport = session.transport
        waiting = len(transport.dataBuffer) + transport._tempDataLen
        blocked = session.output_blocked
        checked.set()
        sent = await sending
    assert sent < 13 * 1024 * 1024
    assert blocked
    assert waiting <= 64 * 1024 + 16 * 1024
