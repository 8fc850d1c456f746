"""mtrkmta delivering into a real Dovecot LMTP server (mtrkmta/to-dovecot.toml).

What arrived is read from Dovecot's Maildir; what mtrkmta thinks happened from
its tracking store. Dovecot 2.3 advertises neither DSN nor MTRK and answers
``555 5.5.4 Unsupported parameters`` to ENVID/RET/NOTIFY/MTRK, so a message that
came in with all of them must reach it without them.
"""

from __future__ import annotations

import base64

import pytest_twisted
from interop_lab import (
    Dovecot,
    eventually,
    final_record,
    in_thread,
    outcome,
    program,
    queue_id,
    run,
    running_mtrkmta,
    send_mail,
    start_dovecot,
)

from mtrkmta.tracking.interfaces import RecipientState

SENDER = "sender@localhost"  # a local mailbox of the node: any DSN stays on this machine
CERTIFIER = bytes(range(1, 21))  # B = SHA1(A), as an MTRK originator sends it
MTRK = f"MTRK={base64.b64encode(CERTIFIER).decode()}:86400"
ENVID = "trk+1@client.example.test"  # decoded; '+' travels as +2B in xtext


def assert_no_unsupported_parameters(dovecot: Dovecot) -> None:
    log = dovecot.log_text()
    assert "Unsupported parameters" not in log
    assert "Invalid" not in log


@pytest_twisted.ensureDeferred
async def test_swaks_message_is_delivered_into_dovecot(lab):
    dovecot = await start_dovecot(lab)
    async with running_mtrkmta(lab, "to-dovecot.toml", DOVECOT_LMTP_PORT=dovecot.port) as node:
        swaks = await in_thread(
            run,
            [
                program("swaks"),
                "--server",
                f"127.0.0.1:{node.port('smtp')}",
                "--helo",
                "client.example.test",
                "--from",
                SENDER,
                "--to",
                "alice@example.test",
                "--header",
                "Subject: interop via swaks",
                "--body",
                "Delivered by Dovecot.",
            ],
        )
        (reply,) = [line for line in swaks.stdout.splitlines() if "queued as" in line]
        record = await final_record(node, queue_id(reply))

    alice = outcome(record, "alice@example.test")
    assert (alice.state, alice.status, alice.action) == (
        RecipientState.DELIVERED,
        "2.1.5",
        "delivered",
    )
    assert alice.diagnostic.startswith("smtp; 250 2.0.0 <alice@example.test> ")
    assert alice.diagnostic.endswith(" Saved")
    (mail,) = dovecot.maildir("alice@example.test")
    content = mail.read_bytes()
    assert b"Subject: interop via swaks" in content
    assert b"Delivered by Dovecot." in content
    assert b"by mx.example.test" in content  # mtrkmta's Received: field
    assert "saved mail to INBOX" in dovecot.log_text()
    assert_no_unsupported_parameters(dovecot)


@pytest_twisted.ensureDeferred
async def test_tracked_message_reaches_dovecot_without_the_parameters_it_refuses(lab):
    dovecot = await start_dovecot(lab)
    async with running_mtrkmta(lab, "to-dovecot.toml", DOVECOT_LMTP_PORT=dovecot.port) as node:
        reply = await in_thread(
            send_mail,
            node.port("smtp"),
            SENDER,
            [
                (
                    "alice@example.test",
                    "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Alice+2Bold@example.test",
                ),
                ("bob+lists@example.test", "NOTIFY=NEVER"),
            ],
            b"From: sender@localhost\r\nSubject: tracked\r\n\r\nTracked mail.\r\n",
            mail_params=f"ENVID=trk+2B1@client.example.test RET=HDRS {MTRK}",
        )
        record = await final_record(node, queue_id(reply))

    # What arrived with the message is on record, decoded...
    assert record.envid == ENVID
    assert record.certifier == CERTIFIER
    assert record.ret == "HDRS"
    alice = outcome(record, "alice@example.test")
    assert (alice.orcpt.addr_type, alice.orcpt.address) == ("rfc822", "Alice+old@example.test")
    assert alice.notify == frozenset({"SUCCESS", "FAILURE"})
    # ...none of it went to Dovecot (it would have said 555), and both were delivered:
    # final delivery by an LMTP server that did not take MTRK, so not "transferred".
    for address in ("alice@example.test", "bob+lists@example.test"):
        recipient = outcome(record, address)
        assert (recipient.state, recipient.status) == (RecipientState.DELIVERED, "2.1.5")
        assert not recipient.certifier_forwarded
        assert " Saved" in recipient.diagnostic
    assert_no_unsupported_parameters(dovecot)
    (for_alice,) = dovecot.maildir("alice@example.test")
    (for_bob,) = dovecot.maildir("bob@example.test")  # Dovecot strips the +detail
    for mail in (for_alice, for_bob):
        assert b"Subject: tracked" in mail.read_bytes()


