"""The LMTP listener (RFC 2033) over real loopback sockets: LHLO, HELO/EHLO refused, and one
reply per accepted recipient after DATA (RFC 2033)."""

from __future__ import annotations

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

SENDER = "MAIL FROM:<sender@client.example>"


def lmtp(node):
    return node.port("lmtp")


@pytest_twisted.ensureDeferred
async def test_lhlo_keywords(tmp_path):
    # RFC 2033 §4.1 (LHLO behaves like EHLO), §5 (PIPELINING, ENHANCEDSTATUSCODES and
    # 8BITMIME), RFC 3885 §2 and RFC 3461 §2 (MTRK and DSN without parameters).
    async with running_node(tmp_path, listeners=("lmtp",)) as node:

        def talk():
            with Wire(lmtp(node)) as wire:
                return wire.greeting, wire.ehlo(verb="LHLO")

        greeting, lhlo = await in_thread(talk)
    assert greeting.line == "220 mx.example.test LMTP mtrkmta"
    assert lhlo.lines == (
        "250-mx.example.test",
        "250-PIPELINING",
        "250-SIZE 36700160",
        "250-8BITMIME",
        "250-CHUNKING",
        "250-BINARYMIME",
        "250-ENHANCEDSTATUSCODES",
        "250-DSN",
        "250-MTRK",
        "250 SMTPUTF8",
    )


@pytest_twisted.ensureDeferred
async def test_helo_and_ehlo_never_get_2xx(tmp_path):
    # RFC 2033 §4.1: 500 (a SHOULD); the session still needs LHLO afterwards.
    async with running_node(tmp_path, listeners=("lmtp",)) as node:

        def talk():
            with Wire(lmtp(node)) as wire:
                return (
                    wire.ehlo(verb="HELO"),
                    wire.ehlo(verb="EHLO"),
                    wire.command(SENDER),
                    wire.ehlo(verb="LHLO"),
                    wire.command(SENDER),
                )

        helo, ehlo, mail, lhlo, mail_after = await in_thread(talk)
    refused = "500 5.5.1 Command unrecognized: this is LMTP, use LHLO"
    assert helo.line == refused
    assert ehlo.line == refused
    assert mail.line == "503 5.5.1 Send LHLO first"
    assert lhlo.code == 250
    assert mail_after.line == "250 2.1.0 Ok"


@pytest_twisted.ensureDeferred
async def test_one_reply_per_accepted_recipient_in_rcpt_order(tmp_path):
    # RFC 2033 §4.2: one reply per accepted RCPT, in order, the duplicate included; the
    # refused recipient (relay denied) gets none. RFC 2033 §4.2: each 2xx means the copy is ours.
    async with running_node(tmp_path, listeners=("lmtp",)) as node:

        def talk():
            with Wire(lmtp(node)) as wire:
                wire.ehlo(verb="LHLO")
                setup = [
                    wire.command(SENDER),
                    wire.command("RCPT TO:<alice@localhost>"),
                    wire.command("RCPT TO:<bob@localhost>"),
                    wire.command("RCPT TO:<mallory@elsewhere.example>"),
                    wire.command("RCPT TO:<alice@localhost>"),
                    wire.command("DATA"),
                ]
                wire.send(data_block(message()))
                per_recipient = wire.replies(3)
                # The very next reply is NOOP's: no fourth reply for the refused recipient.
                return setup, per_recipient, wire.command("NOOP")

        setup, per_recipient, noop = await in_thread(talk)
        assert [r.line for r in setup] == [
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 2.1.5 Ok",
            "554 5.7.1 Relay access denied",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
        ]
        queue_id = queue_id_of(per_recipient[0])
        assert [r.line for r in per_recipient] == [
            f"250 2.0.0 <alice@localhost> Ok: queued as {queue_id}",
            f"250 2.0.0 <bob@localhost> Ok: queued as {queue_id}",
            f"250 2.0.0 <alice@localhost> Ok: queued as {queue_id}",
        ]
        assert noop.line == "250 2.0.0 Ok"
        stored = await queued_everywhere(node, queue_id)
        assert [r.address for r in stored.recipients] == [
            "alice@localhost",
            "bob@localhost",
            "alice@localhost",
        ]
        assert stored.client.protocol == "LMTP"
        assert stored.client.listener == "lmtp"


