"""A whole node relays with BDAT (RFC 3030) to a scripted next hop that offers CHUNKING:
SMTP relay and LMTP delivery, the bytes checked as the next hop read them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest_twisted
from fakemta import ALL_EXTENSIONS, FakeMTA
from smtpwire import in_thread, until
from test_relay_end_to_end import RCPT, Rig, copies, relaying, send
from test_smtp_transport import ARRIVAL, SETTINGS, envelope, hop, server, states, world
from twisted.internet import reactor

from mtrkmta.delivery.interfaces import Attempt
from mtrkmta.tracking.interfaces import RecipientState
from mtrkmta.tracking.interfaces import RecipientState as S

CHUNKING = (*ALL_EXTENSIONS, "CHUNKING")
DOVECOT = ("8BITMIME", "CHUNKING", "ENHANCEDSTATUSCODES", "PIPELINING")
LMTP_DOMAIN = "lmtp.example"
__all__ = ["world"]  # the transport tests' fixture (test_smtp_transport)
CHUNK = 256 * 1024  # mtrkmta.smtp.outbound.BDAT_CHUNK


def message(size: int) -> bytes:
    """A message of about ``size`` octets with lines that DATA would dot-stuff, and 8-bit."""
    head = b"From: sender@localhost\r\nSubject: chunks\r\n\r\n.\r\n..\r\n.hidden\r\n"
    line = b".line \xe4\xf6\xfc\xff\x80 0123456789 abcdefghij\r\n"
    return head + line * (size // len(line)) + b".\r\nend\r\n"


async def submit(rig: Rig, content: bytes, *recipients: str) -> str:
    """Send ``content`` to the node over SMTP (BODY=8BITMIME); its queue id."""
    assert rig.node is not None
    pairs = [(address, "") for address in recipients]
    (queue_id,) = await in_thread(send, rig.node.port("smtp"), [("BODY=8BITMIME", pairs)], content)
    return queue_id


async def relay(rig: Rig, content: bytes, *recipients: str) -> str:
    queue_id = await submit(rig, content, *recipients)
    await rig.gone(queue_id)
    return queue_id


@pytest_twisted.ensureDeferred
async def test_relay_to_a_chunking_hop_goes_in_bdat_chunks_without_dot_stuffing(tmp_path):
    content = message(600 * 1024)
    async with relaying(tmp_path, extensions=CHUNKING) as rig:
        queue_id = await relay(rig, content, RCPT)
        (relayed,) = copies(rig.fake)
        assert relayed.raw_data == b""  # no DATA at all
        commands = [line for line, _ in relayed.chunks]
        assert commands[:-1] == [f"BDAT {CHUNK}"] * (len(commands) - 1)
        assert len(commands) == 3 and commands[-1].endswith(" LAST")
        for line, octets in relayed.chunks:  # each size is the exact count that followed
            assert line.split(" ")[1] == str(len(octets))
        # The stored message after our Received: header, byte for byte: the "." lines as
        # they are (RFC 3030 §2: no stuffing), 8-bit octets untouched.
        assert relayed.content is not None and relayed.content.endswith(content)
        assert relayed.content.startswith(b"Received: ")
        stored = await rig.stored(queue_id)
        assert [r.state for r in stored.recipients] == [RecipientState.RELAYED]


@pytest_twisted.ensureDeferred
async def test_chunking_off_relays_with_data_although_offered(tmp_path):
    content = message(1024)
    async with relaying(
        tmp_path, extensions=CHUNKING, options=(("delivery.chunking", False),)
    ) as rig:
        await relay(rig, content, RCPT)
        (relayed,) = copies(rig.fake)
        assert relayed.chunks == []
        assert b"\r\n..\r\n...\r\n..hidden\r\n" in relayed.raw_data  # DATA, dot-stuffed
        assert relayed.content is not None and relayed.content.endswith(content)


@pytest_twisted.ensureDeferred
async def test_a_refused_chunk_defers_the_message(tmp_path):
    content = message(300 * 1024)  # two chunks: the first one is refused
    options = (("queue.first_retry", "1h"),)
    async with relaying(tmp_path, extensions=CHUNKING, options=options) as rig:
        rig.fake.replies["BDAT"] = "452 4.3.1 Insufficient system storage"
        queue_id = await submit(rig, content, RCPT)
        (update,) = await until(lambda: rig.updates(queue_id), "the first attempt")
        assert update.state is RecipientState.DEFERRED
        assert update.diagnostic == "smtp; 452 4.3.1 Insufficient system storage"
        (attempt,) = rig.fake.transactions
        assert [line for line, _ in attempt.chunks] == [f"BDAT {CHUNK}"]  # no second chunk
        assert attempt.content is None


@asynccontextmanager
async def lmtp_relaying(tmp_path: Path, extensions: Sequence[str]) -> AsyncIterator[Rig]:
    """A node routing ``relay.example`` to a fake SMTP hop and ``lmtp.example`` to a fake LMTP
    server (Dovecot's keywords); ``rig.fake`` is the LMTP one."""
    lmtp = await FakeMTA(reactor, lmtp=True, extensions=extensions).start()
    try:
        async with relaying(
            tmp_path, options=(("routes", f"{LMTP_DOMAIN}=lmtp:{lmtp.endpoint}"),)
        ) as rig:
            rig.fake, smtp_fake = lmtp, rig.fake
            try:
                yield rig
            finally:
                rig.fake = smtp_fake
    finally:
        await lmtp.stop()


@pytest_twisted.ensureDeferred
async def test_lmtp_delivery_with_bdat_last_and_one_reply_per_recipient(tmp_path):
    content = message(4096)
    full = f"full@{LMTP_DOMAIN}"
    async with lmtp_relaying(tmp_path, DOVECOT) as rig:
        rig.fake.final_replies[full] = f"452 4.2.2 <{full}> Quota exceeded"
        queue_id = await submit(rig, content, f"alice@{LMTP_DOMAIN}", full)
        updates = await until(lambda: rig.updates(queue_id), "the LMTP attempt")
        states = sorted((u.index, u.state) for u in updates)
        assert states == [(0, RecipientState.DELIVERED), (1, RecipientState.DEFERRED)]
        (delivered,) = copies(rig.fake)
        ((line, octets),) = delivered.chunks
        assert line == f"BDAT {len(octets)} LAST"
        assert octets.endswith(content) and octets.startswith(b"Received: ")


# -- BODY=BINARYMIME (RFC 3030 §3): only with BDAT, to a hop offering it ---------------------

BINARY = b"Subject: binary\r\nContent-Type: application/octet-stream\r\n\r\n\x00\r\x0a\n.\r\n\xff"


def binary_attempt(fake: FakeMTA) -> Attempt:
    env = envelope()
    env = replace(env, params=replace(env.params, body="BINARYMIME"))
    return Attempt(env, BINARY, (0,), hop(server(fake)), ARRIVAL + 100.9)


@pytest_twisted.ensureDeferred
async def test_binarymime_goes_unchanged_with_bdat_to_a_hop_offering_it(world):
    fake = await world.fake(extensions=(*CHUNKING, "BINARYMIME"))
    (outcome,) = await world.smtp().deliver(binary_attempt(fake))
    assert outcome.state == S.TRANSFERRED
    (sent,) = fake.transactions
    assert "BODY=BINARYMIME" in sent.mail_params
    assert sent.chunks == [(f"BDAT {len(BINARY)} LAST", BINARY)]  # bare CR/LF, no final CRLF


@pytest_twisted.ensureDeferred
async def test_binarymime_to_a_hop_without_it_or_with_chunking_off_fails_5_6_3(world):
    fake = await world.fake(extensions=CHUNKING)  # CHUNKING, but no BINARYMIME
    (outcome,) = await world.smtp().deliver(binary_attempt(fake))
    assert states([outcome]) == [(S.FAILED, "5.6.3")]
    both = await world.fake(extensions=(*CHUNKING, "BINARYMIME"))
    off = replace(SETTINGS, chunking=False)  # delivery.chunking = false: DATA only
    (outcome,) = await world.smtp(off).deliver(binary_attempt(both))
    assert states([outcome]) == [(S.FAILED, "5.6.3")]
    assert not fake.transactions and not both.transactions
