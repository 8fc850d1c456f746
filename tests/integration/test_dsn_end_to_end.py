"""Delivery status notifications end to end: a node fails, delivers or delays mail and the
DSN it owes lands in the sender's local Maildir (RFC 3461 §5.2, §6, RFC 3464 §2)."""

from __future__ import annotations

import email
import email.policy
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest_twisted
from fakemta import FakeMTA
from smtpwire import Wire, in_thread, queue_emptied, queue_id_of
from twisted.internet import reactor
from twisted.internet.task import deferLater

from mtrkmta.service import MTAService
from mtrkmta.testing import node_config, start_node, stop_node

SENDER = "sender@localhost"  # DSNs to it are delivered into data/mail/sender/new/
CONTENT = (
    b"From: sender@localhost\r\nSubject: original\r\nMessage-ID: <m1@localhost>\r\n\r\nHi.\r\n"
)


@asynccontextmanager
async def node_with_fake(
    tmp_path: Path,
    options: Sequence[tuple[str, object]] = (),
    extensions: Sequence[str] | None = None,
) -> AsyncIterator[tuple[MTAService, FakeMTA]]:
    fake = FakeMTA(reactor) if extensions is None else FakeMTA(reactor, extensions=extensions)
    await fake.start()
    node = await start_node(
        node_config(
            tmp_path / "data",
            listeners=("smtp",),
            options=(
                ("routes", f"relay.example=smtp:{fake.endpoint};tls=none"),
                ("durability.fsync", False),
                *options,
            ),
        )
    )
    try:
        yield node, fake
    finally:
        try:
            await stop_node(node)
        finally:
            await fake.stop()


def send(
    port: int, sender: str, recipients: Sequence[tuple[str, str]], mail_params: str = ""
) -> str:
    with Wire(port) as wire:
        assert wire.ehlo().code == 250
        assert wire.command(f"MAIL FROM:<{sender}> {mail_params}".rstrip()).code == 250
        for address, params in recipients:
            assert wire.command(f"RCPT TO:<{address}> {params}".rstrip()).code == 250
        queue_id = queue_id_of(wire.data(CONTENT))
        wire.command("QUIT")
    return queue_id


def dsns(tmp_path: Path, mailbox: str = "sender") -> list[email.message.EmailMessage]:
    folder = tmp_path / "data" / "mail" / mailbox / "new"
    if not folder.is_dir():
        return []
    return [
        email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        for path in sorted(folder.iterdir())
    ]