@pytest_twisted.ensureDeferred
async def test_pipelined_lmtp_transaction(tmp_path):
    # RFC 2033 §5: PIPELINING; the per-recipient replies follow the 354 in order.
    async with running_node(tmp_path, listeners=("lmtp",)) as node:

        def talk():
            with Wire(lmtp(node)) as wire:
                replies = wire.pipeline(
                    "LHLO client.example.test",
                    SENDER,
                    "RCPT TO:<alice@localhost> NOTIFY=SUCCESS ORCPT=rfc822;Alice@Example.Test",
                    "RCPT TO:<bob@localhost>",
                    "DATA",
                )
                wire.send(data_block(message()))
                return replies, wire.replies(2)

        replies, per_recipient = await in_thread(talk)
        assert [r.code for r in replies] == [250, 250, 250, 250, 354]
        assert [r.lines[0][:20] for r in per_recipient] == [
            "250 2.0.0 <alice@loc",
            "250 2.0.0 <bob@local",
        ]
        stored = await queued_everywhere(node, queue_id_of(per_recipient[1]))
        assert stored.recipients[0].orcpt.address == "Alice@Example.Test"
        assert stored.recipients[0].notify == frozenset({"SUCCESS"})


@pytest_twisted.ensureDeferred
async def test_data_without_recipients_is_503(tmp_path):
    # RFC 2033 §4.2: DATA with no accepted RCPT -> 503 (also when every RCPT was refused).
    async with running_node(tmp_path, listeners=("lmtp",)) as node:

        def talk():
            with Wire(lmtp(node)) as wire:
                wire.ehlo(verb="LHLO")
                no_mail = wire.command("DATA")
                wire.command(SENDER)
                no_rcpt = wire.command("DATA")
                refused = wire.command("RCPT TO:<mallory@elsewhere.example>")
                only_refused = wire.command("DATA")
                return no_mail, no_rcpt, refused, only_refused, wire.command("NOOP")

        no_mail, no_rcpt, refused, only_refused, noop = await in_thread(talk)
        assert no_mail.line == "503 5.5.1 Need MAIL command"
        assert no_rcpt.line == "503 5.5.1 No valid recipients"
        assert refused.line == "554 5.7.1 Relay access denied"
        assert only_refused.line == "503 5.5.1 No valid recipients"
        assert noop.line == "250 2.0.0 Ok"
        await nothing_queued(node)


@pytest_twisted.ensureDeferred
async def test_refused_content_gets_one_reply_per_recipient(tmp_path):
    # RFC 2033 §4.2: a failure at the end of DATA is still answered once per recipient.
    options = (("limits.message_size", "1K"),)
    async with running_node(tmp_path, listeners=("lmtp",), options=options) as node:

        def talk():
            with Wire(lmtp(node)) as wire:
                wire.ehlo(verb="LHLO")
                wire.command(SENDER)
                wire.command("RCPT TO:<alice@localhost>")
                wire.command("RCPT TO:<bob@localhost>")
                assert wire.command("DATA").code == 354
                wire.send(data_block(message(body="x" * 900 + "\r\n" + "y" * 900)))
                return wire.replies(2), wire.command("NOOP")

        replies, noop = await in_thread(talk)
        too_big = "552 5.3.4 Message size exceeds fixed maximum message size"
        assert [r.line for r in replies] == [too_big, too_big]
        assert noop.line == "250 2.0.0 Ok"
        await nothing_queued(node)


@pytest_twisted.ensureDeferred
async def test_lmtp_offers_no_auth(tmp_path):
    async with running_node(tmp_path, listeners=("lmtp",)) as node:

        def talk():
            with Wire(lmtp(node)) as wire:
                wire.ehlo(verb="LHLO")
                return wire.command("AUTH PLAIN AGFsaWNlAHNlY3JldA==")

        assert (await in_thread(talk)).line == "502 5.5.1 AUTH not available"
