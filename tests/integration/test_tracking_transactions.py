"""One tracked message reaching a node as several transactions: one answer for all.

RFC 3885 §3.1: an MTQP server answers for a message as long as it keeps tracking
data about it, and MUST NOT deny knowledge of it while it sits in the queue. A
message can reach a node as several transactions with the same ENVID and certifier:
the previous hop split its recipients (mtrkmta splits at ``delivery.max_recipients``),
or sent some over SMTP and some over LMTP. Two real nodes on loopback: B relays to C;
C delivers ``c.example`` and ``lmtp.example`` into Maildirs and routes ``far.example``
to a port where nothing listens, so that part stays queued at C while the others are
delivered. The question goes to C's MTQP listener with mtrkmta's own client.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_twisted
from smtpwire import RefusingPort, Wire, in_thread, queue_id_of, until
from twisted.internet import reactor

from mtrkmta.mtqp.client import TrackingClient
from mtrkmta.service import MTAService
from mtrkmta.testing import node_config, start_node, stop_node
from mtrkmta.tracking.interfaces import RecipientState

SECRET = b"sixteen octets!!"
ENVID = "split-1@origin.example"
C_NAME = "mx-c.example.test"
MESSAGE = b"From: s@origin.example\r\nSubject: split\r\n\r\nHello.\r\n"
QUICK = (("durability.fsync", False), ("queue.first_retry", "1h"))


@dataclass
class Pair:
    b: MTAService
    c: MTAService

    def send(self, recipients: list[str]) -> str:
        """Blocking: the tracked message to B; its queue id at B."""
        certifier = base64.b64encode(hashlib.sha1(SECRET).digest()).decode().rstrip("=")
        with Wire(self.b.port("smtp")) as wire:
            assert wire.ehlo().code == 250
            reply = wire.command(
                f"MAIL FROM:<s@origin.example> ENVID={ENVID} MTRK={certifier}:86400"
            )
            assert reply.code == 250, str(reply)
            for rcpt in recipients:
                assert wire.command(f"RCPT TO:<{rcpt}>").code == 250
            queue_id = queue_id_of(wire.data(MESSAGE))
            assert wire.command("QUIT").code == 221
        return queue_id

    async def transactions(self) -> list[Any]:
        assert self.c.tracking is not None
        return await self.c.tracking.lookup_transactions(ENVID, hashlib.sha1(SECRET).digest())

    async def track_c(self) -> list[tuple[str, str]]:
        """What C's MTQP server answers: (final recipient, action) per recipient."""
        here = {C_NAME: ("127.0.0.1", self.c.port("mtqp"))}.get
        client = TrackingClient(reactor, None, tls="none", connect_to=here, reply_timeout=5)
        secret = base64.b64encode(SECRET).decode()
        hop = await client.query(C_NAME, ENVID, secret)
        assert hop.error is None, hop.error
        (report,) = hop.reports
        return sorted((str(r.final_recipient), r.action) for r in report.recipients)


@asynccontextmanager
async def pair(tmp_path: Path, *b_options: tuple[str, object]) -> AsyncIterator[Pair]:
    with RefusingPort() as far:  # far.example's next hop, down for the whole test
        c = await start_node(
            node_config(
                tmp_path / "c",
                hostname=C_NAME,
                listeners=("smtp", "lmtp", "mtqp"),
                options=(
                    *QUICK,
                    ("domains.local", ("c.example", "lmtp.example")),
                    ("local.users", ("alice", "bob", "dave")),
                    ("relay.trusted_networks", ("127.0.0.0/8",)),
                    ("routes", f"far.example=smtp:tcp:host=127.0.0.1:port={far.port}"),
                ),
            )
        )
        b = None
        try:
            smtp_c = f"smtp:tcp:host=127.0.0.1:port={c.port('smtp')};tls=none"
            b = await start_node(
                node_config(
                    tmp_path / "b",
                    hostname="mx-b.example.test",
                    listeners=("smtp",),
                    options=(
                        *QUICK,
                        ("routes", f"c.example={smtp_c}"),
                        ("routes", f"far.example={smtp_c}"),
                        ("routes", f"lmtp.example=lmtp:tcp:host=127.0.0.1:port={c.port('lmtp')}"),
                        *b_options,
                    ),
                )
            )
            yield Pair(b, c)
        finally:
            if b is not None:
                await stop_node(b)
            await stop_node(c)


async def settled(rig: Pair, parts: int) -> None:
    """Wait until C holds ``parts`` transactions, every recipient attempted once."""

    async def done() -> bool:
        found = await rig.transactions()
        states = [r.state for m in found for r in m.recipients]
        return len(found) == parts and RecipientState.QUEUED not in states

    await until(done, f"{parts} transactions at C, each attempted")


@pytest_twisted.ensureDeferred
async def test_a_message_split_by_max_recipients_is_tracked_whole(tmp_path):
    # B sends at most 2 recipients per transaction: 3 recipients reach C as 2 + 1.
    async with pair(tmp_path, ("delivery.max_recipients", 2)) as rig:
        await in_thread(rig.send, ["alice@c.example", "bob@c.example", "carol@far.example"])
        await settled(rig, 2)
        assert [len(m.recipients) for m in await rig.transactions()] == [2, 1]
        assert await rig.track_c() == [
            ("rfc822; alice@c.example", "delivered"),
            ("rfc822; bob@c.example", "delivered"),
            ("rfc822; carol@far.example", "delayed"),  # still in C's queue: never denied
        ]


@pytest_twisted.ensureDeferred
async def test_a_message_sent_over_smtp_and_lmtp_is_tracked_whole(tmp_path):
    # B sends c.example and far.example over SMTP, lmtp.example over LMTP: two
    # transactions at C, one of them with a recipient still queued.
    async with pair(tmp_path) as rig:
        await in_thread(rig.send, ["alice@c.example", "dave@lmtp.example", "carol@far.example"])
        await settled(rig, 2)
        listeners = sorted(m.client.listener for m in await rig.transactions())
        assert listeners == ["lmtp", "smtp"]
        assert await rig.track_c() == [
            ("rfc822; alice@c.example", "delivered"),
            ("rfc822; carol@far.example", "delayed"),
            ("rfc822; dave@lmtp.example", "delivered"),
        ]