@pytest_twisted.ensureDeferred
async def test_unknown_user_and_full_mailbox_fail_with_dovecots_replies(lab):
    dovecot = await start_dovecot(lab)
    async with running_mtrkmta(lab, "to-dovecot.toml", DOVECOT_LMTP_PORT=dovecot.port) as node:
        reply = await in_thread(
            send_mail,
            node.port("smtp"),
            SENDER,
            [("alice@example.test", ""), ("nosuch@example.test", ""), ("full@example.test", "")],
            b"Subject: three recipients\r\n\r\nOne of three arrives.\r\n",
        )
        qid = queue_id(reply)
        record = await final_record(node, qid)
        spool = node.spool
        # every recipient is final: the message leaves the spool (once any DSN is queued)
        await eventually(lambda: spool.queue_ids().addCallback(lambda ids: qid not in ids), qid)

    alice = outcome(record, "alice@example.test")
    assert (alice.state, alice.status) == (RecipientState.DELIVERED, "2.1.5")
    # Refused at RCPT time.
    nosuch = outcome(record, "nosuch@example.test")
    assert (nosuch.state, nosuch.status, nosuch.action) == (
        RecipientState.FAILED,
        "5.1.1",
        "failed",
    )
    assert nosuch.diagnostic == (
        "smtp; 550 5.1.1 <nosuch@example.test> User doesn't exist: nosuch@example.test"
    )
    # Refused after the final dot, in the per-recipient LMTP replies.
    full = outcome(record, "full@example.test")
    assert (full.state, full.status) == (RecipientState.FAILED, "5.2.2")
    assert full.diagnostic == (
        "smtp; 552 5.2.2 <full@example.test> Quota exceeded (mailbox for user is full)"
    )
    assert len(dovecot.maildir("alice@example.test")) == 1
    assert dovecot.maildir("nosuch@example.test") == []
    assert dovecot.maildir("full@example.test") == []


@pytest_twisted.ensureDeferred
async def test_full_mailbox_with_quota_tempfail_is_deferred(lab):
    dovecot = await start_dovecot(lab, quota_tempfail=True)
    async with running_mtrkmta(lab, "to-dovecot.toml", DOVECOT_LMTP_PORT=dovecot.port) as node:
        reply = await in_thread(
            send_mail,
            node.port("smtp"),
            SENDER,
            [("full@example.test", "")],
            b"Subject: later\r\n\r\nTry again later.\r\n",
        )
        qid = queue_id(reply)
        record = await final_record(node, qid)
        assert await node.spool.queue_ids() == [qid]  # kept for the retry
        assert await node.tracking.queued_messages(node.config.node_id) == [qid]

    (full,) = record.recipients
    assert (full.state, full.status, full.action) == (RecipientState.DEFERRED, "4.2.2", "delayed")
    assert full.diagnostic == (
        "smtp; 452 4.2.2 <full@example.test> Quota exceeded (mailbox for user is full)"
    )
    assert full.attempts == 1
    assert full.next_attempt is not None and full.next_attempt > full.last_attempt
