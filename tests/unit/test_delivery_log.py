"""The delivery log line of each recipient after an attempt (doc/running.rst, "Logging"),
as the text observer writes it, on a queue driven by a clock alone."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator

import pytest
import pytest_twisted
from test_maildir import attempt as maildir_attempt
from test_queue_service import START, Node
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import DNSLookupError, getConnectError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mtrkmta.delivery.interfaces import (
    IRouter,
    ITransport,
    RecipientOutcome,
    Relay,
    Server,
    Timing,
)
from mtrkmta.delivery.maildir import MaildirTransport
from mtrkmta.delivery.smtp import connect_failure, relay_of, target
from mtrkmta.logfile import text_observer
from mtrkmta.queue.deliverylog import Times, delivery_fields
from mtrkmta.tracking.interfaces import RecipientState, RecipientUpdate, StoredRecipient

STAMP = r"\S+ \[mtrkmta\.queue\.service#info\] "


@pytest.fixture
def log() -> Iterator[Callable[[], list[str]]]:
    """The queue's delivery lines so far, without the time stamp and [system]."""
    out = io.StringIO()
    observer = text_observer(out)
    globalLogPublisher.addObserver(observer)

    def lines() -> list[str]:
        text = out.getvalue().splitlines()
        return [re.sub(f"^{STAMP}", "", line) for line in text if " to=<" in line]

    yield lines
    globalLogPublisher.removeObserver(observer)


@implementer(ITransport)
class TimedTransport:
    """Answers once the test says so, as a transport that connected ``connect_after``
    seconds into the attempt would: its relay, its timing on the node's clock."""

    def __init__(self, clock, outcome: RecipientOutcome, relay: Relay | None, connect_after):
        self.clock = clock
        self.outcome = outcome
        self.relay = relay
        self.connect_after = connect_after
        self.pending: list[tuple[Deferred, tuple[int, ...], float]] = []

    def deliver(self, attempt):
        d: Deferred = Deferred()
        self.pending.append((d, attempt.recipients, self.clock.seconds()))
        return d

    def answer(self):
        for d, indices, started in self.pending:
            connected = None if self.relay is None else started + self.connect_after
            timing = Timing(connected, self.clock.seconds())
            d.callback(
                [
                    RecipientOutcome(
                        i,
                        self.outcome.state,
                        self.outcome.status,
                        self.outcome.diagnostic,
                        relay=self.relay,
                        timing=timing,
                    )
                    for i in indices
                ]
            )
        self.pending = []

    def abort(self):
        self.pending = []

    def close(self):
        return succeed(None)


async def attempt_after(node: Node, transport: TimedTransport, waited: float, took: float):
    """Accept q1 for alice, hold its first run ``waited`` seconds (as a busy queue would),
    then let the transport take ``took`` seconds."""
    node.transport = transport
    node.queue = node.new_queue()
    await node.start()
    node.queue.scheduler.stop()
    await node.accept("Q1", "alice@far.example")
    await node.advance(waited)
    node.queue.scheduler.run()
    await node.queue.flush("Q1")
    await node.advance(0)
    assert transport.pending, "the attempt has started"
    await node.advance(took)
    transport.answer()


