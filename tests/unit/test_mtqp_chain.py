"""MTQP chaining at a gateway (RFC 3887 §2.4): the gathering on a MemoryReactorClock with a
fake inner-hop asker, the server's merged answer, and the [mtqp] chain keys."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import pytest
from test_mtqp_server import (
    ENVID,
    HOSTNAME,
    SECRET_B64,
    TLS,
    TLS_NAMES,
    FakeStore,
    Session,
    responses,
    stored,
    track_line,
)
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtrkmta.config import ConfigError, Override, load_config
from mtrkmta.mtqp.chain import (
    ChainSettings,
    ClientAsker,
    Gatherer,
    IHopAsker,
    chain_from_config,
    disguise,
    inner_hosts,
)
from mtrkmta.mtqp.server import MTQPServerFactory, MTQPSettings
from mtrkmta.tracking.interfaces import RecipientState
from mtrkmta.tracking.status import (
    RecipientStatus,
    TrackingReport,
    TypedValue,
    parse_related,
    render_related,
)

WHEN = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)
RCPT = "bob@dest.example"
GATEWAY = HOSTNAME  # mtqp.example.test
INNER = "inner.example"
B, C, D = "b.inner.example", "c.inner.example", "d.inner.example"
OUTSIDE = "mx.elsewhere.example"


def block(action: str, remote: str | None = None) -> RecipientStatus:
    status = {"transferred": "2.4.0", "delivered": "2.1.5", "relayed": "2.0.0"}[action]
    return RecipientStatus(
        original_recipient=TypedValue("rfc822", RCPT),
        final_recipient=TypedValue("rfc822", RCPT),
        action=action,
        status=status,
        remote_mta=TypedValue("dns", remote) if remote is not None else None,
        last_attempt_date=WHEN,
        extensions=(("X-Event", f"handed to {remote}"),) if remote else (),
    )


def part(host: str, *blocks: RecipientStatus) -> TrackingReport:
    return TrackingReport(ENVID, TypedValue("dns", host), WHEN, blocks)


@implementer(IHopAsker)
class FakeAsker:
    """Answers from a table of host -> parts (a Deferred left pending when ``slow``), and
    records every question."""

    def __init__(
        self, answers: dict[str, list[TrackingReport]], slow: frozenset[str] = frozenset()
    ) -> None:
        self.answers = answers
        self.slow = slow
        self.asked: list[tuple[str, str, str, bool]] = []
        self.pending: dict[str, Deferred] = {}
        self.cancelled: list[str] = []

    def ask(self, host: str, envid: str, secret: str, tls: bool) -> Deferred:
        self.asked.append((host, envid, secret, tls))
        if host in self.slow:
            d: Deferred = Deferred(lambda _: self.cancelled.append(host))
            self.pending[host] = d
            return d
        if host not in self.answers:
            return fail(ConnectionRefusedError(host))
        return succeed(self.answers[host])


def settings(**kw) -> ChainSettings:
    return ChainSettings(domains=(INNER,), **kw)


def gather(asker, local, clock=None, *, tls=False, charge=None, **kw):
    clock = clock or MemoryReactorClock()
    gatherer = Gatherer(settings(**kw), asker, clock, GATEWAY)
    extra = {"charge": charge} if charge is not None else {}
    return gatherer.gather(local, ENVID, SECRET_B64, tls=tls, **extra)


def result(d: Deferred):
    found: list = []
    d.addCallback(found.append)
    assert found, "not fired"
    return found[0]


LOCAL = part(GATEWAY, block("transferred", B))


# -- gathering ---


def test_fake_asker_provides_the_interface():
    verifyObject(IHopAsker, FakeAsker({}))
    verifyObject(IHopAsker, ClientAsker(lambda tls: None))  # type: ignore[arg-type,return-value]


def test_local_part_first_then_each_inner_hop_with_the_clients_envid_and_secret():
    # RFC 3887 §2.4, RFC 3886 §3: one answer, the local part first, then the hops' parts.
    asker = FakeAsker({B: [part(B, block("transferred", C))], C: [part(C, block("delivered"))]})
    parts = result(gather(asker, LOCAL))
    assert [p.reporting_mta.value for p in parts] == [GATEWAY, B, C]
    assert asker.asked == [(B, ENVID, SECRET_B64, False), (C, ENVID, SECRET_B64, False)]


def test_only_hosts_within_chain_domains_are_asked():
    # The gateway is no relay for queries: a Remote-MTA outside chain_domains is left to the
    # client; a name that merely ends in the domain's text is outside too.
    local = part(
        GATEWAY,
        block("transferred", OUTSIDE),
        block("transferred", "evilinner.example"),
        block("delivered"),
    )
    asker = FakeAsker({})
    assert result(gather(asker, local)) == [local]
    assert asker.asked == []
    assert settings().covers(INNER) and settings().covers("B.Inner.Example.")
    assert not settings().covers("evilinner.example")


def test_a_host_already_asked_is_not_asked_again():
    # Loop protection: B -> C -> B, and C pointing back at the gateway itself.
    asker = FakeAsker(
        {
            B: [part(B, block("transferred", C))],
            C: [part(C, block("transferred", B), block("transferred", "mtqp.example.test"))],
        }
    )
    gatherer = Gatherer(
        ChainSettings(domains=(INNER, "example.test")), asker, MemoryReactorClock(), GATEWAY
    )
    parts = result(gatherer.gather(LOCAL, ENVID, SECRET_B64, tls=False))
    assert [p.reporting_mta.value for p in parts] == [GATEWAY, B, C]
    assert [q[0] for q in asker.asked] == [B, C]


def test_parts_of_a_host_already_answered_for_are_dropped():
    # A chained inner answer repeating a part the gateway already has (a loop) adds nothing.
    asker = FakeAsker({B: [part(B, block("transferred", C)), part(GATEWAY, block("delivered"))]})
    parts = result(gather(asker, LOCAL))
    assert [p.reporting_mta.value for p in parts] == [GATEWAY, B]
    assert [q[0] for q in asker.asked] == [B, C]


def test_inner_chained_parts_are_kept_and_not_asked_again():
    asker = FakeAsker({B: [part(B, block("transferred", C)), part(C, block("delivered"))]})
    parts = result(gather(asker, LOCAL))
    assert [p.reporting_mta.value for p in parts] == [GATEWAY, B, C]
    assert [q[0] for q in asker.asked] == [B]


def test_max_hops_bounds_the_hosts_asked():
    asker = FakeAsker(
        {B: [part(B, block("transferred", C))], C: [part(C, block("transferred", D))]}
    )
    parts = result(gather(asker, LOCAL, max_hops=2))
    assert [q[0] for q in asker.asked] == [B, C]
    assert parts[-1].recipients[0].remote_mta == TypedValue("dns", D)


def test_a_hop_that_fails_leaves_the_transferred_block():
    # RFC 3887 §2.4: no further information is the transferred block itself.
    asker = FakeAsker({})
    assert result(gather(asker, LOCAL)) == [LOCAL]
    assert [q[0] for q in asker.asked] == [B]


def test_an_asker_that_raises_is_a_hop_without_answer():
    class Broken(FakeAsker):
        def ask(self, host, envid, secret, tls):
            super().ask(host, envid, secret, tls)
            raise RuntimeError("no client")

    asker = Broken({})
    assert result(gather(asker, LOCAL)) == [LOCAL]
    assert [q[0] for q in asker.asked] == [B]


def test_timeout_answers_with_what_came_in_and_cancels_the_question():
    # RFC 3887 §2.4 (MUST): within 2 minutes; (SHOULD) with the information it has.
    clock = MemoryReactorClock()
    asker = FakeAsker({B: [part(B, block("transferred", C))]}, slow={C})
    d = gather(asker, LOCAL, clock, timeout=30.0)
    found: list = []
    d.addCallback(found.append)
    clock.advance(29.9)
    assert not found and [q[0] for q in asker.asked] == [B, C]
    clock.advance(0.1)
    (parts,) = found
    assert [p.reporting_mta.value for p in parts] == [GATEWAY, B]
    assert parts[-1].recipients[0].action == "transferred"
    assert asker.cancelled == [C]
    assert not clock.getDelayedCalls()


def test_a_quick_answer_leaves_no_timer_behind():
    clock = MemoryReactorClock()
    result(gather(FakeAsker({B: [part(B, block("delivered"))]}), LOCAL, clock))
    assert not clock.getDelayedCalls()


def test_chain_timeout_over_two_minutes_is_refused():
    with pytest.raises(ValueError, match="at most 120"):
        ChainSettings(domains=(INNER,), timeout=121.0)


def test_tls_flag_reaches_the_asker():
    # RFC 3887 §6, §11: the client used TLS, so the secret goes on only under TLS.
    asker = FakeAsker({B: [part(B, block("delivered"))]})
    result(gather(asker, LOCAL, tls=True))
    assert asker.asked[0][3] is True


def test_client_asker_requires_tls_when_asked_to():
    modes: list[str] = []

    class Client:
        def query(self, host, envid, secret):
            return succeed(type("Hop", (), {"error": "no TLS", "reports": ()})())

    def make(mode):
        modes.append(mode)
        return Client()

    asker = ClientAsker(make)  # type: ignore[arg-type]
    assert result(asker.ask(B, ENVID, SECRET_B64, True)) == ()
    result(asker.ask(B, ENVID, SECRET_B64, False))
    assert modes == ["require", "may"]


def test_charge_false_stops_the_chaining():
    asker = FakeAsker({B: [part(B, block("delivered"))]})
    assert result(gather(asker, LOCAL, charge=lambda: False)) == [LOCAL]
    assert asker.asked == []


def test_inner_hosts_skips_those_a_later_part_answers_for():
    parts = [LOCAL, part(B, block("transferred", C), block("transferred", OUTSIDE))]
    assert inner_hosts(parts, settings()) == [C]


# -- disguise ---


def test_disguise_replaces_inner_names_with_numbered_labels():
    parts = [LOCAL, part(B, block("transferred", C)), part(C, block("delivered"))]
    hidden = disguise(parts, settings(), GATEWAY)
    text = render_related(hidden).decode()
    for name in (B, C):
        assert name not in text.lower()
    assert hidden[0].reporting_mta == TypedValue("dns", GATEWAY)
    assert hidden[0].recipients[0].remote_mta == TypedValue("dns", f"hidden-1.{GATEWAY}")
    assert hidden[1].reporting_mta == TypedValue("dns", f"hidden-1.{GATEWAY}")
    assert hidden[1].recipients[0].remote_mta == TypedValue("dns", f"hidden-2.{GATEWAY}")
    assert hidden[2].reporting_mta == TypedValue("dns", f"hidden-2.{GATEWAY}")
    assert hidden[0].recipients[0].extensions == (("X-Event", f"handed to hidden-1.{GATEWAY}"),)


def test_disguise_leaves_outside_hosts_and_addresses():
    parts = [LOCAL, part(B, block("transferred", OUTSIDE))]
    hidden = disguise(parts, settings(), GATEWAY)
    assert hidden[1].recipients[0].remote_mta == TypedValue("dns", OUTSIDE)
    assert hidden[1].recipients[0].original_recipient == TypedValue("rfc822", RCPT)


def test_gatherer_disguises_when_configured():
    asker = FakeAsker({B: [part(B, block("delivered"))]})
    parts = result(gather(asker, LOCAL, disguise=True))
    assert [p.reporting_mta.value for p in parts] == [GATEWAY, f"hidden-1.{GATEWAY}"]


# -- the server's answer ---


def transferred_store() -> FakeStore:
    message = stored(state=RecipientState.TRANSFERRED)
    (recipient,) = message.recipients
    recipient = replace(recipient, remote_mta=B, status="2.0.0")
    return FakeStore(replace(message, recipients=(recipient,)))


def chaining_factory(clock, asker, **kw) -> MTQPServerFactory:
    settings_kw = {k: kw.pop(k) for k in list(kw) if k in ("tls", "tls_names", "track_rate")}
    gatherer = Gatherer(settings(**kw), asker, clock, HOSTNAME)
    return MTQPServerFactory(
        MTQPSettings(hostname=HOSTNAME, **settings_kw), transferred_store(), clock, chain=gatherer
    )


@pytest.fixture
def clock():
    clock = MemoryReactorClock()
    clock.advance(1_700_000_060)
    return clock


def test_server_answers_one_multipart_related_with_the_inner_parts(clock):
    asker = FakeAsker({B: [part(B, block("delivered"))]})
    session = Session(chaining_factory(clock, asker))
    session.output()
    (response,) = responses(session.send(track_line()))
    assert response.indicator == "+OK+"
    local, inner = parse_related(response.body)
    assert local.reporting_mta.value == HOSTNAME
    assert local.recipients[0].action == "transferred"
    assert inner.reporting_mta.value == B and inner.recipients[0].action == "delivered"
    assert asker.asked == [(B, ENVID, SECRET_B64, False)]


def test_server_without_chain_answers_for_itself(clock):
    factory = MTQPServerFactory(MTQPSettings(hostname=HOSTNAME), transferred_store(), clock)
    session = Session(factory)
    session.output()
    (response,) = responses(session.send(track_line()))
    assert len(parse_related(response.body)) == 1


def test_server_waits_for_the_inner_hop_at_most_chain_timeout(clock):
    asker = FakeAsker({}, slow={B})
    session = Session(chaining_factory(clock, asker, timeout=60.0))
    session.output()
    assert session.send(track_line()) == b""
    clock.advance(60.0)
    (response,) = responses(session.output())
    (local,) = parse_related(response.body)
    assert local.recipients[0].action == "transferred"
    assert session.proto.factory.chaining == 0


def test_server_asks_under_tls_when_the_client_used_tls(clock):
    asker = FakeAsker({B: [part(B, block("delivered"))]})
    session = Session(chaining_factory(clock, asker, tls=TLS, tls_names=TLS_NAMES))
    session.output()
    session.send(b"STARTTLS mtqp.example.test\r\n")
    session.proto.handshakeCompleted()
    session.output()
    session.send(track_line())
    assert asker.asked == [(B, ENVID, SECRET_B64, True)]


def test_chained_hops_count_against_the_track_rate_limit(clock):
    # RFC 3887 §2.5, §11: each inner hop asked is one more TRACK for the client's address.
    asker = FakeAsker({B: [part(B, block("transferred", C))], C: [part(C, block("delivered"))]})
    session = Session(chaining_factory(clock, asker, track_rate=2))
    session.output()
    (response,) = responses(session.send(track_line()))
    assert len(parse_related(response.body)) == 2  # the TRACK and B: the limit stops C
    assert [q[0] for q in asker.asked] == [B]
    assert session.send(track_line()).startswith(b"-TEMP/rate-limit ")


def test_concurrent_chained_tracks_are_bounded(clock):
    asker = FakeAsker({}, slow={B})
    factory = chaining_factory(clock, asker, concurrency=1)
    first, second = Session(factory), Session(factory, peer=("192.0.2.8", 1))
    first.output(), second.output()
    assert first.send(track_line()) == b""
    (response,) = responses(second.send(track_line()))  # answered at once, unchained
    assert len(parse_related(response.body)) == 1
    assert len(asker.asked) == 1


# -- configuration ---


def load(*overrides: tuple[str, object]):
    return load_config(
        None, [Override("t", key, value) for key, value in overrides], fqdn=lambda: HOSTNAME
    )


def test_chain_is_off_by_default():
    config = load()
    assert config.mtqp.chain is False and config.mtqp.disguise is False
    assert config.mtqp.chain_timeout == 120.0
    assert chain_from_config(config, MemoryReactorClock(), object()) is None  # type: ignore[arg-type]


def test_chain_keys_build_the_gatherer():
    config = load(
        ("mtqp.chain", True),
        ("mtqp.chain_domains", ("Inner.Example",)),
        ("mtqp.chain_timeout", "30s"),
        ("mtqp.chain_max_hops", 3),
        ("mtqp.chain_concurrency", 2),
        ("mtqp.disguise", True),
    )
    gatherer = chain_from_config(config, MemoryReactorClock(), object())  # type: ignore[arg-type]
    assert gatherer is not None and gatherer.gateway == HOSTNAME
    assert gatherer.settings == ChainSettings(("inner.example",), 30.0, 3, 2, True)


def config_error(tmp_path, text: str) -> str:
    path = tmp_path / "mtrkmta.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, fqdn=lambda: HOSTNAME)
    return str(info.value)


def test_chain_timeout_over_two_minutes_is_a_config_error(tmp_path):
    # RFC 3887 §2.4 (MUST): a chaining server answers within two minutes.
    message = config_error(tmp_path, '[mtqp]\nchain_timeout = "121s"\n')
    assert "mtqp.chain_timeout: must be at most 2m (RFC 3887 §2.4), got 2m1s" in message
    assert str(tmp_path / "mtrkmta.toml") in message


def test_chain_without_domains_is_a_config_error(tmp_path):
    message = config_error(tmp_path, "[mtqp]\nchain = true\n")
    assert "mtqp.chain: needs mtqp.chain_domains" in message


def test_chain_ca_file_without_a_certificate_is_one_clear_error(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    config = load(
        ("mtqp.chain", True),
        ("mtqp.chain_domains", (INNER,)),
        ("mtqp.chain_ca_file", str(bad)),
    )
    with pytest.raises(ValueError) as info:
        chain_from_config(config, MemoryReactorClock(), object())  # type: ignore[arg-type]
    assert str(info.value) == (
        f"mtqp.chain_ca_file: cannot use {bad} (no PEM certificate found); give a PEM CA bundle"
    )