def delivery_status(message: Any) -> list[dict[str, str]]:
    """The blocks of the message/delivery-status part, as dicts of field -> value."""
    (part,) = [p for p in message.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = []
    for block in part.get_payload():
        blocks.append({k.lower(): str(v) for k, v in block.items()})
    return blocks


@pytest_twisted.ensureDeferred
async def test_remote_5xx_produces_one_failed_dsn_with_the_remote_reply(tmp_path):
    # RFC 3461 §5.2.6 (failed here, NOTIFY absent -> failed), RFC 3464 §2.3, RFC 3461 §9.2.
    async with node_with_fake(tmp_path) as (node, fake):
        fake.rcpt_replies["bad@relay.example"] = "550 5.1.1 <bad@relay.example> User unknown"
        queue_id = await in_thread(
            send,
            node.port("smtp"),
            SENDER,
            [("bad@relay.example", "ORCPT=rfc822;bad@relay.example"), ("ok@relay.example", "")],
            "ENVID=env-1 RET=HDRS",
        )
        await queue_emptied(node)
        (dsn,) = dsns(tmp_path)
        assert dsn.get_content_type() == "multipart/report"
        assert dsn.get_param("report-type") == "delivery-status"
        assert dsn["To"] == SENDER
        per_message, *per_recipient = delivery_status(dsn)
        assert per_message["original-envelope-id"] == "env-1"
        assert per_message["reporting-mta"] == "dns; mx.example.test"
        (failed,) = per_recipient
        assert failed["final-recipient"] == "rfc822; bad@relay.example"
        assert failed["original-recipient"] == "rfc822;bad@relay.example"
        assert failed["action"] == "failed"
        assert failed["status"] == "5.1.1"
        assert failed["diagnostic-code"] == "smtp; 550 5.1.1 <bad@relay.example> User unknown"
        assert fake.endpoint.startswith("tcp:host=127.0.0.1:")
        assert failed["remote-mta"] == "dns; [127.0.0.1]"  # a domain-literal, RFC 3461 §9.3
        assert "will-retry-until" not in failed
        parts = [p.get_content_type() for p in dsn.iter_parts()]
        assert parts == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
        # The DSN itself was sent with MAIL FROM:<> and tracked without MTRK.
        stored = await node.tracking.message(queue_id)
        assert [r.dsn_pending for r in stored.recipients] == [False, False]


@pytest_twisted.ensureDeferred
async def test_relay_keeps_the_received_xtext_and_the_dsn_carries_the_decoded_values(tmp_path):
    # RFC 3461 §5.2.1(a)/(d): the next hop gets ENVID and ORCPT with the esmtp-values
    # as received; §6.3(a): the DSN's Original-Envelope-Id is the xtext-decoded ENVID,
    # and (d) Original-Recipient is taken from ORCPT (RFC 3464 §2.3.1: the address).
    async with node_with_fake(tmp_path) as (node, fake):
        fake.rcpt_replies["bad@relay.example"] = "550 5.1.1 <bad@relay.example> User unknown"
        await in_thread(
            send,
            node.port("smtp"),
            SENDER,
            [
                ("bad@relay.example", "ORCPT=rfc822;x+41t@dsn.test"),
                ("ok@relay.example", "ORCPT=rfc822;o+4B@dsn.test"),
            ],
            "ENVID=ab+41cd+2Bef-x",
        )
        await queue_emptied(node)
        (transaction,) = fake.transactions
        assert "ENVID=ab+41cd+2Bef-x" in transaction.mail_params
        assert transaction.rcpts == [
            "RCPT TO:<bad@relay.example> ORCPT=rfc822;x+41t@dsn.test",
            "RCPT TO:<ok@relay.example> ORCPT=rfc822;o+4B@dsn.test",
        ]
        (dsn,) = dsns(tmp_path)
        per_message, failed = delivery_status(dsn)
        assert per_message["original-envelope-id"] == "abAcd+ef-x"
        assert failed["original-recipient"] == "rfc822;xAt@dsn.test"


@pytest_twisted.ensureDeferred
async def test_control_character_in_the_remote_reply_still_gives_a_failed_dsn(tmp_path):
    # RFC 3464 §2.3.6: the reply text is escaped for Diagnostic-Code (RFC 6533 §3 \x{HH});
    # it used to raise DsnFieldError at every queue run and keep the message forever.
    async with node_with_fake(tmp_path) as (node, fake):
        fake.rcpt_replies["bad@relay.example"] = "550 5.1.1 bad\x01user"
        queue_id = await in_thread(send, node.port("smtp"), SENDER, [("bad@relay.example", "")])
        await queue_emptied(node)
        assert queue_id not in await node.spool.queue_ids()
        (dsn,) = dsns(tmp_path)
        raw = next((tmp_path / "data" / "mail" / "sender" / "new").iterdir()).read_bytes()
        header = raw.split(b"\n\n", 1)[0]  # the Maildir holds LF line ends
        assert all(len(line) <= 998 for line in raw.split(b"\n"))
        assert b"\x01" not in raw and b"\r" not in raw and b"\nBcc" not in header
        (_, failed) = delivery_status(dsn)
        assert (failed["action"], failed["status"]) == ("failed", "5.1.1")
        assert failed["diagnostic-code"] == "smtp; 550 5.1.1 bad\\x{01}user"
        stored = await node.tracking.message(queue_id)
        assert [r.dsn_pending for r in stored.recipients] == [False]


@pytest_twisted.ensureDeferred
async def test_null_sender_failure_produces_no_dsn(tmp_path):
    # RFC 3461 §5.2 NOTE: never a DSN about a message from <>.
    async with node_with_fake(tmp_path) as (node, fake):
        fake.rcpt_replies["bad@relay.example"] = "550 5.1.1 no"
        await in_thread(send, node.port("smtp"), "", [("bad@relay.example", "")])
        await queue_emptied(node)
        assert dsns(tmp_path) == []
        assert not (tmp_path / "data" / "mail").exists()


@pytest_twisted.ensureDeferred
async def test_notify_never_produces_no_dsn(tmp_path):
    # RFC 3461 §5.2.6 (failed here, NOTIFY=NEVER -> none).
    async with node_with_fake(tmp_path) as (node, fake):
        fake.rcpt_replies["bad@relay.example"] = "550 5.1.1 no"
        await in_thread(send, node.port("smtp"), SENDER, [("bad@relay.example", "NOTIFY=NEVER")])
        await queue_emptied(node)
        assert dsns(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_notify_success_to_a_maildir_produces_delivered(tmp_path):
    # RFC 3461 §5.2.3 (delivered to mailbox, NOTIFY has SUCCESS -> delivered).
    async with node_with_fake(tmp_path) as (node, _):
        await in_thread(
            send, node.port("smtp"), SENDER, [("alice@localhost", "NOTIFY=SUCCESS")], "RET=FULL"
        )
        await queue_emptied(node)
        (dsn,) = dsns(tmp_path)
        (_, delivered) = delivery_status(dsn)
        assert (delivered["action"], delivered["status"]) == ("delivered", "2.1.5")
        assert "original-envelope-id" not in delivery_status(dsn)[0]  # no ENVID was given
        # A success DSN returns the headers only (RFC 3461 §6.2, RFC 6522 §3).
        assert [p.get_content_type() for p in dsn.iter_parts()][-1] == "text/rfc822-headers"
        assert len(list((tmp_path / "data" / "mail" / "alice" / "new").iterdir())) == 1


@pytest_twisted.ensureDeferred
async def test_relay_to_a_dsn_hop_sends_no_relayed_dsn(tmp_path):
    # RFC 3461 §5.2.1: relayed to a DSN-capable hop, the hop takes the DSN duty.
    async with node_with_fake(tmp_path) as (node, fake):
        await in_thread(send, node.port("smtp"), SENDER, [("ok@relay.example", "NOTIFY=SUCCESS")])
        await queue_emptied(node)
        assert len([t for t in fake.transactions if t.content is not None]) == 1
        assert dsns(tmp_path) == []


@pytest_twisted.ensureDeferred
async def test_relay_to_a_hop_without_dsn_sends_relayed_when_success_was_asked(tmp_path):
    # RFC 3461 §5.2.2(b) (relayed to non-DSN SMTP, RCPT got 2xx, NOTIFY has SUCCESS -> relayed).
    bare = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES")
    async with node_with_fake(tmp_path, extensions=bare) as (node, fake):
        await in_thread(send, node.port("smtp"), SENDER, [("ok@relay.example", "NOTIFY=SUCCESS")])
        await queue_emptied(node)
        (transaction,) = [t for t in fake.transactions if t.content is not None]
        assert transaction.rcpt_params == [[]]  # nothing DSN-related went to that hop
        (dsn,) = dsns(tmp_path)
        (_, relayed) = delivery_status(dsn)
        assert (relayed["action"], relayed["status"]) == ("relayed", "2.1.9")


@pytest_twisted.ensureDeferred
async def test_delay_past_the_warning_time_produces_exactly_one_delayed(tmp_path):
    # RFC 3461 §5.2.5 (delayed, NOTIFY absent -> delayed, a MAY; we send it once).
    options = (
        ("queue.first_retry", "1s"),
        ("queue.max_retry_interval", "1s"),
        ("queue.delay_warning", "1s"),
    )
    async with node_with_fake(tmp_path, options) as (node, fake):
        fake.rcpt_replies["slow@relay.example"] = "451 4.3.0 try later"
        queue_id = await in_thread(send, node.port("smtp"), SENDER, [("slow@relay.example", "")])
        deadline = time.monotonic() + 15
        while not dsns(tmp_path):
            assert time.monotonic() < deadline, "no delayed DSN"
            await deferLater(reactor, 0.05, lambda: None)
        # Let several more attempts fail: still exactly one warning.
        attempts = len(fake.transactions)
        while len(fake.transactions) < attempts + 2:
            assert time.monotonic() < deadline + 10, "no further attempts"
            await deferLater(reactor, 0.05, lambda: None)
        (dsn,) = dsns(tmp_path)
        (_, delayed) = delivery_status(dsn)
        assert delayed["action"] == "delayed"
        assert delayed["status"] == "4.3.0"
        assert "will-retry-until" in delayed
        stored = await node.tracking.message(queue_id)
        assert stored.recipients[0].delay_warned
        assert stored.recipients[0].state.value == "deferred"