@pytest_twisted.ensureDeferred
async def test_a_relayed_recipient_names_the_peer_the_delays_and_the_reply(log):
    node = Node()
    sent = RecipientOutcome(0, RecipientState.RELAYED, "2.1.9", "smtp; 250 2.0.0 Ok: queued")
    relay = Relay("mx.far.example", "192.0.2.7", 25)
    transport = TimedTransport(node.clock, sent, relay, connect_after=0.5)
    try:
        await attempt_after(node, transport, waited=3, took=1.25)
        assert log() == [
            "Q1: to=<alice@far.example>, relay=mx.far.example[192.0.2.7]:25, delay=4.25,"
            " delays=3.00/0.50/0.75, dsn=2.1.9, status=relayed (250 2.0.0 Ok: queued)"
        ]
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_a_refused_connection_is_relay_none_with_the_time_spent_trying(log):
    node = Node()
    refused = RecipientOutcome(
        0,
        RecipientState.DEFERRED,
        "4.4.1",
        "x-mtrkmta; connect to mx.far.example[192.0.2.7]:25: Connection refused",
    )
    transport = TimedTransport(node.clock, refused, None, connect_after=0)
    try:
        await attempt_after(node, transport, waited=0, took=2)
        assert log() == [
            "Q1: to=<alice@far.example>, relay=none, delay=2.00, delays=0.00/2.00/0.00,"
            " dsn=4.4.1, status=deferred"
            " (connect to mx.far.example[192.0.2.7]:25: Connection refused)"
        ]
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_a_bounced_recipient_over_a_unix_socket(log):
    node = Node()
    failed = RecipientOutcome(0, RecipientState.FAILED, "5.1.1", "smtp; 550 5.1.1 No such user")
    transport = TimedTransport(
        node.clock, failed, Relay("lda.example", "/run/lmtp"), connect_after=0.0
    )
    try:
        await attempt_after(node, transport, waited=0, took=0.5)
        message = await node.tracking.message("Q1")
        assert message.recipients[0].state is RecipientState.FAILED
        (line,) = log()
        assert line == (
            "Q1: to=<alice@far.example>, relay=lda.example[/run/lmtp], delay=0.50,"
            " delays=0.00/0.00/0.50, dsn=5.1.1, status=bounced (550 5.1.1 No such user)"
        )
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_a_maildir_delivery_is_relay_local_timed_by_the_queue(log):
    # A transport that does not time its outcomes (Maildir, in a thread) is timed by the
    # queue from the call to the answer.
    node = Node()
    delivered = RecipientOutcome(0, RecipientState.DELIVERED, "2.1.5")

    class Untimed(TimedTransport):
        def answer(self):
            for d, indices, _ in self.pending:
                d.callback(
                    [
                        RecipientOutcome(i, RecipientState.DELIVERED, "2.1.5", relay=self.relay)
                        for i in indices
                    ]
                )

    transport = Untimed(node.clock, delivered, Relay("local"), connect_after=0)
    try:
        await attempt_after(node, transport, waited=1, took=0.25)
        assert log() == [
            "Q1: to=<alice@far.example>, relay=local, delay=1.25, delays=1.00/0.00/0.25,"
            " dsn=2.1.5, status=sent (delivered to maildir)"
        ]
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_an_administrators_bounce_is_logged_with_relay_none(log):
    node = Node()
    await node.start()
    try:
        node.queue.scheduler.stop()
        await node.accept("Q2", "bob@far.example")
        node.clock.advance(7)
        node.queue.scheduler.run()
        assert await node.queue.bounce("Q2")
        (line,) = log()
        assert line == (
            "Q2: to=<bob@far.example>, relay=none, delay=7.00, delays=7.00/0.00/0.00,"
            " dsn=5.0.0, status=bounced (bounced by the administrator)"
        )
        assert START + 7 == node.clock.seconds()
    finally:
        await node.close()


def test_relay_names_the_peer_actually_connected_to():
    assert str(relay_of("mx.example", IPv4Address("TCP", "192.0.2.1", 2525))) == (
        "mx.example[192.0.2.1]:2525"
    )
    assert str(relay_of("[2001:db8::1]", IPv6Address("TCP", "2001:db8::1", 25))) == (
        "2001:db8::1[2001:db8::1]:25"
    )
    assert str(relay_of("lda", UNIXAddress(b"/run/dovecot/lmtp"))) == "lda[/run/dovecot/lmtp]"
    assert str(Relay("local")) == "local"


