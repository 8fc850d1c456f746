"""SMTPTransport and LMTPTransport against fake servers: parameters, outcomes, fallback, reuse."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from fakemta import ALL_EXTENSIONS, DOT, GREETING, FakeMTA
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock, deferLater

from mtrkmta.delivery.interfaces import (
    Attempt,
    NextHop,
    RecipientOutcome,
    Relay,
    Server,
    TLSPolicy,
    TransportKind,
)
from mtrkmta.delivery.smtp import LMTPTransport, SMTPTransport, SMTPTransportSettings
from mtrkmta.envelope import Envelope, MailParams, Mtrk, OriginalRecipient, RcptParams, Recipient
from mtrkmta.smtp.client import ClientTimeouts
from mtrkmta.tracking.interfaces import RecipientState as S

DAY = 86400.0
ARRIVAL = 1_700_000_000.0
CERTIFIER = bytes(range(1, 21))
B64 = base64.b64encode(CERTIFIER).decode("ascii").rstrip("=")  # unpadded on the wire
SETTINGS = SMTPTransportSettings(
    hostname="relay.example.test",
    default_retention=9 * DAY,
    timeouts=ClientTimeouts().scaled(0.01),
)
CONTENT = b"Subject: test\r\n\r\nHello.\r\n"
NO_MTRK = tuple(e for e in ALL_EXTENSIONS if e != "MTRK")  # Postfix-like: DSN, no MTRK
BARE = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES")  # neither DSN nor MTRK


class World:
    """Fake servers and transports of one test; closed at teardown."""

    def __init__(self) -> None:
        self.fakes: list[FakeMTA] = []
        self.transports: list[SMTPTransport] = []

    async def fake(self, **options: Any) -> FakeMTA:
        fake = await FakeMTA(reactor, **options).start()
        self.fakes.append(fake)
        return fake

    def smtp(
        self, settings: SMTPTransportSettings = SETTINGS, clock: Clock | None = None
    ) -> SMTPTransport:
        transport = SMTPTransport(reactor, settings, clock)
        self.transports.append(transport)
        return transport

    def lmtp(self, settings: SMTPTransportSettings = SETTINGS) -> LMTPTransport:
        transport = LMTPTransport(reactor, settings)
        self.transports.append(transport)
        return transport

    async def close(self) -> None:
        for transport in self.transports:
            await transport.close()
        for fake in self.fakes:
            await fake.stop()


@pytest_twisted.async_yield_fixture
async def world() -> AsyncIterator[World]:
    w = World()
    yield w
    await w.close()


def server(fake: FakeMTA, name: str = "mx1.example.test") -> Server:
    return Server(name, fake.endpoint)


def hop(
    *servers: Server,
    transport: TransportKind = "smtp",
    tls: TLSPolicy = "none",
    max_recipients: int = 50,
) -> NextHop:
    return NextHop(transport, f"{transport}:example.test", servers, tls, max_recipients)


def envelope(
    *addresses: str,
    timeout: int | None = 3600,
    mtrk: bool = True,
    smtputf8: bool = False,
    rcpt_params: RcptParams | None = None,
) -> Envelope:
    params = rcpt_params or RcptParams()
    return Envelope(
        queue_id="Q1",
        sender="alice@client.example",
        recipients=tuple(Recipient(a, params) for a in addresses or ("bob@example.test",)),
        params=MailParams(
            envid="env-42@client.example",
            ret="HDRS",
            mtrk=Mtrk(CERTIFIER, timeout) if mtrk else None,
            smtputf8=smtputf8,
        ),
        arrival=ARRIVAL,
    )


def attempt(
    next_hop: NextHop, env: Envelope | None = None, now: float = ARRIVAL + 100.9
) -> Attempt:
    env = env or envelope()
    return Attempt(env, CONTENT, tuple(range(len(env.recipients))), next_hop, now)


async def dead_endpoint() -> str:
    """A loopback port on which nothing listens any more."""
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    number = port.getHost().port
    await port.stopListening()
    return f"tcp:host=127.0.0.1:port={number}"


def states(outcomes: list[RecipientOutcome]) -> list[tuple[S, str]]:
    return [(o.state, o.status) for o in outcomes]


# -- MTRK and DSN parameters on the wire (RFC 3885 §3.1, §3.3; RFC 3461 §5.2.1-§5.2.2) ------


@pytest_twisted.ensureDeferred
async def test_mtrk_hop_gets_the_decremented_timeout_and_outcome_transferred(world):
    fake = await world.fake()
    (outcome,) = await world.smtp().deliver(attempt(hop(server(fake))))
    (transaction,) = fake.transactions
    # 100.9 s after arrival: 100 whole seconds spent here (RFC 3885 §3.1).
    assert f"MTRK={B64}:3500" in transaction.mail_params
    assert "ENVID=env-42@client.example" in transaction.mail_params
    assert outcome == RecipientOutcome(
        0,
        S.TRANSFERRED,
        "2.4.0",
        "smtp; 250 2.0.0 Ok: queued as FAKE",
        "dns; mx1.example.test",
        certifier_forwarded=True,
        dsn_passed=True,  # the hop advertised DSN: it reports from now on
        relay=Relay("mx1.example.test", "127.0.0.1", fake.port),  # the delivery log's relay=
        timing=outcome.timing,
    )
    assert outcome.timing is not None and outcome.timing.connected is not None
    assert outcome.timing.connected <= outcome.timing.done


@pytest_twisted.ensureDeferred
async def test_no_timeout_requested_uses_default_retention(world):
    fake = await world.fake()
    await world.smtp().deliver(attempt(hop(server(fake)), envelope(timeout=None), ARRIVAL + 10))
    assert f"MTRK={B64}:{int(9 * DAY) - 10}" in fake.transactions[0].mail_params


@pytest_twisted.ensureDeferred
async def test_dsn_hop_without_mtrk_keeps_envid_and_orcpt_drops_mtrk(world):
    fake = await world.fake(extensions=NO_MTRK)
    params = RcptParams(frozenset({"SUCCESS", "FAILURE"}), OriginalRecipient("rfc822", "o+1@x"))
    (outcome,) = await world.smtp().deliver(
        attempt(hop(server(fake)), envelope(rcpt_params=params))
    )
    (transaction,) = fake.transactions
    assert transaction.mail_params == [
        f"SIZE={len(CONTENT)}",
        "ENVID=env-42@client.example",
        "RET=HDRS",
    ]
    assert transaction.rcpt_params == [["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;o+2B1@x"]]
    assert (outcome.state, outcome.status, outcome.certifier_forwarded) == (
        S.RELAYED,
        "2.1.9",
        False,
    )
    assert outcome.dsn_passed  # RFC 3461 §5.2.1: the DSN hop reports success from now on


@pytest_twisted.ensureDeferred
async def test_non_dsn_hop_gets_nothing_dsn_related(world):
    fake = await world.fake(extensions=BARE)
    params = RcptParams(frozenset({"SUCCESS"}), OriginalRecipient("rfc822", "o@x"))
    (outcome,) = await world.smtp().deliver(
        attempt(hop(server(fake)), envelope(rcpt_params=params))
    )
    (transaction,) = fake.transactions
    assert transaction.mail == "MAIL FROM:<alice@client.example>"
    assert transaction.rcpts == ["RCPT TO:<bob@example.test>"]
    assert states([outcome]) == [(S.RELAYED, "2.1.9")]
    assert not outcome.dsn_passed  # RFC 3461 §5.2.2(b): we owe a `relayed` DSN


@pytest_twisted.ensureDeferred
async def test_expired_timeout_drops_mtrk(world):
    fake = await world.fake()
    (outcome,) = await world.smtp().deliver(attempt(hop(server(fake)), now=ARRIVAL + 3600.5))
    params = fake.transactions[0].mail_params
    assert not any(p.startswith("MTRK=") for p in params)
    assert "ENVID=env-42@client.example" in params
    assert (outcome.state, outcome.certifier_forwarded) == (S.RELAYED, False)


# -- replies to outcomes ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_4xx_deferred_5xx_failed_with_diagnostics(world):
    fake = await world.fake()
    fake.rcpt_replies["gone@example.test"] = "550-5.1.1 no such user\n550 5.1.1 try another"
    fake.rcpt_replies["full@example.test"] = "452 4.2.2 mailbox full"
    fake.rcpt_replies["plain4@example.test"] = "450 busy"
    fake.rcpt_replies["plain5@example.test"] = "553 bad address"
    env = envelope(
        "gone@example.test",
        "ok@example.test",
        "full@example.test",
        "plain4@example.test",
        "plain5@example.test",
    )
    outcomes = await world.smtp().deliver(attempt(hop(server(fake)), env))
    assert states(outcomes) == [
        (S.FAILED, "5.1.1"),
        (S.TRANSFERRED, "2.4.0"),
        (S.DEFERRED, "4.2.2"),
        (S.DEFERRED, "4.0.0"),
        (S.FAILED, "5.0.0"),
    ]
    assert outcomes[0].diagnostic == "smtp; 550-5.1.1 no such user 550 5.1.1 try another"
    assert outcomes[2].diagnostic == "smtp; 452 4.2.2 mailbox full"
    assert outcomes[3].diagnostic == "smtp; 450 busy"
    assert all(o.remote_mta == "dns; mx1.example.test" for o in outcomes)
    assert [o.certifier_forwarded for o in outcomes] == [False, True, False, False, False]


@pytest_twisted.ensureDeferred
async def test_mail_refusal_decides_for_all(world):
    fake = await world.fake()
    fake.replies["MAIL"] = "553 5.7.1 sender refused"
    outcomes = await world.smtp().deliver(attempt(hop(server(fake)), envelope("a@x.test", "b@x")))
    assert states(outcomes) == [(S.FAILED, "5.7.1")] * 2
    assert {o.diagnostic for o in outcomes} == {"smtp; 553 5.7.1 sender refused"}


@pytest_twisted.ensureDeferred
async def test_data_refusal_decides_for_the_accepted(world):
    fake = await world.fake()
    fake.rcpt_replies["bad@x.test"] = "550 5.1.1 unknown"
    fake.replies["DATA"] = "451 4.3.0 not now"
    outcomes = await world.smtp().deliver(
        attempt(hop(server(fake)), envelope("a@x.test", "bad@x.test", "c@x.test"))
    )
    assert states(outcomes) == [(S.DEFERRED, "4.3.0"), (S.FAILED, "5.1.1"), (S.DEFERRED, "4.3.0")]


@pytest_twisted.ensureDeferred
async def test_final_reply_refusal(world):
    fake = await world.fake()
    fake.replies[DOT] = "554 5.6.0 message refused"
    outcomes = await world.smtp().deliver(attempt(hop(server(fake)), envelope("a@x", "b@x")))
    assert states(outcomes) == [(S.FAILED, "5.6.0")] * 2


@pytest_twisted.ensureDeferred
async def test_connection_lost_after_the_final_dot_is_an_unknown_deferral(world):
    fake = await world.fake()
    fake.drop_at = DOT
    (outcome,) = await world.smtp().deliver(attempt(hop(server(fake))))
    assert fake.transactions[0].content == CONTENT  # the server did get it
    assert (outcome.state, outcome.status, outcome.unknown) == (S.DEFERRED, "4.4.2", True)
    assert outcome.remote_mta == "dns; mx1.example.test"
    assert outcome.diagnostic is not None and outcome.diagnostic.startswith("x-mtrkmta; ")


@pytest_twisted.ensureDeferred
async def test_connection_lost_before_the_dot_is_a_plain_deferral(world):
    fake = await world.fake()
    fake.drop_at = "DATA"
    (outcome,) = await world.smtp().deliver(attempt(hop(server(fake))))
    assert (outcome.state, outcome.status, outcome.unknown) == (S.DEFERRED, "4.4.2", False)


@pytest_twisted.ensureDeferred
async def test_smtputf8_message_to_a_hop_without_it_fails(world):
    fake = await world.fake(extensions=NO_MTRK[:-1])  # no SMTPUTF8
    env = envelope("j\u00fcrgen@example.test", smtputf8=True)
    (outcome,) = await world.smtp().deliver(attempt(hop(server(fake)), env))
    assert states([outcome]) == [(S.FAILED, "5.6.7")]
    assert not fake.transactions


@pytest_twisted.ensureDeferred
async def test_smtputf8_message_to_a_hop_with_it(world):
    fake = await world.fake()
    env = envelope("j\u00fcrgen@example.test", smtputf8=True)
    (outcome,) = await world.smtp().deliver(attempt(hop(server(fake)), env))
    assert outcome.state == S.TRANSFERRED
    assert "SMTPUTF8" in fake.transactions[0].mail_params
    assert fake.transactions[0].recipients == ["j\u00fcrgen@example.test"]


# -- servers in order -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_falls_back_from_a_dead_server_to_a_live_one(world):
    fake = await world.fake()
    dead = Server("mx0.example.test", await dead_endpoint())
    (outcome,) = await world.smtp().deliver(attempt(hop(dead, server(fake))))
    assert outcome.state == S.TRANSFERRED and outcome.remote_mta == "dns; mx1.example.test"


@pytest_twisted.ensureDeferred
async def test_a_server_named_by_its_address_is_a_domain_literal(world):
    # RFC 3461 §9.3: Remote-MTA is a domain name or a domain-literal (RFC 5321 §4.1.3),
    # for an accepted message and for a server that could not be reached alike.
    fake = await world.fake()
    (outcome,) = await world.smtp().deliver(attempt(hop(server(fake, "127.0.0.1"))))
    assert outcome.state == S.TRANSFERRED and outcome.remote_mta == "dns; [127.0.0.1]"
    dead = Server("::1", await dead_endpoint())
    (outcome,) = await world.smtp().deliver(attempt(hop(dead)))
    assert outcome.state == S.DEFERRED and outcome.remote_mta == "dns; [IPv6:::1]"


@pytest_twisted.ensureDeferred
async def test_falls_back_on_4xx_and_5xx_greetings(world):
    busy = await world.fake()
    busy.greeting = "421 4.3.2 busy"
    refusing = await world.fake()
    refusing.greeting = "554 5.7.1 no"
    live = await world.fake()
    servers = (server(busy, "a"), server(refusing, "b"), server(live, "c"))
    (outcome,) = await world.smtp().deliver(attempt(hop(*servers)))
    assert outcome.remote_mta == "dns; c" and outcome.state == S.TRANSFERRED
    assert busy.sessions[0].commands == ["QUIT"] and refusing.sessions[0].commands == ["QUIT"]


@pytest_twisted.ensureDeferred
async def test_all_servers_failing_defers_with_the_last_error(world):
    refusing = await world.fake()
    refusing.greeting = "554 5.7.1 go away"
    dead = Server("mx0.example.test", await dead_endpoint())
    outcomes = await world.smtp().deliver(
        attempt(hop(dead, server(refusing)), envelope("a@x", "b@x"))
    )
    assert states(outcomes) == [(S.DEFERRED, "4.7.1")] * 2
    assert outcomes[0].diagnostic == "smtp; 554 5.7.1 go away"
    assert outcomes[0].remote_mta == "dns; mx1.example.test"
    # The log's relay= is the server that refused its greeting, connected to.
    assert outcomes[0].relay == Relay("mx1.example.test", "127.0.0.1", refusing.port)
    outcomes = await world.smtp().deliver(attempt(hop(server(refusing), dead)))
    assert states(outcomes) == [(S.DEFERRED, "4.4.1")]
    port = dead.endpoint.rsplit("=", 1)[1]
    assert outcomes[0].diagnostic == (
        f"x-mtrkmta; connect to mx0.example.test[127.0.0.1]:{port}: Connection refused"
    )
    assert outcomes[0].remote_mta == "dns; mx0.example.test"
    assert outcomes[0].relay is None  # no connection was made: relay=none


@pytest_twisted.ensureDeferred
async def test_greeting_timeout_moves_on(world):
    silent = await world.fake()
    silent.hang_at = GREETING
    live = await world.fake()
    settings = SMTPTransportSettings("relay.example.test", DAY, ClientTimeouts(greeting=0.2))
    (outcome,) = await world.smtp(settings).deliver(
        attempt(hop(server(silent, "silent"), server(live, "live")))
    )
    assert outcome.remote_mta == "dns; live" and outcome.state == S.TRANSFERRED


# -- transactions and connection reuse ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_recipients_split_by_max_recipients_on_one_connection(world):
    fake = await world.fake()
    env = envelope("a@x.test", "b@x.test", "c@x.test")
    outcomes = await world.smtp().deliver(attempt(hop(server(fake), max_recipients=2), env))
    assert [o.index for o in outcomes] == [0, 1, 2]
    assert {o.state for o in outcomes} == {S.TRANSFERRED}
    assert len(fake.sessions) == 1
    assert [t.recipients for t in fake.transactions] == [["a@x.test", "b@x.test"], ["c@x.test"]]


@pytest_twisted.ensureDeferred
async def test_two_attempts_share_one_connection(world):
    fake = await world.fake()
    transport = world.smtp()
    next_hop = hop(server(fake))
    first = await transport.deliver(attempt(next_hop))
    assert transport.idle_sessions == 1
    second = await transport.deliver(attempt(next_hop))
    assert states(first) == states(second) == [(S.TRANSFERRED, "2.4.0")]
    assert len(fake.sessions) == 1 and len(fake.transactions) == 2
    assert "RSET" in fake.sessions[0].commands
    await transport.close()
    await fake.wait_all_closed()
    assert fake.sessions[0].commands[-1] == "QUIT"
    assert transport.idle_sessions == 0


@pytest_twisted.ensureDeferred
async def test_idle_connection_is_closed_after_idle_keep(world):
    fake = await world.fake()
    clock = Clock()
    transport = world.smtp(clock=clock)
    next_hop = hop(server(fake))
    await transport.deliver(attempt(next_hop))
    clock.advance(SETTINGS.idle_keep - 0.1)
    assert transport.idle_sessions == 1 and fake.open_connections == 1
    clock.advance(0.2)
    assert transport.idle_sessions == 0
    await fake.wait_all_closed()
    assert fake.sessions[0].commands[-1] == "QUIT"
    await transport.deliver(attempt(next_hop))
    assert len(fake.sessions) == 2


@pytest_twisted.ensureDeferred
async def test_idle_cache_is_capped(world):
    fakes = [await world.fake() for _ in range(3)]
    settings = SMTPTransportSettings(
        "relay.example.test", DAY, SETTINGS.timeouts, max_idle_sessions=2
    )
    transport = world.smtp(settings)
    for n, fake in enumerate(fakes):
        await transport.deliver(attempt(NextHop("smtp", f"mx:{n}", (server(fake),), "none")))
    assert transport.idle_sessions == 2
    await fakes[0].wait_all_closed()  # the oldest one was closed
    assert fakes[0].sessions[0].commands[-1] == "QUIT"
    assert fakes[1].open_connections == fakes[2].open_connections == 1


@pytest_twisted.ensureDeferred
async def test_idle_connection_dropped_by_the_server_is_replaced(world):
    fake = await world.fake()
    transport = world.smtp()
    next_hop = hop(server(fake))
    await transport.deliver(attempt(next_hop))
    fake.drop_at = "RSET"  # the cached session will find the server gone
    (outcome,) = await transport.deliver(attempt(next_hop))
    assert outcome.state == S.TRANSFERRED
    assert len(fake.sessions) == 2 and len(fake.transactions) == 2


@pytest_twisted.ensureDeferred
async def test_idle_connection_closed_by_the_server_is_not_reused(world):
    fake = await world.fake()
    transport = world.smtp()
    next_hop = hop(server(fake))
    await transport.deliver(attempt(next_hop))
    await fake.disconnect_all()
    await deferLater(reactor, 0.05, lambda: None)  # let the client see the close
    (outcome,) = await transport.deliver(attempt(next_hop))
    assert outcome.state == S.TRANSFERRED and len(fake.sessions) == 2


@pytest_twisted.ensureDeferred
async def test_a_broken_transaction_does_not_take_the_next_batch_with_it(world):
    fake = await world.fake()
    fake.drop_at = DOT
    env = envelope("a@x.test", "b@x.test")
    outcomes = await world.smtp().deliver(attempt(hop(server(fake), max_recipients=1), env))
    assert [(o.state, o.unknown) for o in outcomes] == [(S.DEFERRED, True)] * 2
    assert len(fake.sessions) == 2  # the second batch got a fresh connection


@pytest_twisted.ensureDeferred
async def test_close_waits_for_attempts_in_flight(world):
    fake = await world.fake()
    fake.hang_at = DOT
    settings = SMTPTransportSettings("relay.example.test", DAY, ClientTimeouts(data_end=0.3))
    transport = world.smtp(settings)
    order: list[str] = []
    delivering = transport.deliver(attempt(hop(server(fake))))
    delivering.addCallback(lambda outcomes: order.append("delivered") or outcomes)
    await deferLater(reactor, 0.05, lambda: None)
    await transport.close().addCallback(lambda _: order.append("closed"))
    assert order == ["delivered", "closed"]
    (outcome,) = await delivering
    assert outcome.unknown and outcome.state == S.DEFERRED


@pytest_twisted.ensureDeferred
async def test_deliver_after_close_defers(world):
    fake = await world.fake()
    transport = world.smtp()
    await transport.close()
    (outcome,) = await transport.deliver(attempt(hop(server(fake))))
    assert outcome.state == S.DEFERRED and not fake.sessions


# -- TLS policies ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tls_may_uses_starttls_when_offered(world):
    fake = await world.fake(tls=True)
    (outcome,) = await world.smtp().deliver(attempt(hop(server(fake), tls="may")))
    assert outcome.state == S.TRANSFERRED
    assert fake.sessions[0].tls and fake.transactions[0].content == CONTENT


@pytest_twisted.ensureDeferred
async def test_tls_may_without_offer_goes_plain(world):
    fake = await world.fake()
    (outcome,) = await world.smtp().deliver(attempt(hop(server(fake), tls="may")))
    assert outcome.state == S.TRANSFERRED and not fake.sessions[0].tls


@pytest_twisted.ensureDeferred
async def test_tls_none_ignores_the_offer(world):
    fake = await world.fake(tls=True)
    (outcome,) = await world.smtp().deliver(attempt(hop(server(fake), tls="none")))
    assert outcome.state == S.TRANSFERRED and not fake.sessions[0].tls


@pytest_twisted.ensureDeferred
async def test_tls_encrypt_required(world):
    plain = await world.fake()
    (outcome,) = await world.smtp().deliver(attempt(hop(server(plain), tls="encrypt")))
    assert (outcome.state, outcome.status) == (S.DEFERRED, "4.7.4")
    assert not plain.transactions
    secure = await world.fake(tls=True)
    (outcome,) = await world.smtp().deliver(attempt(hop(server(secure), tls="encrypt")))
    assert outcome.state == S.TRANSFERRED and secure.sessions[0].tls


# -- LMTP ------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lmtp_mixed_replies_to_delivered_deferred_failed(world):
    fake = await world.fake(lmtp=True, extensions=("8BITMIME", "ENHANCEDSTATUSCODES", "PIPELINING"))
    fake.final_replies["full@example.test"] = "452 4.2.2 <full@example.test> Quota exceeded"
    fake.final_replies["gone@example.test"] = "550 5.1.1 <gone@example.test> no such user"
    env = envelope("ok@example.test", "full@example.test", "gone@example.test")
    outcomes = await world.lmtp().deliver(attempt(hop(server(fake), transport="lmtp"), env))
    assert states(outcomes) == [(S.DELIVERED, "2.1.5"), (S.DEFERRED, "4.2.2"), (S.FAILED, "5.1.1")]
    assert fake.transactions[0].mail == "MAIL FROM:<alice@client.example>"  # no DSN: nothing
    assert fake.sessions[0].hellos == ["LHLO relay.example.test"]
    assert outcomes[0].diagnostic == "smtp; 250 2.0.0 <ok@example.test> Saved"


@pytest_twisted.ensureDeferred
async def test_lmtp_lda_with_mtrk_is_transferred(world):
    fake = await world.fake(lmtp=True)
    (outcome,) = await world.lmtp().deliver(attempt(hop(server(fake), transport="lmtp")))
    assert (outcome.state, outcome.status, outcome.certifier_forwarded) == (
        S.TRANSFERRED,
        "2.4.0",
        True,
    )
    assert f"MTRK={B64}:3500" in fake.transactions[0].mail_params


@pytest_twisted.ensureDeferred
async def test_lmtp_drop_after_dot_defers_every_unanswered_recipient(world):
    fake = await world.fake(lmtp=True, extensions=("PIPELINING",))
    fake.drop_at = DOT
    fake.replies_before_drop = 1
    env = envelope("a@example.test", "b@example.test", "c@example.test")
    outcomes = await world.lmtp().deliver(attempt(hop(server(fake), transport="lmtp"), env))
    assert states(outcomes) == [(S.DELIVERED, "2.1.5")] + [(S.DEFERRED, "4.4.2")] * 2
    assert [o.unknown for o in outcomes] == [False, True, True]
