"""The MTQP server driven through StringTransport with a controlled clock (RFC 3887,
RFC 3885 §4.2)."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from mtrkmta.config import ConfigError, Override, load_config
from mtrkmta.envelope import ClientInfo, OriginalRecipient
from mtrkmta.mtqp.protocol import Response, ResponseReader
from mtrkmta.mtqp.server import (
    MIN_IDLE_TIMEOUT,
    MTQPServerFactory,
    MTQPSettings,
    RateLimiter,
    certificate_names,
    fqdn_matches,
    settings_from_config,
)
from mtrkmta.queue.policy import RetryPolicy
from mtrkmta.tracking.interfaces import (
    Event,
    EventKind,
    RecipientState,
    StoredMessage,
    StoredRecipient,
)
from mtrkmta.tracking.status import parse_related

# Our own vector for RFC 3885 §3.1 (never the RFC 3887 examples: their secret is 64 bits
# and their SHA1 value matches no input).
SECRET = bytes(range(16))
SECRET_B64 = "AAECAwQFBgcICQoLDA0ODw=="
CERTIFIER = bytes.fromhex("56178b86a57fac22899a9964185c2cc96e7da589")
ENVID = "Qx7-env.42@originator.example"
OTHER_SECRET_B64 = base64.b64encode(bytes(range(1, 17))).decode()
ARRIVAL = 1_700_000_000
HOSTNAME = "mtqp.example.test"
PEER = ("192.0.2.7", 40000)


def stored(
    *,
    envid: str = ENVID,
    certifier: bytes = CERTIFIER,
    state: RecipientState = RecipientState.DELIVERED,
    queue_id: str = "Q1",
) -> StoredMessage:
    attempted = state is not RecipientState.QUEUED
    return StoredMessage(
        queue_id=queue_id,
        node_id="n1",
        envid=envid,
        certifier=certifier,
        sender="sender@originator.example",
        arrival=ARRIVAL,
        requested_timeout=None,
        expires_at=ARRIVAL + 9 * 86400,
        reporting_mta=HOSTNAME,
        size=100,
        ret=None,
        body=None,
        smtputf8=False,
        auth=None,
        client=ClientInfo(address="192.0.2.1"),
        recipients=(
            StoredRecipient(
                index=0,
                address="bob@dest.example",
                orcpt=OriginalRecipient("rfc822", "Bob@Dest.example"),
                notify=None,
                final_recipient="bob@dest.example",
                state=state,
                action=state.value if attempted else None,
                status="2.1.5" if state is RecipientState.DELIVERED else None,
                last_attempt=ARRIVAL + 5 if attempted else None,
            ),
        ),
    )


class FakeStore:
    """lookup_transactions() as ITrackingStore promises: every transaction whose ENVID
    and SHA1(A) both match, by arrival; none otherwise."""

    def __init__(self, *messages: StoredMessage) -> None:
        self.messages = list(messages)
        self.lookups = 0
        self.pending: list[tuple[Deferred, list[StoredMessage]]] | None = None
        self.broken = False
        self.events: dict[str, list[Event]] = {}

    def lookup_transactions(self, envid: str, candidate: bytes) -> Deferred:
        self.lookups += 1
        if self.broken:
            return fail(RuntimeError(f"database is down (query params {envid!r}, {candidate!r})"))
        found = sorted(
            (m for m in self.messages if m.envid == envid and m.certifier == candidate),
            key=lambda m: (m.arrival, m.queue_id),
        )
        if self.pending is not None:
            d: Deferred = Deferred()
            self.pending.append((d, found))
            return d
        return succeed(found)

    def transaction_events(self, queue_ids) -> Deferred:
        return succeed({q: list(self.events.get(q, ())) for q in queue_ids})

    def release_one(self) -> None:
        assert self.pending
        d, found = self.pending.pop(0)
        d.callback(found)


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """StringTransport that records startTLS."""

    tls_context: object = None

    def startTLS(self, context: object) -> None:
        self.tls_context = context


class Session:
    def __init__(self, factory: MTQPServerFactory, peer: tuple[str, int] = PEER) -> None:
        self.proto = factory.buildProtocol(None)
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", *peer))
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.transport.clear()
        self.proto.dataReceived(data)
        return self.transport.value()

    def output(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value


def responses(wire: bytes) -> list[Response]:
    reader = ResponseReader()
    found = []
    for line in wire.split(b"\r\n")[:-1]:
        response = reader.feed(line)
        if response is not None:
            found.append(response)
    assert not reader.pending
    return found


@pytest.fixture
def clock():
    clock = MemoryReactorClock()
    clock.advance(ARRIVAL + 60)  # a minute after the stored message arrived
    return clock


def make(clock, store=None, **settings) -> MTQPServerFactory:
    return MTQPServerFactory(
        MTQPSettings(hostname=HOSTNAME, **settings), store or FakeStore(stored()), clock
    )


TLS = object()  # stands for a server TLS context: only passed on to startTLS
TLS_NAMES = frozenset({HOSTNAME, "*.wild.example.test"})


def track_line(envid: str = ENVID, secret: str = SECRET_B64) -> bytes:
    return f"TRACK {envid} {secret}\r\n".encode()


# -- greeting (RFC 3887 §3) ---


def test_greeting_without_options_is_single_line(clock):
    # RFC 3887 §3 (MUST): the greeting carries /MTQP; no options -> "+OK/MTQP text".
    session = Session(make(clock))
    assert session.output() == f"+OK/MTQP {HOSTNAME} MTQP server ready\r\n".encode()


def test_greeting_lists_starttls_when_a_certificate_is_installed(clock):
    # RFC 3887 §3 (MUST): STARTTLS listed when TLS is enabled with a certificate.
    session = Session(make(clock, tls=TLS, tls_names=TLS_NAMES))
    assert session.output() == (
        f"+OK+/MTQP {HOSTNAME} MTQP server ready\r\nSTARTTLS\r\n.\r\n".encode()
    )


def test_greeting_says_required_when_tls_is_mandatory(clock):
    # RFC 3887 §3 (MUST): "STARTTLS required" when TLS is required.
    session = Session(make(clock, tls=TLS, tls_names=TLS_NAMES, tls_required=True))
    assert session.output().split(b"\r\n")[1] == b"STARTTLS required"


# -- TRACK (RFC 3887 §4; RFC 3886 §3) ---


def test_track_answers_multipart_related_of_tracking_status(clock):
    # RFC 3887 §4, RFC 3885 §3.1: SHA1 of the base64-decoded secret is what the store compares;
    # RFC 3887 §4 (MUST): +OK+ with one multipart/related entity, ended by "."; RFC 3886 §3.
    store = FakeStore(stored())
    session = Session(make(clock, store))
    session.output()
    wire = session.send(track_line())
    assert wire.endswith(b"\r\n.\r\n")
    (response,) = responses(wire)
    assert response.indicator == "+OK+"
    assert response.data_lines[0] == (
        b'Content-Type: multipart/related; type="message/tracking-status";'
    )
    (report,) = parse_related(response.body)
    assert report.original_envelope_id == ENVID
    assert str(report.reporting_mta) == f"dns; {HOSTNAME}"
    assert report.arrival_date == datetime.fromtimestamp(ARRIVAL, timezone.utc)
    (rcpt,) = report.recipients
    assert str(rcpt.original_recipient) == "rfc822; Bob@Dest.example"
    assert (rcpt.action, rcpt.status) == ("delivered", "2.1.5")
    assert store.lookups == 1


def test_track_answers_for_every_transaction_of_the_message(clock):
    # RFC 3885 §3.1: the message reached this MTA as two transactions (the previous hop
    # split its recipients): one answer covers both, each recipient with its own state,
    # and a part still queued is never denied. Another certifier is another message.
    delivered = stored(queue_id="Q1")
    waiting = stored(queue_id="Q2", state=RecipientState.QUEUED)
    carol = replace(
        waiting.recipients[0], address="carol@dest.example", final_recipient="carol@dest.example"
    )
    queued = replace(waiting, arrival=ARRIVAL + 1, recipients=(carol,))
    stranger = stored(queue_id="Q3", certifier=hashlib.sha1(b"someone else").digest())
    store = FakeStore(queued, stranger, delivered)
    session = Session(make(clock, store))
    session.output()
    (response,) = responses(session.send(track_line()))
    (report,) = parse_related(response.body)
    assert report.arrival_date == datetime.fromtimestamp(ARRIVAL, timezone.utc)
    assert [(str(r.final_recipient), r.action) for r in report.recipients] == [
        ("rfc822; bob@dest.example", "delivered"),
        ("rfc822; carol@dest.example", "delayed"),
    ]


def test_track_strips_angle_brackets_and_accepts_unpadded_secret(clock):
    # doc/conformance.rst 3887-P2: one surrounding <...> is stripped; 3887-P3: padding optional.
    session = Session(make(clock))
    session.output()
    wire = session.send(track_line(f"<{ENVID}>", SECRET_B64.rstrip("=")))
    assert wire.startswith(b"+OK+ ")


def test_unknown_envid_and_wrong_secret_get_the_same_reply(clock):
    # doc/conformance.rst 3887-P1: "-ERR/noinfo" for both, byte for byte, after a lookup each.
    store = FakeStore(stored())
    session = Session(make(clock, store))
    session.output()
    unknown = session.send(track_line("nobody@nowhere.example"))
    wrong = session.send(track_line(secret=OTHER_SECRET_B64))
    assert unknown == wrong == b"-ERR/noinfo No tracking information\r\n"
    assert store.lookups == 2


def test_untracked_message_is_not_reported(clock):
    # doc/conformance.rst 3885-P7: only a certifier match answers; the store gives None
    # otherwise.
    store = FakeStore(stored(certifier=hashlib.sha1(b"someone else").digest()))
    session = Session(make(clock, store))
    session.output()
    assert session.send(track_line()).startswith(b"-ERR/noinfo")


def test_store_unavailable_is_temp(clock):
    # RFC 3887 §4: -TEMP/unavailable when the store is down.
    store = FakeStore()
    store.broken = True
    session = Session(make(clock, store))
    session.output()
    assert session.send(track_line()).startswith(b"-TEMP/unavailable ")
    assert session.send(b"COMMENT still here\r\n") == b"+OK Ok\r\n"


def test_queued_recipient_gets_will_retry_until_from_the_retry_policy(clock):
    # RFC 3886 §3.3.7: Will-Retry-Until for a recipient still queued, here never tried: from
    # the queue lifetime (RetryPolicy.give_up_at).
    store = FakeStore(stored(state=RecipientState.QUEUED))
    policy = RetryPolicy(max_lifetime=2 * 86400)
    session = Session(make(clock, store, retry=policy))
    session.output()
    (response,) = responses(session.send(track_line()))
    (rcpt,) = parse_related(response.body)[0].recipients
    assert rcpt.action == "delayed"
    assert rcpt.will_retry_until == datetime.fromtimestamp(ARRIVAL + 2 * 86400, timezone.utc)
    assert rcpt.last_attempt_date is None and rcpt.remote_mta is None


def test_secret_and_envid_never_reach_the_log(clock):
    # RFC 3885 §4.2, RFC 3887 §11: the server never logs TRACK arguments, whatever the outcome.
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        store = FakeStore(stored())
        session = Session(make(clock, store, failure_rate=1))
        session.output()
        session.send(track_line())  # answered
        session.send(track_line(secret=OTHER_SECRET_B64))  # noinfo
        session.send(track_line(secret=OTHER_SECRET_B64))  # rate-limited
        session.send(b"TRACK " + ENVID.encode() + b" not*base64\r\n")  # -BAD
        store.broken = True
        Session(make(clock, store)).send(track_line())  # store down
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert len(events) >= 4
    for event in events:
        text = repr(event) + formatEvent(event)
        for secret in (SECRET_B64, SECRET_B64.rstrip("="), OTHER_SECRET_B64, ENVID, "not*base64"):
            assert secret not in text, event


# -- other commands (RFC 3887 §2.2-§2.3, §5, §7) ---


def test_comment_always_succeeds(clock):
    # RFC 3887 §5 (MUST)
    session = Session(make(clock))
    session.output()
    assert session.send(b"COMMENT\r\n") == b"+OK Ok\r\n"
    assert session.send(b"comment anything at all\r\n") == b"+OK Ok\r\n"


def test_quit_succeeds_then_closes(clock):
    # RFC 3887 §7 (MUST): success reply, then the session ends; later input is ignored.
    session = Session(make(clock))
    session.output()
    assert session.send(b"QUIT\r\nCOMMENT late\r\n") == b"+OK Bye\r\n"
    assert session.transport.disconnecting


@pytest.mark.parametrize(
    "line",
    [
        b"HELO there",
        b"TRACK only-one@arg",
        b"TRACK a@b c d",
        b"TRACK a@b not*base64",
        b"TRACK noat " + SECRET_B64.encode(),
        b"QUIT now",
        b"STARTTLS",
        b"STARTTLS nodots",
        b"",
        b"COMMENT caf\xc3\xa9",
    ],
)
def test_unknown_or_malformed_commands_are_bad(clock, line):
    # RFC 3887 §2.3 (MUST): unknown, unimplemented or malformed -> -BAD (not -ERR).
    session = Session(make(clock))
    session.output()
    (response,) = responses(session.send(line + b"\r\n"))
    assert response.indicator == "-BAD"
    assert not session.transport.disconnecting


def test_line_limit_is_998_octets(clock):
    # RFC 3887 §2.2: 998 characters before CRLF; a longer line is -BAD and the next one works.
    session = Session(make(clock))
    session.output()
    longest = b"COMMENT " + b"x" * (998 - 8)
    assert session.send(longest + b"\r\n") == b"+OK Ok\r\n"
    wire = session.send(longest + b"y\r\nCOMMENT\r\n")
    assert wire == b"-BAD Command line longer than 998 octets\r\n+OK Ok\r\n"


def test_tls_required_refuses_track_in_clear(clock):
    # RFC 3887 §2.3, §4: TRACK in the wrong state -> -ERR/tls-required, no lookup.
    store = FakeStore(stored())
    session = Session(make(clock, store, tls=TLS, tls_names=TLS_NAMES, tls_required=True))
    session.output()
    assert session.send(track_line()) == b"-ERR/tls-required TLS required; use STARTTLS first\r\n"
    assert store.lookups == 0


# -- pipelining (RFC 3887 §8) ---


def test_pipelined_commands_are_answered_in_order_behind_a_slow_lookup(clock):
    store = FakeStore(stored())
    store.pending = []
    session = Session(make(clock, store))
    session.output()
    wire = session.send(
        track_line() + b"COMMENT one\r\n" + track_line(secret=OTHER_SECRET_B64) + b"QUIT\r\n"
    )
    assert wire == b""  # the first TRACK waits; nothing after it may overtake it
    assert session.transport.producerState == "paused"
    assert store.lookups == 1
    store.release_one()
    first = session.output()
    assert first.startswith(b"+OK+ ") and first.endswith(b".\r\n+OK Ok\r\n")
    assert store.lookups == 2 and not session.transport.disconnecting
    store.release_one()
    assert session.output() == b"-ERR/noinfo No tracking information\r\n+OK Bye\r\n"
    assert session.transport.disconnecting


# -- STARTTLS (RFC 3887 §6, §11) ---


def test_starttls_not_configured_is_unsupported(clock):
    session = Session(make(clock))
    session.output()
    assert session.send(b"STARTTLS mtqp.example.test\r\n").startswith(b"-BAD/unsupported ")


def test_starttls_with_a_name_not_in_the_certificate_is_bad_fqdn(clock):
    # RFC 3887 §6 (MUST): -BAD/bad-fqdn when no subjectAltName dNSName matches.
    session = Session(make(clock, tls=TLS, tls_names=TLS_NAMES))
    session.output()
    assert session.send(b"STARTTLS other.example.test\r\n").startswith(b"-BAD/bad-fqdn ")
    assert session.transport.tls_context is None


def test_starttls_forgets_clear_input_and_greets_again_without_starttls(clock):
    # RFC 3887 §6 (MUST): +OK, handshake, buffered clear-text input discarded, a fresh greeting
    # whose options differ and lack STARTTLS; RFC 3887 §6 (MUST): a second STARTTLS is
    # -BAD/tls-in-progress; TRACK is then allowed (RFC 3887 §4).
    store = FakeStore(stored())
    session = Session(make(clock, store, tls=TLS, tls_names=TLS_NAMES, tls_required=True))
    session.output()
    wire = session.send(b"StartTLS MTQP.Example.Test\r\n" + track_line() + b"QUIT\r\n")
    assert wire == b"+OK Begin TLS negotiation\r\n"
    assert session.transport.tls_context is TLS
    assert store.lookups == 0  # the injected TRACK was dropped
    assert session.send(b"COMMENT before the handshake is done\r\n") == b""
    session.proto.handshakeCompleted()
    after = session.output()
    assert after.startswith(f"+OK/MTQP {HOSTNAME} MTQP server ready\r\n".encode())
    assert after.endswith(b"+OK Ok\r\n")  # the COMMENT sent under TLS, answered after
    assert session.send(b"STARTTLS mtqp.example.test\r\n").startswith(b"-BAD/tls-in-progress ")
    assert session.send(track_line()).startswith(b"+OK+ ")


def test_fqdn_matching():
    # RFC 3887 §6: case-insensitive; a wildcard covers exactly one label.
    assert fqdn_matches("MTQP.example.TEST.", TLS_NAMES)
    assert fqdn_matches("a.wild.example.test", TLS_NAMES)
    assert not fqdn_matches("wild.example.test", TLS_NAMES)
    assert not fqdn_matches("a.b.wild.example.test", TLS_NAMES)
    assert not fqdn_matches("example.test", TLS_NAMES)


def self_signed(*names: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a dNSName")])
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    if names:
        alt = x509.SubjectAlternativeName([x509.DNSName(name) for name in names])
        builder = builder.add_extension(alt, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_certificate_names_are_the_subject_alt_name_dns_names():
    # RFC 3887 §6: the dNSNames of the subjectAltName, not the common name.
    pem = self_signed("Mx.Example.Test", "*.wild.example.test")
    assert certificate_names(pem) == frozenset({"mx.example.test", "*.wild.example.test"})
    assert certificate_names(self_signed()) == frozenset()


# -- timers and limits (RFC 3887 §2.5; RFC 3885 §4.1) ---


def test_idle_timeout_is_at_least_ten_minutes():
    with pytest.raises(ValueError):
        MTQPSettings(hostname=HOSTNAME, idle_timeout=MIN_IDLE_TIMEOUT - 1)
    assert MIN_IDLE_TIMEOUT == 600


def test_idle_session_is_closed_and_commands_reset_the_timer(clock):
    session = Session(make(clock))
    clock.advance(599)
    assert session.send(b"COMMENT\r\n") == b"+OK Ok\r\n"
    clock.advance(599)
    assert not session.transport.disconnecting
    clock.advance(1)
    assert session.transport.disconnecting
    session.proto.connectionLost(None)
    assert not clock.getDelayedCalls()


def test_a_pending_lookup_is_not_idleness(clock):
    store = FakeStore(stored())
    store.pending = []
    session = Session(make(clock, store))
    session.send(track_line())
    clock.advance(3600)
    assert not session.transport.disconnecting
    store.release_one()
    assert session.output().startswith(b"+OK+ ")
    clock.advance(600)
    assert session.transport.disconnecting


def test_track_rate_limit_per_address(clock):
    store = FakeStore(stored())
    factory = make(clock, store, track_rate=3, failure_rate=0)
    session = Session(factory)
    session.output()
    for _ in range(3):
        assert session.send(track_line()).startswith(b"+OK+ ")
    limited = session.send(track_line())
    assert limited == b"-TEMP/rate-limit Too many TRACK commands; try again later\r\n"
    assert store.lookups == 3
    assert Session(factory, ("192.0.2.8", 1)).send(track_line()).startswith(b"+OK+ ")
    clock.advance(60)
    assert session.send(track_line()).startswith(b"+OK+ ")


def test_failed_attempts_limit_stops_guessing(clock):
    # RFC 3887 §2.5: after failure_rate noinfo answers in a minute, even the right secret waits, and
    # the refusal is the same whether the ENVID exists or not.
    store = FakeStore(stored())
    session = Session(make(clock, store, failure_rate=2))
    session.output()
    for _ in range(2):
        assert session.send(track_line(secret=OTHER_SECRET_B64)).startswith(b"-ERR/noinfo")
    right = session.send(track_line())
    unknown = session.send(track_line("nobody@nowhere.example"))
    assert right == unknown and right.startswith(b"-TEMP/rate-limit ")
    assert store.lookups == 2
    clock.advance(61)
    assert session.send(track_line()).startswith(b"+OK+ ")


def test_failure_limit_holds_for_concurrent_lookups(clock):
    # RFC 3887 §2.5: 45 connections from one address, each with one TRACK and a wrong secret, all
    # waiting on the store at once: only failure_rate (10) of them may reach the store,
    # the others are refused before any lookup (the attempt counts before the lookup).
    store = FakeStore(stored())
    store.pending = []
    factory = make(clock, store)
    sessions = [Session(factory, (PEER[0], 40000 + n)) for n in range(45)]
    replies = []
    for session in sessions:
        session.output()
        replies.append(session.send(track_line(secret=OTHER_SECRET_B64)))
    assert store.lookups == 10
    assert replies[:10] == [b""] * 10  # waiting for the store
    limited = b"-TEMP/rate-limit Too many TRACK commands; try again later\r\n"
    assert replies[10:] == [limited] * 35
    while store.pending:
        store.release_one()
    assert [s.output() for s in sessions[:10]] == [b"-ERR/noinfo No tracking information\r\n"] * 10
    assert sessions[0].send(track_line()) == limited


def test_successful_tracks_do_not_count_as_failures(clock):
    # RFC 3887 §2.5: the failure counted before the lookup is taken back when the TRACK is answered.
    store = FakeStore(stored())
    session = Session(make(clock, store, failure_rate=2))
    session.output()
    for _ in range(5):
        assert session.send(track_line()).startswith(b"+OK+ ")
    assert session.send(track_line(secret=OTHER_SECRET_B64)).startswith(b"-ERR/noinfo")
    assert session.send(track_line()).startswith(b"+OK+ ")
    assert session.send(track_line(secret=OTHER_SECRET_B64)).startswith(b"-ERR/noinfo")
    assert session.send(track_line()).startswith(b"-TEMP/rate-limit ")


def test_store_errors_do_not_count_as_failures(clock):
    store = FakeStore(stored())
    store.broken = True
    session = Session(make(clock, store, failure_rate=1))
    session.output()
    for _ in range(3):
        assert session.send(track_line()).startswith(b"-TEMP/unavailable ")
    store.broken = False
    assert session.send(track_line()).startswith(b"+OK+ ")


def test_rate_limiter_forget_takes_back_one_event(clock):
    limiter = RateLimiter(2, clock)
    first = limiter.record("a")
    limiter.record("a")
    assert not limiter.allowed("a")
    limiter.forget("a", first)
    assert limiter.allowed("a")
    limiter.forget("a", first)
    limiter.forget("a", first)  # nothing left to take back
    limiter.forget("b", first)
    assert len(limiter) == 0


def test_rate_limiter_forgets_idle_addresses(clock):
    limiter = RateLimiter(2, clock)
    for address in ("a", "b", "c"):
        limiter.record(address)
    assert len(limiter) == 3 and limiter.allowed("a")
    limiter.record("a")
    assert not limiter.allowed("a")
    clock.advance(61)
    limiter.record("d")
    assert len(limiter) == 1 and limiter.allowed("a")
    assert RateLimiter(0, clock).allowed("x")


def test_connection_limit_per_address(clock):
    factory = make(clock, max_connections_per_ip=1)
    first = Session(factory)
    second = Session(factory)
    assert second.output() == (
        b"-TEMP/MTQP/unavailable Too many connections from you; try again later\r\n"
    )
    assert second.transport.disconnecting and not first.transport.disconnecting


def test_shutdown_answers_a_pending_track_first(clock):
    store = FakeStore(stored())
    store.pending = []
    factory = make(clock, store)
    session = Session(factory)
    session.send(track_line() + b"COMMENT\r\n")
    done = factory.shutdown()
    assert not session.transport.disconnecting
    store.release_one()
    wire = session.output()
    assert wire.startswith(b"+OK+ ") and wire.endswith(b".\r\n")  # no COMMENT reply
    assert session.transport.disconnecting
    session.proto.connectionLost(None)
    assert done.called


# -- configuration ---


def test_settings_from_config(tmp_path):
    config = load_config(
        None,
        [
            Override("t", "server.data_dir", str(tmp_path)),
            Override("t", "mtqp.idle_timeout", "15m"),
            Override("t", "mtqp.track_rate", 5),
            Override("t", "mtqp.failure_rate", 0),
            Override("t", "queue.max_lifetime", "2d"),
        ],
        fqdn=lambda: HOSTNAME,
    )
    settings = settings_from_config(config, None)
    assert (settings.hostname, settings.idle_timeout) == (HOSTNAME, 900.0)
    assert (settings.track_rate, settings.failure_rate, settings.tls) == (5, 0, None)
    assert settings.retry.max_lifetime == 2 * 86400


def test_tls_required_needs_a_certificate(tmp_path):
    path = tmp_path / "mtrkmta.toml"
    path.write_text("[mtqp]\ntls_required = true\n")
    with pytest.raises(ConfigError, match=r"mtqp\.tls_required: needs tls\.certificate"):
        load_config(path, fqdn=lambda: HOSTNAME)


def test_idle_timeout_below_ten_minutes_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 10m"):
        load_config(None, [Override("--x", "mtqp.idle_timeout", "9m")], fqdn=lambda: HOSTNAME)


def test_track_answer_carries_each_transaction_events_in_its_blocks(clock):
    # RFC 3464 §2.4: the events travel as extension fields, which other clients ignore.
    store = FakeStore(stored(state=RecipientState.DEFERRED))
    store.events["Q1"] = [
        Event("Q1", None, ARRIVAL, EventKind.ARRIVED, (("client", "pc [192.0.2.1]:5"),)),
        Event("Q1", 0, ARRIVAL + 5, EventKind.DEFERRED, (("status", "4.4.1"),)),
    ]
    session = Session(make(clock, store))
    session.output()
    (response,) = responses(session.send(track_line()))
    (report,) = parse_related(response.body)
    assert report.extensions == (("X-Mtrkmta-Event", "Tue, 14 Nov 2023 22:13:20 +0000; arrived"),)
    (rcpt,) = report.recipients
    assert rcpt.extensions == (
        ("X-Mtrkmta-Event", 'Tue, 14 Nov 2023 22:13:25 +0000; deferred; status="4.4.1"'),
    )
    assert b"192.0.2.1" not in response.body