def test_a_failed_connection_names_the_address_and_port_it_tried():
    # The example: "connect to 127.0.0.1 failed" when the target was port 2999.
    assert target(Server("127.0.0.1", "tcp:host=127.0.0.1:port=2999")) == (
        "127.0.0.1[127.0.0.1]:2999"
    )
    assert target(Server("[2001:db8::1]", r"tcp:host=2001\:db8\:\:1:port=25")) == (
        "2001:db8::1[2001:db8::1]:25"
    )
    assert target(Server("lda", "unix:path=/run/dovecot/lmtp")) == "lda[/run/dovecot/lmtp]"
    assert connect_failure(getConnectError((111, "Connection refused"))) == "Connection refused"
    assert connect_failure(getConnectError((113, "x"))) == "No route to host"
    assert connect_failure(DeferredTimeout()) == "Connection timed out"
    assert connect_failure(DNSLookupError("no such host")) == ("DNS lookup failed: no such host.")


# -- every line about a message begins with its queue id ---------------------------------


@pytest.fixture
def every_line() -> Iterator[Callable[[], list[str]]]:
    """Every line logged, without the time stamp and [system]."""
    out = io.StringIO()
    observer = text_observer(out)
    globalLogPublisher.addObserver(observer)

    def lines() -> list[str]:
        return [line.split("] ", 1)[1] for line in out.getvalue().splitlines() if "] " in line]

    yield lines
    globalLogPublisher.removeObserver(observer)


def test_maildir_failures_begin_with_the_queue_id(tmp_path, every_line):
    maildir = MaildirTransport(MemoryReactorClock(), ThreadPool(), tmp_path)
    (tmp_path / "bob").write_text("a file where the mailbox should be")
    outcomes = maildir._deliver(maildir_attempt(("@x.test", "bob@x.test"), queue_id="Q1"))
    assert [o.state for o in outcomes] == [RecipientState.FAILED, RecipientState.DEFERRED]
    first, second = every_line()
    assert first == "Q1: maildir delivery to <@x.test> failed: empty local part: no mailbox"
    assert second.startswith("Q1: maildir delivery to <bob@x.test> failed: [Errno ")


@implementer(IRouter)
class BrokenRouter:
    def route(self, domain):
        raise RuntimeError("resolver exploded")


@implementer(ITransport)
class BrokenTransport:
    def deliver(self, attempt):
        return fail(RuntimeError("transport exploded"))

    def abort(self):
        self.aborted = True

    def close(self):
        return succeed(None)


@pytest_twisted.ensureDeferred
async def test_routing_and_transport_failures_begin_with_the_queue_id(every_line):
    node = Node()
    node.transport = BrokenTransport()
    node.queue = node.new_queue()
    await node.start()
    try:
        await node.accept("Q3", "carol@far.example")
        await node.advance(0)
        node.queue.router = BrokenRouter()
        await node.accept("Q4", "dan@far.example")
        await node.advance(0)
    finally:
        await node.close()
    about = [line for line in every_line() if "failed" in line and " to=<" not in line]
    assert about[0] == "Q3: transport failed for mx:far.example"
    assert about[1] == "Q4: routing far.example failed: resolver exploded"
    assert len(about) == 2


def test_an_address_an_alias_rewrote_is_to_and_the_clients_is_orig_to():
    recipient = StoredRecipient(
        0, "postmaster@mx.example", None, None, "postmaster@mx.example", RecipientState.QUEUED
    )
    update = RecipientUpdate(
        0,
        RecipientState.DELIVERED,
        "2.1.5",
        action="delivered",
        final_recipient="alice@mx.example",
    )
    outcome = RecipientOutcome(
        0, RecipientState.DELIVERED, "2.1.5", relay=Relay("local"), timing=Timing(10.5, 11.0)
    )
    fmt, fields = delivery_fields("Q5", recipient, update, outcome, Times(10.0, 10.5, 11.0))
    assert fmt.format(**fields) == (
        "Q5: to=<alice@mx.example>, orig_to=<postmaster@mx.example>, relay=local,"
        " delay=1.00, delays=0.50/0.00/0.50, dsn=2.1.5, status=sent (delivered to maildir)"
    )
