"""The ESMTP receive path over real loopback sockets: EHLO/HELO, pipelining, relay policy,
DATA framing (no SMTP smuggling) and durable acceptance (spool + tracking store)."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from smtpwire import (
    Wire,
    data_block,
    in_thread,
    message,
    nothing_queued,
    queue_id_of,
    queued_everywhere,
    running_node,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred

SENDER = "MAIL FROM:<sender@client.example>"


def _transaction_start(wire: Wire) -> None:
    wire.ehlo()
    assert wire.command(SENDER).code == 250
    assert wire.command("RCPT TO:<alice@localhost>").code == 250


# -- EHLO / HELO (RFC 3885 §2, RFC 3461 §2) ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ehlo_lists_every_keyword_in_order(tmp_path):
    # RFC 3885 §2 (MTRK, no parameters), doc/conformance.rst 3885-P4 (DSN with MTRK), RFC 3461
    # §2 (DSN, no parameters), ENHANCEDSTATUSCODES and PIPELINING (our choice: RFC 2034, RFC
    # 2920). No certificate: no STARTTLS; no TLS: no AUTH.
    async with running_node(tmp_path, options=(("limits.message_size", "10M"),)) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                assert wire.greeting.line == "220 mx.example.test ESMTP mtrkmta"
                return wire.ehlo()

        reply = await in_thread(talk)
    assert reply.lines == (
        "250-mx.example.test",
        "250-PIPELINING",
        "250-SIZE 10485760",
        "250-8BITMIME",
        "250-CHUNKING",
        "250-BINARYMIME",
        "250-ENHANCEDSTATUSCODES",
        "250-DSN",
        "250-MTRK",
        "250-SMTPUTF8",
        "250 DELIVERBY",
    )


@pytest_twisted.ensureDeferred
async def test_ehlo_without_hostname_is_a_syntax_error(tmp_path):
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                return wire.command("EHLO"), wire.command("EHLO two words"), wire.ehlo()

        bare, two, good = await in_thread(talk)
    assert bare.line.startswith("501 5.5.4 ")
    assert two.line.startswith("501 5.5.4 ")
    assert good.code == 250


@pytest_twisted.ensureDeferred
async def test_mail_before_ehlo_needs_a_greeting(tmp_path):
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                return wire.command(SENDER), wire.command("RCPT TO:<alice@localhost>")

        mail, rcpt = await in_thread(talk)
    assert mail.line == "503 5.5.1 Send EHLO first"
    assert rcpt.line == "503 5.5.1 Need MAIL before RCPT"


@pytest_twisted.ensureDeferred
async def test_helo_session_is_plain_smtp_without_extensions(tmp_path):
    # After HELO nothing is advertised, so every ESMTP parameter is refused with 555
    # (RFC 5321 §4.1.1.11, doc/conformance.rst 3885-P3) while plain MAIL/RCPT/DATA still work.
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                helo = wire.command("HELO client.example.test")
                refused = [
                    wire.command(f"{SENDER} ENVID=abc"),
                    wire.command(f"{SENDER} MTRK=AAECAwQFBgcICQoLDA0ODw==:60 ENVID=a@b"),
                    wire.command(f"{SENDER} SIZE=10"),
                    wire.command(f"{SENDER} BODY=8BITMIME"),
                ]
                mail = wire.command(SENDER)
                bad_rcpt = wire.command("RCPT TO:<alice@localhost> NOTIFY=NEVER")
                rcpt = wire.command("RCPT TO:<alice@localhost>")
                done = wire.data(message())
                return helo, refused, mail, bad_rcpt, rcpt, done

        helo, refused, mail, bad_rcpt, rcpt, done = await in_thread(talk)
        assert helo.lines == ("250 mx.example.test",)
        assert [r.line for r in refused] == [
            "555 5.5.4 ENVID not supported",
            "555 5.5.4 MTRK not supported",
            "555 5.5.4 SIZE not supported",
            "555 5.5.4 BODY not supported",
        ]
        assert mail.line == "250 2.1.0 Ok"
        assert bad_rcpt.line == "555 5.5.4 NOTIFY not supported"
        assert rcpt.line == "250 2.1.5 Ok"
        stored = await queued_everywhere(node, queue_id_of(done))
        assert stored.client.protocol == "SMTP"
        assert stored.client.helo == "client.example.test"
        assert [r.address for r in stored.recipients] == ["alice@localhost"]


@pytest_twisted.ensureDeferred
async def test_second_ehlo_discards_the_transaction(tmp_path):
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                mail = wire.command(SENDER)
                wire.ehlo()
                return mail, wire.command("RCPT TO:<alice@localhost>")

        mail, rcpt = await in_thread(talk)
    assert mail.line == "250 2.1.0 Ok"
    assert rcpt.line == "503 5.5.1 Need MAIL before RCPT"


# -- strict pipelining (RFC 2920) ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_pipelined_commands_wait_for_a_slow_sender_check(tmp_path, monkeypatch):
    async with running_node(tmp_path) as node:
        events: list[tuple[str, float]] = []
        real_sender = node.receiver.check_sender
        real_recipient = node.receiver.check_recipient

        def slow_sender(session, sender, params):
            events.append(("sender asked", time.monotonic()))
            answer: Deferred = Deferred()

            def decide():
                events.append(("sender decided", time.monotonic()))
                answer.callback(real_sender(session, sender, params))

            reactor.callLater(0.3, decide)
            return answer

        def recipient(session, address, params, mail):
            events.append(("recipient asked", time.monotonic()))
            return real_recipient(session, address, params, mail)

        monkeypatch.setattr(node.receiver, "check_sender", slow_sender)
        monkeypatch.setattr(node.receiver, "check_recipient", recipient)

        def talk():
            with Wire(node.port("smtp")) as wire:
                sent = time.monotonic()
                replies = wire.pipeline(
                    "EHLO client.example.test",
                    SENDER,
                    "RCPT TO:<alice@localhost>",
                    "RCPT TO:<bob@localhost>",
                    "DATA",
                )
                wire.send(data_block(message()))
                return sent, replies, wire.reply()

        sent, replies, done = await in_thread(talk)
        ehlo, mail, rcpt1, rcpt2, data = replies
        assert ehlo.lines[0] == "250-mx.example.test"
        assert [mail.line, rcpt1.line, rcpt2.line, data.line] == [
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
        ]
        names = [name for name, _ in events]
        assert names == ["sender asked", "sender decided", "recipient asked", "recipient asked"]
        decided = events[1][1]
        # The EHLO reply went out at once; MAIL's only after its check; RCPTs after MAIL.
        assert ehlo.arrived < decided
        assert mail.arrived - sent >= 0.25
        assert all(r.arrived >= mail.arrived for r in (rcpt1, rcpt2, data))
        stored = await queued_everywhere(node, queue_id_of(done))
        assert [r.address for r in stored.recipients] == ["alice@localhost", "bob@localhost"]


@pytest_twisted.ensureDeferred
async def test_whole_transaction_pipelined_in_one_packet(tmp_path):
    # A client that ignores RFC 2920 and sends content before 354 still gets it
    # treated as content, with the replies in order.
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.send(
                    b"EHLO client.example.test\r\n"
                    + SENDER.encode()
                    + b"\r\nRCPT TO:<alice@localhost>\r\nDATA\r\n"
                    + data_block(message(body=".leading dot"))
                    + b"NOOP\r\nQUIT\r\n"
                )
                replies = wire.replies(7)
                wire.expect_closed()
                return replies

        replies = await in_thread(talk)
        assert [r.code for r in replies] == [250, 250, 250, 354, 250, 250, 221]
        assert replies[6].line == "221 2.0.0 mx.example.test Bye"
        queue_id = queue_id_of(replies[4])
        await queued_everywhere(node, queue_id)
        _, content = await node.spool.load(queue_id)
        assert content.endswith(b"Subject: test\r\n\r\n.leading dot\r\n")


@pytest_twisted.ensureDeferred
async def test_partial_content_line_pipelined_with_data_is_kept(tmp_path):
    # The first content bytes arrive with DATA, cut in the middle of a line; the rest
    # comes after 354. Not a byte may be lost or added.
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                _transaction_start(wire)
                wire.send(b"DATA\r\nSubject: spl")
                assert wire.reply().code == 354
                wire.send(b"it line\r\n\r\nbo\ndy\r\n.\r\n")
                return wire.reply()

        queue_id = queue_id_of(await in_thread(talk))
        _, content = await node.spool.load(queue_id)
        assert content.endswith(b"\r\nSubject: split line\r\n\r\nbo\r\ndy\r\n")


# -- relay policy (no open relay) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("recipient", "expected"),
    [
        ("<victim@elsewhere.example>", "554 5.7.1 Relay access denied"),
        ("<@localhost:victim@elsewhere.example>", "554 5.7.1 Relay access denied"),
        ("<victim@[192.0.2.1]>", "554 5.7.1 Relay access denied"),
        ("<victim@localhost.elsewhere.example>", "554 5.7.1 Relay access denied"),
        ("<alice@localhost>", "250 2.1.5 Ok"),
        ("<Alice@LOCALHOST>", "250 2.1.5 Ok"),
        ("<postmaster>", "250 2.1.5 Ok"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_relay_policy_from_untrusted_loopback(tmp_path, recipient, expected):
    # Loopback is NOT trusted by default: mail for other domains is refused.
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                wire.command(SENDER)
                return wire.command(f"RCPT TO:{recipient}")

        assert (await in_thread(talk)).line == expected


@pytest_twisted.ensureDeferred
async def test_trusted_network_may_relay(tmp_path):
    options = (("relay.trusted_networks", ("127.0.0.0/8",)),)
    async with running_node(tmp_path, options=options) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                wire.command(SENDER)
                rcpt = wire.command("RCPT TO:<victim@elsewhere.example>")
                return rcpt, wire.data(message())

        rcpt, done = await in_thread(talk)
        assert rcpt.line == "250 2.1.5 Ok"
        stored = await queued_everywhere(node, queue_id_of(done))
        assert [r.address for r in stored.recipients] == ["victim@elsewhere.example"]


@pytest_twisted.ensureDeferred
async def test_trusted_network_that_excludes_the_client_does_not_relay(tmp_path):
    options = (("relay.trusted_networks", ("192.0.2.0/24", "127.0.0.2/32")),)
    async with running_node(tmp_path, options=options) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                wire.command(SENDER)
                return wire.command("RCPT TO:<victim@elsewhere.example>")

        assert (await in_thread(talk)).line == "554 5.7.1 Relay access denied"


@pytest_twisted.ensureDeferred
async def test_local_and_routed_domains_are_accepted_from_anyone(tmp_path):
    options = (
        ("domains.local", ("example.test",)),
        ("routes", "routed.example=smtp:tcp:host=127.0.0.1:port=9"),
        ("routes", ".sub.example=mx"),
    )
    async with running_node(tmp_path, options=options) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                wire.command(SENDER)
                return [
                    wire.command(f"RCPT TO:<{address}>").line
                    for address in (
                        "alice@example.test",
                        "bob@routed.example",
                        "carol@deep.sub.example",
                        "dave@sub.example",
                        "erin@elsewhere.example",
                    )
                ]

        assert await in_thread(talk) == [
            "250 2.1.5 Ok",
            "250 2.1.5 Ok",
            "250 2.1.5 Ok",
            "554 5.7.1 Relay access denied",  # ".sub.example" covers subdomains only
            "554 5.7.1 Relay access denied",
        ]


# -- DATA framing: over-long lines and SMTP smuggling --------------------------------------

SMUGGLED = (
    b"MAIL FROM:<smuggled@attacker.example>\r\n"
    b"RCPT TO:<victim@localhost>\r\n"
    b"DATA\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"evil\r\n"
)


@pytest_twisted.ensureDeferred
async def test_overlong_data_line_does_not_leave_data_early(tmp_path):
    # doc/conformance.rst 3885-P2 / RFC 5321 §4.5.3.1.6: a 2000-octet content line. The server must
    # stay in DATA until the real terminator (the command-like lines after the long line
    # are content), then answer 500 5.5.2 once and queue nothing.
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                _transaction_start(wire)
                assert wire.command("DATA").code == 354
                wire.send(b"Subject: long\r\n\r\n" + b"x" * 2000 + b"\r\n" + SMUGGLED)
                wire.expect_silence(0.3)  # still in DATA: no reply to the long line
                wire.send(b".\r\n")
                return wire.reply(), wire.command("NOOP"), wire.command("RCPT TO:<b@localhost>")

        data, noop, rcpt = await in_thread(talk)
        assert data.line.startswith("500 5.5.2 Line too long")
        assert noop.line == "250 2.0.0 Ok"
        assert rcpt.line == "503 5.5.1 Need MAIL before RCPT"  # the transaction is over
        await nothing_queued(node)


@pytest_twisted.ensureDeferred
async def test_overlong_data_line_before_the_real_terminator(tmp_path):
    # The long line followed at once by CRLF.CRLF and commands, all in one packet: the
    # terminator ends DATA (500 5.5.2, nothing queued) and what follows it are the
    # client's next commands, answered after the DATA reply and in order.
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                _transaction_start(wire)
                assert wire.command("DATA").code == 354
                wire.send(
                    b"Subject: long\r\n\r\n"
                    + b"y" * 2000
                    + b"\r\n.\r\nMAIL FROM:<next@client.example>\r\nRCPT TO:<bob@localhost>\r\n"
                )
                return wire.replies(3)

        data, mail, rcpt = await in_thread(talk)
        assert data.line.startswith("500 5.5.2 Line too long")
        assert mail.line == "250 2.1.0 Ok"
        assert rcpt.line == "250 2.1.5 Ok"
        await nothing_queued(node)


@pytest_twisted.ensureDeferred
async def test_overlong_data_line_in_small_packets(tmp_path):
    # The over-long line arrives in pieces, with the bare-LF terminator lookalike inside
    # it after the 998-octet mark: it must neither end DATA nor resynchronise on it.
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                _transaction_start(wire)
                assert wire.command("DATA").code == 354
                wire.send(b"Subject: long\r\n\r\n")
                for _ in range(10):
                    wire.send(b"z" * 150)
                wire.send(b"\n.\n" + SMUGGLED)
                wire.expect_silence(0.2)
                wire.send(b".\r\n")
                return wire.reply(), wire.command("NOOP")

        data, noop = await in_thread(talk)
        assert data.line.startswith("500 5.5.2 Line too long")
        assert noop.line == "250 2.0.0 Ok"
        await nothing_queued(node)


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r.\r", b"\r\n.\r\r\n"],
    ids=["LF.LF", "LF.CRLF", "CRLF.LF", "CR.CRLF", "CR.CR", "CRLF.CRCRLF"],
)
@pytest.mark.parametrize("when", ["after-354", "pipelined-with-DATA"])
@pytest_twisted.ensureDeferred
async def test_only_crlf_dot_crlf_ends_data(tmp_path, fake_end, when):
    # SMTP smuggling: a terminator lookalike must not end DATA, so the commands after it
    # stay content and never run. Also when the content was pipelined with DATA itself
    # (then the server has already split it into command lines at bare LFs).
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                _transaction_start(wire)
                content = b"Subject: smuggling\r\n\r\nhello" + fake_end + SMUGGLED + b".\r\n"
                if when == "after-354":
                    assert wire.command("DATA").code == 354
                    wire.send(content)
                    replies = [wire.reply()]
                else:
                    wire.send(b"DATA\r\n" + content)
                    replies = wire.replies(2)
                    assert replies[0].code == 354
                # The next reply after the one 250 must be NOOP's: no smuggled replies.
                return replies[-1], wire.command("NOOP")

        done, noop = await in_thread(talk)
        assert noop.line == "250 2.0.0 Ok"
        queue_id = queue_id_of(done)
        assert await node.spool.queue_ids() == [queue_id]
        envelope, content = await node.spool.load(queue_id)
        assert envelope.sender == "sender@client.example"
        assert [r.address for r in envelope.recipients] == ["alice@localhost"]
        assert b"MAIL FROM:<smuggled@attacker.example>" in content
        assert b"\r\nevil\r\n" in content


# -- acceptance: every 250 names a queue id found in the spool and the store ---------------


@pytest_twisted.ensureDeferred
async def test_every_accepted_message_is_spooled_and_tracked_under_its_queue_id(tmp_path):
    # RFC 3885 §3.1: the tracking record exists once 250 is sent; the Received: field
    # carries the same queue id.
    async with running_node(tmp_path) as node:

        def talk():
            replies = []
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                for number in range(3):
                    wire.command(f"MAIL FROM:<s{number}@client.example>")
                    wire.command(f"RCPT TO:<r{number}@localhost>")
                    replies.append(wire.data(message(subject=f"n{number}")))
            return replies

        replies = await in_thread(talk)
        queue_ids = [queue_id_of(reply) for reply in replies]
        for reply, queue_id in zip(replies, queue_ids, strict=True):
            assert reply.line == f"250 2.0.0 Ok: queued as {queue_id}"
        assert len(set(queue_ids)) == 3
        assert sorted(await node.spool.queue_ids()) == sorted(queue_ids)
        for number, queue_id in enumerate(queue_ids):
            stored = await queued_everywhere(node, queue_id)
            assert stored.sender == f"s{number}@client.example"
            assert [r.address for r in stored.recipients] == [f"r{number}@localhost"]
            assert [r.state.value for r in stored.recipients] == ["queued"]
            assert stored.client.address == "127.0.0.1"
            assert stored.client.protocol == "ESMTP"
            envelope, content = await node.spool.load(queue_id)
            assert envelope.queue_id == queue_id
            assert content.startswith(
                b"Received: from client.example.test ([127.0.0.1])\r\n"
                b"\tby mx.example.test (mtrkmta) with ESMTP id " + queue_id.encode() + b"\r\n"
            )
            assert content.endswith(f"Subject: n{number}\r\n\r\nhello\r\n".encode())


@pytest_twisted.ensureDeferred
async def test_rset_and_quit(tmp_path):
    async with running_node(tmp_path) as node:

        def talk():
            with Wire(node.port("smtp")) as wire:
                wire.ehlo()
                wire.command(SENDER)
                rset = wire.command("RSET")
                rcpt = wire.command("RCPT TO:<alice@localhost>")
                quit_ = wire.command("QUIT")
                return rset, rcpt, quit_, wire.expect_closed()

        rset, rcpt, quit_, rest = await in_thread(talk)
        assert rset.line == "250 2.0.0 Ok"
        assert rcpt.line == "503 5.5.1 Need MAIL before RCPT"
        assert quit_.line == "221 2.0.0 mx.example.test Bye"
        assert rest == b""
        await nothing_queued(node)
