"""A whole node receives over SMTP and relays to a FakeMTA: queue, router and SMTP transport.

Each test runs a real in-process node (spool, tracking store, queue, control socket)
whose ``relay.example`` route (or MX lookup through a DNS server on loopback) leads to
a FakeMTA. The client side is a raw socket conversation in a thread (smtpwire); what
is checked is what reached the next hop, what the tracking store recorded and what
is left in the spool. The retry schedule runs on the real reactor clock, so tests
that need a retry use a one- or two-second ``queue.first_retry``.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest_twisted
from dnsserver import Zone, a, mx, null_mx, serve_dns
from fakemta import ALL_EXTENSIONS, DOT, FakeMTA, FakeTransaction
from smtpwire import Wire, in_thread, queue_id_of, until
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.names import dns

from mtrkmta.config import Config
from mtrkmta.queue.service import QueueEvent
from mtrkmta.service import MTAService
from mtrkmta.testing import node_config, start_node, stop_node
from mtrkmta.tracking.interfaces import RecipientState, RecipientUpdate, StoredMessage

RELAY_DOMAIN = "relay.example"
SENDER = "sender@localhost"  # any DSN goes to a local Maildir, not out by MX
RCPT = f"bob@{RELAY_DOMAIN}"
OTHER_RCPT = f"carol@{RELAY_DOMAIN}"
CERTIFIER = bytes(range(100, 120))  # B, 20 octets, as an originator sends it
B64 = base64.b64encode(CERTIFIER).decode("ascii")
TIMEOUT = 86400  # the MTRK timeout requested by the client
ENVID = "x@y"
ORCPT = "rfc822;orig@origin.example"
NOTIFY = "NOTIFY=SUCCESS,FAILURE"
CONTENT = b"From: sender@localhost\r\nSubject: relay\r\n\r\nHello.\r\n"

NO_MTRK = tuple(e for e in ALL_EXTENSIONS if e != "MTRK")  # DSN, no MTRK (Postfix-like)
BARE = ("PIPELINING", "SIZE 10240000", "8BITMIME", "ENHANCEDSTATUSCODES")  # neither
FAST_RETRY = (("queue.first_retry", "1s"), ("queue.max_retry_interval", "2s"))


# -- helpers -------------------------------------------------------------------------


def send(
    port: int,
    messages: Sequence[tuple[str, Sequence[tuple[str, str]]]],
    content: bytes = CONTENT,
) -> list[str]:
    """Blocking: send each ``(mail_params, [(rcpt, rcpt_params)])`` in one session; queue ids."""
    ids = []
    with Wire(port) as wire:
        assert wire.ehlo().code == 250
        for mail_params, recipients in messages:
            reply = wire.command(f"MAIL FROM:<{SENDER}> {mail_params}".rstrip())
            assert reply.code == 250, str(reply)
            for address, params in recipients:
                reply = wire.command(f"RCPT TO:<{address}> {params}".rstrip())
                assert reply.code == 250, str(reply)
            ids.append(queue_id_of(wire.data(content)))
        assert wire.command("QUIT").code == 221
    return ids


async def send_one(node: MTAService, mail_params: str, *recipients: tuple[str, str]) -> str:
    (queue_id,) = await in_thread(send, node.port("smtp"), [(mail_params, recipients)])
    return queue_id


def copies(fake: FakeMTA) -> list[FakeTransaction]:
    """Transactions whose content reached the fake (the final dot arrived)."""
    return [t for t in fake.transactions if t.content is not None]


class Rig:
    """One FakeMTA behind the ``relay.example`` route and a node relaying to it; restartable."""

    def __init__(
        self,
        tmp_path: Path,
        fake: FakeMTA,
        options: Sequence[tuple[str, object]],
        tls: str = "none",
    ):
        self.fake = fake
        self.tls = tls  # the route's TLS policy
        self.data_dir = tmp_path / "data"
        self.options = tuple(options)
        self.node: MTAService | None = None
        self.events: list[QueueEvent] = []
        self.resolver: Any = None

    def config(self) -> Config:
        return node_config(
            self.data_dir,
            listeners=("smtp",),
            options=(
                ("routes", f"{RELAY_DOMAIN}=smtp:{self.fake.endpoint};tls={self.tls}"),
                ("durability.fsync", False),
                *self.options,
            ),
        )

    async def start(self) -> MTAService:
        self.node = await start_node(self.config(), resolver=self.resolver)
        assert self.node.queue is not None
        self.node.queue.observers.append(self.events.append)
        return self.node

    async def stop(self) -> None:
        if self.node is not None:
            node, self.node = self.node, None
            await stop_node(node)

    def updates(self, queue_id: str) -> list[RecipientUpdate]:
        """Every recipient update the queue recorded for ``queue_id``, in order."""
        return [u for e in self.events if e.message.queue_id == queue_id for u in e.updates]

    async def stored(self, queue_id: str) -> StoredMessage:
        assert self.node is not None and self.node.tracking is not None
        message = await self.node.tracking.message(queue_id)
        assert message is not None
        return message

    async def spooled(self) -> list[str]:
        assert self.node is not None and self.node.spool is not None
        return list(await self.node.spool.queue_ids())

    async def gone(self, *queue_ids: str) -> None:
        """Wait until none of ``queue_ids`` is in the spool any more."""

        async def check() -> bool:
            return not set(queue_ids) & set(await self.spooled())

        await until(check, f"{queue_ids} to leave the spool")


@asynccontextmanager
async def relaying(
    tmp_path: Path,
    *,
    extensions: Sequence[str] = ALL_EXTENSIONS,
    options: Sequence[tuple[str, object]] = (),
    resolver: Any = None,
    started: bool = True,
    tls: bool = False,
) -> AsyncIterator[Rig]:
    """A FakeMTA and a node routing ``relay.example`` to it; both stopped afterwards.
    ``tls``: the FakeMTA offers STARTTLS and the route requires it (``tls=encrypt``)."""
    fake = await FakeMTA(reactor, extensions=extensions, tls=tls).start()
    rig = Rig(tmp_path, fake, options, tls="encrypt" if tls else "none")
    rig.resolver = resolver
    try:
        if started:
            await rig.start()
        yield rig
    finally:
        try:
            await rig.stop()
        finally:
            await fake.stop()


def at_first_attempt(rig: Rig, action: Callable[[QueueEvent], Any]) -> list[Any]:
    """Run ``action`` synchronously when the queue records its first attempt.

    Observers run after the outcome is committed and before the retry is scheduled,
    so changing the FakeMTA (or starting a read or a stop) here cannot race the
    retry, whatever the load. The returned list receives ``action``'s result.
    """
    assert rig.node is not None and rig.node.queue is not None
    results: list[Any] = []

    def observer(event: QueueEvent) -> None:
        if not results:
            results.append(action(event))

    rig.node.queue.observers.append(observer)
    return results


def mtrk_of(transaction: FakeTransaction) -> tuple[str, int]:
    """The certifier and timeout of the MTRK= parameter the fake received."""
    (value,) = [p.split("=", 1)[1] for p in transaction.mail_params if p.startswith("MTRK=")]
    certifier, _, timeout = value.partition(":")
    return certifier, int(timeout)


def keywords(params: Sequence[str]) -> set[str]:
    return {p.split("=", 1)[0].upper() for p in params}


# -- 1-3: what goes to the next hop, by what it advertises -----------------------------


@pytest_twisted.ensureDeferred
async def test_mtrk_hop_gets_decremented_timeout_and_records_transferred(tmp_path):
    # RFC 3885 §3.1 (MUST/SHOULD): the outbound timeout is the requested one less the whole
    # seconds spent here; RFC 3885 §3.3 (SHOULD): an MTRK next hop gets the certifier, tracking says
    # `transferred`, 2.4.0, Remote-MTA = the next hop (RFC 3886 §3.3.3).
    options = (("queue.first_retry", "2s"), ("queue.max_retry_interval", "2s"))
    async with relaying(tmp_path, options=options) as rig:
        fake = rig.fake
        # The first attempt is turned away at the greeting so that more than one whole
        # second passes before the relay (the retry is 2 s later, give or take the
        # whole-second rounding of stored times): the decrement is then visible.
        fake.greeting = "421 4.3.2 fake.example.test busy, try again later"
        at_first_attempt(rig, lambda _: setattr(fake, "greeting", "220 fake.example.test ESMTP"))
        before = time.time()
        queue_id = await send_one(
            rig.node,
            f"RET=HDRS ENVID={ENVID} MTRK={B64}:{TIMEOUT}",
            (RCPT, f"{NOTIFY} ORCPT={ORCPT}"),
        )
        first = await until(lambda: rig.updates(queue_id), "the first attempt")
        assert [(u.state, u.action) for u in first] == [(RecipientState.DEFERRED, "delayed")]
        assert first[0].diagnostic.startswith("smtp; 421 4.3.2 ")
        await until(lambda: copies(fake), "the relayed copy")
        after = time.time()
        await rig.gone(queue_id)

        (relayed,) = copies(fake)
        certifier, remaining = mtrk_of(relayed)
        assert certifier == B64.rstrip("=")  # B goes on unchanged, unpadded (RFC 5321 §4.1.2)
        spent_at_most = int(after - before)
        assert TIMEOUT - spent_at_most <= remaining <= TIMEOUT - 1
        assert f"ENVID={ENVID}" in relayed.mail_params
        assert "RET=HDRS" in relayed.mail_params
        assert relayed.recipients == [RCPT]
        assert sorted(relayed.rcpt_params[0]) == sorted([NOTIFY, f"ORCPT={ORCPT}"])
        assert relayed.content.endswith(CONTENT)

        stored = await rig.stored(queue_id)
        (rcpt,) = stored.recipients
        assert rcpt.state is RecipientState.TRANSFERRED
        assert (rcpt.action, rcpt.status) == ("transferred", "2.4.0")
        assert rcpt.remote_mta == "dns; [127.0.0.1]"  # a domain-literal, RFC 3461 §9.3
        assert rcpt.certifier_forwarded is True
        assert rcpt.attempts == 2
        assert queue_id not in await rig.spooled()


@pytest_twisted.ensureDeferred
async def test_dsn_hop_without_mtrk_gets_dsn_parameters_only(tmp_path):
    # RFC 3885 §3.3 (MUST): no MTRK to a hop without it; ENVID, RET, NOTIFY, ORCPT go on
    # unchanged to a DSN hop and are never invented (ORCPT MAY be added, equal to the
    # RCPT address, RFC 3461 §5.2.1); tracking `relayed` 2.1.9 (RFC 3886 §3.3.3-3.3.4).
    async with relaying(tmp_path, extensions=NO_MTRK) as rig:
        fake = rig.fake
        tracked = await send_one(
            rig.node,
            f"ENVID={ENVID} RET=FULL MTRK={B64}:{TIMEOUT}",
            (RCPT, f"{NOTIFY} ORCPT={ORCPT}"),
            (OTHER_RCPT, ""),
        )
        plain = await send_one(rig.node, "", (RCPT, ""))
        await rig.gone(tracked, plain)

        first, second = copies(fake)
        assert "MTRK" not in keywords(first.mail_params)
        assert f"ENVID={ENVID}" in first.mail_params and "RET=FULL" in first.mail_params
        assert first.recipients == [RCPT, OTHER_RCPT]
        assert sorted(first.rcpt_params[0]) == sorted([NOTIFY, f"ORCPT={ORCPT}"])
        assert "NOTIFY" not in keywords(first.rcpt_params[1])
        assert set(first.rcpt_params[1]) <= {f"ORCPT=rfc822;{OTHER_RCPT}"}
        # Nothing that did not arrive is invented.
        assert not keywords(second.mail_params) & {"ENVID", "RET", "MTRK"}
        assert "NOTIFY" not in keywords(second.rcpt_params[0])

        stored = await rig.stored(tracked)
        for rcpt in stored.recipients:
            assert rcpt.state is RecipientState.RELAYED
            assert (rcpt.action, rcpt.status) == ("relayed", "2.1.9")
            assert rcpt.certifier_forwarded is False
            assert rcpt.remote_mta == "dns; [127.0.0.1]"


@pytest_twisted.ensureDeferred
async def test_hop_without_dsn_or_mtrk_gets_no_dsn_parameters(tmp_path):
    # RFC 3885 §3.3, RFC 3461 §5.2.2(a) (MUST): a hop without DSN gets none of
    # ENVID/NOTIFY/RET/ORCPT, and without MTRK no MTRK; still `relayed` 2.1.9.
    async with relaying(tmp_path, extensions=BARE) as rig:
        queue_id = await send_one(
            rig.node,
            f"ENVID={ENVID} RET=HDRS MTRK={B64}:{TIMEOUT}",
            (RCPT, f"{NOTIFY} ORCPT={ORCPT}"),
        )
        await rig.gone(queue_id)

        (relayed,) = copies(rig.fake)
        assert not keywords(relayed.mail_params) & {"ENVID", "RET", "MTRK"}
        assert relayed.rcpt_params == [[]]
        (rcpt,) = (await rig.stored(queue_id)).recipients
        assert (rcpt.state, rcpt.status) == (RecipientState.RELAYED, "2.1.9")
        assert rcpt.certifier_forwarded is False


@pytest_twisted.ensureDeferred
async def test_relayed_envid_and_orcpt_are_byte_identical_to_what_was_received(tmp_path):
    # RFC 3461 §5.2.1(a): the relayed ENVID has "the same associated esmtp-value";
    # (d): ORCPT "the identical original-recipient-address". "+41" is "A", which a
    # canonical re-encoding would send as "A": the received xtext must go on instead.
    async with relaying(tmp_path, extensions=NO_MTRK) as rig:
        queue_id = await send_one(
            rig.node, "ENVID=ab+41cd+2Bef-x", (RCPT, "ORCPT=rfc822;x+41t@dsn.test")
        )
        await rig.gone(queue_id)

        (relayed,) = copies(rig.fake)
        assert "ENVID=ab+41cd+2Bef-x" in relayed.mail_params
        assert relayed.rcpts == [f"RCPT TO:<{RCPT}> ORCPT=rfc822;x+41t@dsn.test"]
        (session,) = rig.fake.sessions
        wire = b"".join(session.reads)
        assert b" ENVID=ab+41cd+2Bef-x" in wire and b"abAcd" not in wire
        assert f"RCPT TO:<{RCPT}> ORCPT=rfc822;x+41t@dsn.test\r\n".encode() in wire
        # Tracking keeps the decoded ENVID, which TRACK compares (RFC 3887 §4).
        stored = await rig.stored(queue_id)
        assert stored.envid == "abAcd+ef-x"
        assert str(stored.recipients[0].orcpt) == "rfc822;xAt@dsn.test"


@pytest_twisted.ensureDeferred
async def test_mtrk_goes_out_unpadded_so_a_strict_next_hop_takes_it(tmp_path):
    # RFC 5321 §4.1.2 (and RFC 3461 §4): an esmtp-value holds no "="; RFC 3885 §1's
    # base64 is letters, digits, "+" and "/". go-smtp answers a padded MTRK with 501.
    # The client may still send it padded: it is accepted, and relayed without "=".
    async with relaying(tmp_path) as rig:
        rig.fake.strict_values = True
        queue_id = await send_one(
            rig.node, f"ENVID={ENVID} MTRK={B64}:{TIMEOUT}", (RCPT, f"ORCPT={ORCPT}")
        )
        await rig.gone(queue_id)

        (relayed,) = copies(rig.fake)
        certifier, _ = mtrk_of(relayed)
        assert len(certifier) == 27 and "=" not in certifier
        assert base64.b64decode(certifier + "=") == CERTIFIER
        (rcpt,) = (await rig.stored(queue_id)).recipients
        assert (rcpt.state, rcpt.status) == (RecipientState.TRANSFERRED, "2.4.0")
        assert rcpt.certifier_forwarded is True


def send_raw_data(port: int, raw: bytes) -> str:
    """Blocking: one message whose DATA block is ``raw`` exactly (terminator included)."""
    with Wire(port) as wire:
        assert wire.ehlo().code == 250
        assert wire.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert wire.command(f"RCPT TO:<{RCPT}>").code == 250
        assert wire.command("DATA").code == 354
        wire.send(raw)
        queue_id = queue_id_of(wire.reply())
        assert wire.command("QUIT").code == 221
    return queue_id


@pytest_twisted.ensureDeferred
async def test_relayed_content_carries_no_bare_cr_so_no_smuggling_at_the_next_hop(tmp_path):
    # SMTP smuggling, outbound half (CVE-2023-51764 family). "hello\r.\r\n" is content
    # here (only <CRLF>.<CRLF> ends DATA), but a next hop that takes a bare CR for a line
    # end would see the DATA end there and run the rest as a second transaction.
    # RFC 5321 §2.3.8: a client MUST NOT send CR or LF except as CRLF.
    smuggled = (
        b"Subject: smuggling\r\n\r\nhello\r.\r\nMAIL FROM:<admin@x.test>\r\n"
        b"RCPT TO:<victim@y.test>\r\nDATA\r\nForged\r\n"
    )
    async with relaying(tmp_path) as rig:
        queue_id = await in_thread(send_raw_data, rig.node.port("smtp"), smuggled + b".\r\n")
        await rig.gone(queue_id)

        (session,) = rig.fake.sessions
        received = b"".join(session.reads)
        assert b"hello" in received
        assert received.count(b"\r") == received.count(b"\n") == received.count(b"\r\n")
        (relayed,) = copies(rig.fake)
        assert relayed.content.endswith(b"\r\n\r\nhello\r\n.\r\n" + smuggled.split(b".\r\n", 1)[1])


# -- 4: MX routing through a real DNS server ------------------------------------------------


def far_zones() -> list[Zone]:
    return [
        Zone(
            "far.example",
            {
                "far.example": [mx(10, "mx1.far.example"), mx(20, "mx2.far.example")],
                # Nothing listens on 127.0.0.3 (the FakeMTA binds 127.0.0.1 only).
                "mx1.far.example": [a("127.0.0.3")],
                "mx2.far.example": [a("127.0.0.1")],
            },
        ),
        # Null MX (RFC 7505), with an A record that reaches the FakeMTA if it were used.
        Zone("nomail.example", {"nomail.example": [null_mx(), a("127.0.0.1")]}),
    ]


def mx_options(fake_port: int) -> tuple[tuple[str, object], ...]:
    return (
        ("routes", "far.example=mx"),
        ("routes", "nomail.example=mx"),
        ("delivery.smtp_port", fake_port),
    )


@pytest_twisted.ensureDeferred
async def test_mx_route_falls_back_to_the_second_mx(tmp_path):
    # RFC 5321 §5.1: MX hosts in preference order; the preferred one refuses the
    # connection, so the same attempt goes on to the next. Remote-MTA names the host
    # that took the message (RFC 3885 §3.3, RFC 3886 §3.3.3).
    async with serve_dns(reactor, far_zones()) as dns_server:
        async with relaying(tmp_path, resolver=dns_server.resolver(), started=False) as rig:
            rig.options += mx_options(rig.fake.port)
            await rig.start()
            queue_id = await send_one(rig.node, f"ENVID={ENVID}", ("dan@far.example", ""))
            await rig.gone(queue_id)

            (relayed,) = copies(rig.fake)
            assert relayed.recipients == ["dan@far.example"]
            (rcpt,) = (await rig.stored(queue_id)).recipients
            assert rcpt.state is RecipientState.RELAYED
            assert rcpt.remote_mta == "dns; mx2.far.example"
            assert rcpt.attempts == 1  # the fallback happened within one attempt
            asked = {(q.name, q.type) for q in dns_server.queries}
            assert ("far.example", dns.MX) in asked
            assert ("mx1.far.example", dns.A) in asked  # the preferred MX was considered


@pytest_twisted.ensureDeferred
async def test_null_mx_fails_at_once_without_connecting(tmp_path):
    # RFC 7505 §3-4, RFC 3886 §3.3.3 (`failed`): a null MX domain does not take mail: the
    # recipient fails 5.1.10 on the first attempt, with no connection to anyone (the
    # domain's A record points at the FakeMTA and must not be used as implicit MX).
    async with serve_dns(reactor, far_zones()) as dns_server:
        async with relaying(tmp_path, resolver=dns_server.resolver(), started=False) as rig:
            rig.options += mx_options(rig.fake.port)
            await rig.start()
            queue_id = await send_one(rig.node, "", ("erin@nomail.example", ""))
            await rig.gone(queue_id)

            assert [(u.state, u.status) for u in rig.updates(queue_id)] == [
                (RecipientState.FAILED, "5.1.10")
            ]
            (rcpt,) = (await rig.stored(queue_id)).recipients
            assert (rcpt.state, rcpt.action, rcpt.status) == (
                RecipientState.FAILED,
                "failed",
                "5.1.10",
            )
            assert rcpt.attempts == 1
            assert rig.fake.sessions == []


# -- 5-7: temporary, permanent and unknown outcomes -----------------------------------------


@pytest_twisted.ensureDeferred
async def test_4xx_at_rcpt_is_deferred_then_retried_and_delivered_once(tmp_path):
    # RFC 5321 §4.2.5, RFC 3886 §3.3, §3.3.3: a 4xx defers the recipient (`delayed`, the
    # reply's 4.x.x), with a next attempt and will-retry-until = arrival + lifetime
    # (RFC 3464 §2.3.8); the retry delivers it, exactly once.
    options = (*FAST_RETRY, ("queue.max_lifetime", "1h"))
    async with relaying(tmp_path, options=options) as rig:
        fake = rig.fake
        fake.rcpt_replies[RCPT] = f"451 4.2.1 <{RCPT}>: mailbox busy"

        def accept_from_now_on(event: QueueEvent) -> Any:
            fake.rcpt_replies.clear()
            # What the store holds after the first attempt, read before any retry.
            return rig.node.tracking.message(event.message.queue_id)

        snapshot = at_first_attempt(rig, accept_from_now_on)
        queue_id = await send_one(rig.node, "", (RCPT, ""))
        await until(lambda: snapshot, "the first attempt")
        stored = await snapshot[0]
        (rcpt,) = stored.recipients
        assert rcpt.state is RecipientState.DEFERRED
        assert (rcpt.action, rcpt.status) == ("delayed", "4.2.1")
        assert rcpt.diagnostic == f"smtp; 451 4.2.1 <{RCPT}>: mailbox busy"
        assert rcpt.remote_mta == "dns; [127.0.0.1]"
        assert rcpt.next_attempt == rcpt.last_attempt + 1  # queue.first_retry
        assert rcpt.will_retry_until == stored.arrival + 3600

        await rig.gone(queue_id)
        (rcpt,) = (await rig.stored(queue_id)).recipients
        assert (rcpt.state, rcpt.status, rcpt.attempts) == (RecipientState.RELAYED, "2.1.9", 2)
        refused, delivered = fake.transactions
        assert (refused.accepted, refused.content) == ([], None)  # no DATA after the 451
        assert delivered.accepted == [RCPT]
        assert copies(fake) == [delivered]


@pytest_twisted.ensureDeferred
async def test_5xx_at_rcpt_fails_and_leaves_the_spool(tmp_path):
    # RFC 5321 §4.2.5, RFC 3886 §3.3, §3.3.3: a 5xx is final: `failed`, the reply's code,
    # Diagnostic-Code `smtp; <reply>` (RFC 3464 §2.3.6); the message leaves the spool.
    async with relaying(tmp_path, options=FAST_RETRY) as rig:
        reply = f"550 5.1.1 <{RCPT}>: Recipient address rejected: User unknown"
        rig.fake.rcpt_replies[RCPT] = reply
        queue_id = await send_one(rig.node, "", (RCPT, ""))
        await rig.gone(queue_id)

        (rcpt,) = (await rig.stored(queue_id)).recipients
        assert rcpt.state is RecipientState.FAILED
        assert (rcpt.action, rcpt.status) == ("failed", "5.1.1")
        assert rcpt.diagnostic == f"smtp; {reply}"
        assert rcpt.diagnostic.startswith("smtp; 550 5.1.1 ")
        assert rcpt.attempts == 1
        assert copies(rig.fake) == []


@pytest_twisted.ensureDeferred
async def test_connection_lost_after_the_dot_is_retried_at_the_risk_of_a_duplicate(tmp_path):
    # RFC 5321 §4.1.1.4 / RFC 1047: the connection drops after the final dot, before the
    # reply: the outcome is unknown. It is deferred 4.4.2 and retried, so the next hop
    # may get the message twice: at-least-once is preferred to losing it.
    async with relaying(tmp_path, options=FAST_RETRY) as rig:
        fake = rig.fake
        fake.drop_at = DOT
        at_first_attempt(rig, lambda _: setattr(fake, "drop_at", None))
        queue_id = await send_one(rig.node, "", (RCPT, ""))
        (first,) = await until(lambda: rig.updates(queue_id), "the first attempt")
        assert (first.state, first.status) == (RecipientState.DEFERRED, "4.4.2")
        assert "after the final dot" in first.diagnostic
        assert "may have been delivered" in first.diagnostic
        await rig.gone(queue_id)

        (rcpt,) = (await rig.stored(queue_id)).recipients
        assert (rcpt.state, rcpt.attempts) == (RecipientState.RELAYED, 2)
        # The duplicate: both copies reached the next hop.
        dropped, delivered = copies(fake)
        assert dropped.content == delivered.content
        assert dropped.recipients == delivered.recipients == [RCPT]


# -- 8-9: restart and connection reuse ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_restart_redelivers_only_the_recipient_still_queued(tmp_path):
    # RFC 3886 §3.3, RFC 3885 §3.1: each recipient's state is durable; after a restart the queue
    # resumes from the tracking store and only the non-final recipient goes again.
    async with relaying(tmp_path, options=FAST_RETRY) as rig:
        fake = rig.fake
        fake.rcpt_replies[OTHER_RCPT] = "451 4.3.0 try again later"
        node = rig.node
        # The stop starts as soon as the attempt is recorded, long before the retry.
        stopping = at_first_attempt(rig, lambda _: stop_node(node))
        queue_id = await send_one(rig.node, "", (RCPT, ""), (OTHER_RCPT, ""))
        await until(lambda: stopping, "the first attempt")
        await stopping[0]
        rig.node = None
        updates = rig.updates(queue_id)
        assert sorted((u.index, u.state) for u in updates) == [
            (0, RecipientState.RELAYED),
            (1, RecipientState.DEFERRED),
        ]
        (before,) = copies(fake)
        assert before.accepted == [RCPT]

        del fake.rcpt_replies[OTHER_RCPT]
        await rig.start()  # a new node on the same data dir
        await rig.gone(queue_id)
        first, again = copies(fake)
        assert first is before
        assert again.recipients == [OTHER_RCPT]
        stored = await rig.stored(queue_id)
        assert [(r.state, r.attempts) for r in stored.recipients] == [
            (RecipientState.RELAYED, 1),
            (RecipientState.RELAYED, 2),
        ]


@pytest_twisted.ensureDeferred
async def test_one_connection_carries_messages_accepted_back_to_back(tmp_path):
    # RFC 5321 §3.3 (several transactions per session): the idle connection to a next
    # hop is reused (RSET, then the next MAIL). With one connection per destination the
    # second message waits for the first and takes its connection, deterministically.
    options = (("delivery.destination_concurrency", 1),)
    async with relaying(tmp_path, options=options) as rig:
        fake = rig.fake
        ids = await in_thread(
            send, rig.node.port("smtp"), [("", [(RCPT, "")]), ("", [(OTHER_RCPT, "")])]
        )
        await rig.gone(*ids)

        (session,) = fake.sessions
        assert [t.recipients for t in session.transactions if t.content is not None] == [
            [RCPT],
            [OTHER_RCPT],
        ]
        assert "RSET" in session.commands
        for queue_id in ids:
            (rcpt,) = (await rig.stored(queue_id)).recipients
            assert rcpt.state is RecipientState.RELAYED


@pytest_twisted.ensureDeferred
async def test_restart_keeps_the_retry_time_of_a_deferred_recipient(tmp_path):
    # RFC 3886 §3.3: after a restart a deferred recipient waits for its stored next
    # attempt: no early retry, and no busy queue runs while it waits (the queue used to
    # re-run a not-yet-due message at once, over and over, until it was due).
    async with relaying(tmp_path, options=(("queue.first_retry", "1h"),)) as rig:
        fake = rig.fake
        fake.rcpt_replies[RCPT] = "451 4.3.0 try again later"
        queue_id = await send_one(rig.node, "", (RCPT, ""))
        await until(lambda: rig.updates(queue_id), "the first attempt")  # retry in 1 h
        await rig.stop()
        sessions = len(fake.sessions)

        node = await rig.start()
        assert node.tracking is not None
        reads: list[str] = []
        read = node.tracking.message

        def counting(wanted: str) -> Any:
            reads.append(wanted)
            return read(wanted)

        node.tracking.message = counting  # type: ignore[method-assign]
        await deferLater(reactor, 0.5, lambda: None)
        assert len(reads) <= 5, f"{len(reads)} queue runs in 0.5 s for a message due in 1 h"
        assert len(fake.sessions) == sessions
        (rcpt,) = (await rig.stored(queue_id)).recipients
        assert (rcpt.state, rcpt.attempts) == (RecipientState.DEFERRED, 1)
        assert queue_id in await rig.spooled()
