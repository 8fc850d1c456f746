"""Dovecot's over-quota and unknown-user replies as mtrkmta's DSN, and a quota tempfail retried.

A hard quota (``552 5.2.2``) and an unknown user (``550 5.1.1``) both fail, and the
sender (a local mailbox of the node, ``sender@localhost``) gets exactly one failed
DSN naming both, with Dovecot's replies as Diagnostic-Code. With
``quota_full_tempfail`` the full mailbox is deferred (``452 4.2.2``, "delayed");
once its quota is raised in Dovecot's passwd-file userdb (re-read when it changes)
the retry is delivered.
"""

from __future__ import annotations

import email
import email.policy
import time
from email.message import EmailMessage
from pathlib import Path

import pytest_twisted
from interop_lab import (
    Dovecot,
    Lab,
    eventually,
    final_record,
    in_thread,
    outcome,
    queue_id,
    running_mtrkmta,
    send_mail,
    start_dovecot,
)

from mtrkmta.tracking.interfaces import RecipientState

SENDER = "sender@localhost"  # DSNs to it land in the node's data/mail/sender/new/
CONTENT = b"From: sender@localhost\r\nSubject: quota\r\n\r\nFor a full mailbox.\r\n"
WAIT = 30.0


def sender_mail(lab: Lab) -> list[EmailMessage]:
    folder = lab.path("mtrkmta", "mail", "sender", "new")
    if not folder.is_dir():
        return []
    return [
        email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        for path in sorted(folder.iterdir())
    ]


def delivery_status(message: EmailMessage) -> list[dict[str, str]]:
    (part,) = [p for p in message.walk() if p.get_content_type() == "message/delivery-status"]
    return [{k.lower(): str(v) for k, v in block.items()} for block in part.get_payload()]


@pytest_twisted.ensureDeferred
async def test_unknown_user_and_full_mailbox_give_one_failed_dsn(lab):
    dovecot = await start_dovecot(lab)
    async with running_mtrkmta(lab, "to-dovecot.toml", DOVECOT_LMTP_PORT=dovecot.port) as node:
        reply = await in_thread(
            send_mail,
            node.port("smtp"),
            SENDER,
            [("nosuch@example.test", ""), ("full@example.test", "")],
            CONTENT,
            mail_params="ENVID=quota-env-1 RET=HDRS",
        )
        qid = queue_id(reply)
        record = await final_record(node, qid, WAIT)
        spool = node.spool
        await eventually(
            lambda: spool.queue_ids().addCallback(lambda ids: not ids),
            "the message and its DSN to leave the spool",
            WAIT,
        )
        (dsn,) = await eventually(lambda: sender_mail(lab), "the DSN to the sender", WAIT)
        stored = await node.tracking.message(qid)

    nosuch = outcome(record, "nosuch@example.test")
    assert (nosuch.state, nosuch.status, nosuch.action) == (
        RecipientState.FAILED,
        "5.1.1",
        "failed",
    )
    full = outcome(record, "full@example.test")
    assert (full.state, full.status, full.action) == (RecipientState.FAILED, "5.2.2", "failed")
    assert [r.dsn_pending for r in stored.recipients] == [False, False]

    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["To"] == SENDER
    per_message, *per_recipient = delivery_status(dsn)
    assert per_message["original-envelope-id"] == "quota-env-1"
    assert per_message["reporting-mta"] == "dns; mx.example.test"
    blocks = {block["final-recipient"]: block for block in per_recipient}
    assert sorted(blocks) == ["rfc822; full@example.test", "rfc822; nosuch@example.test"]
    unknown = blocks["rfc822; nosuch@example.test"]
    assert (unknown["action"], unknown["status"]) == ("failed", "5.1.1")
    assert unknown["diagnostic-code"] == (
        "smtp; 550 5.1.1 <nosuch@example.test> User doesn't exist: nosuch@example.test"
    )
    over = blocks["rfc822; full@example.test"]
    assert (over["action"], over["status"]) == ("failed", "5.2.2")
    assert over["diagnostic-code"] == (
        "smtp; 552 5.2.2 <full@example.test> Quota exceeded (mailbox for user is full)"
    )
    assert dovecot.maildir("full@example.test") == []
    assert dovecot.maildir("nosuch@example.test") == []
    assert len(sender_mail(lab)) == 1  # exactly one DSN, nothing else


def raise_quota(dovecot: Dovecot) -> None:
    """Give full@example.test room; Dovecot's passwd-file userdb sees the new file."""
    special = dovecot.dir / "special-users"
    text = special.read_text()
    assert "storage=1B" in text
    time.sleep(1.1)  # a new mtime second, whatever Dovecot compares
    special.write_text(text.replace("storage=1B", "storage=100M"))


@pytest_twisted.ensureDeferred
async def test_quota_tempfail_is_delayed_then_delivered_once_the_quota_is_raised(lab):
    dovecot = await start_dovecot(lab, quota_tempfail=True)
    async with running_mtrkmta(lab, "to-dovecot.toml", DOVECOT_LMTP_PORT=dovecot.port) as node:
        reply = await in_thread(
            send_mail, node.port("smtp"), SENDER, [("full@example.test", "")], CONTENT
        )
        qid = queue_id(reply)
        record = await final_record(node, qid, WAIT)
        (full,) = record.recipients
        assert (full.state, full.status, full.action) == (
            RecipientState.DEFERRED,
            "4.2.2",
            "delayed",
        )
        assert full.diagnostic == (
            "smtp; 452 4.2.2 <full@example.test> Quota exceeded (mailbox for user is full)"
        )
        assert await node.spool.queue_ids() == [qid]
        assert dovecot.maildir("full@example.test") == []

        await in_thread(raise_quota, dovecot)
        assert node.queue is not None
        assert await node.queue.flush(qid) == 1
        tracking = node.tracking

        async def delivered():
            stored = await tracking.message(qid)
            (recipient,) = stored.recipients
            return stored if recipient.state == RecipientState.DELIVERED else None

        record = await eventually(delivered, "the retry to be delivered", WAIT)
        spool = node.spool
        await eventually(
            lambda: spool.queue_ids().addCallback(lambda ids: qid not in ids), "spool", WAIT
        )

    (full,) = record.recipients
    assert (full.status, full.action) == ("2.1.5", "delivered")
    assert full.attempts == 2
    assert " Saved" in full.diagnostic
    (mail,) = dovecot.maildir("full@example.test")
    assert b"For a full mailbox." in Path(mail).read_bytes()
    assert sender_mail(lab) == []  # no NOTIFY=DELAY asked, no warning yet: no DSN
