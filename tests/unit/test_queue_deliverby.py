"""The queue and a message's deliver-by-time (RFC 2852 §4.1.3), on a clock: by-mode R
fails with 5.4.7 at the deadline, by-mode N sends a "delayed" DSN with 4.4.7 then."""

from __future__ import annotations

from dataclasses import replace

import pytest
import pytest_twisted
from test_queue_service import POLICY, Node, ScriptedTransport
from twisted.internet.defer import succeed

from mtrkmta.delivery.interfaces import RecipientOutcome
from mtrkmta.dsn.notifier import DsnNotifier
from mtrkmta.envelope import DeliverBy, Envelope, MailParams, RcptParams, Recipient
from mtrkmta.queue.policy import Deadline, deadline_of, deliver_by_delay_due, update_for
from mtrkmta.tracking.interfaces import RecipientState

DOWN = RecipientState.DEFERRED


class StatusTransport(ScriptedTransport):
    """The scripted transport, its temporary failures with a chosen status."""

    deferred_status = "4.4.1"

    def deliver(self, attempt):
        def restated(outcomes: list[RecipientOutcome]) -> list[RecipientOutcome]:
            return [
                replace(o, status=self.deferred_status) if o.state is DOWN else o for o in outcomes
            ]

        return super().deliver(attempt).addCallback(restated)


class DeliverByNode(Node):
    """A queue node with the real DSN notifier; the DSNs it makes are kept, not queued."""

    def __init__(self) -> None:
        super().__init__()
        self.transport = self.queue.transports["smtp"] = StatusTransport()
        self.dsns: list[bytes] = []
        self.queue.notifier = DsnNotifier(
            spool=self.spool,
            new_queue_id=lambda: f"dsn{len(self.dsns)}",
            reporting_mta="mx.example.test",
            delay_warning=0,  # no ordinary delay warnings: only the deliver-by ones
            clock=self.clock,
        )
        self.queue.submit = self._keep  # type: ignore[method-assign]

    def _keep(self, envelope: Envelope, content: bytes):
        self.dsns.append(content)
        return succeed(None)

    async def accept_by(
        self, queue_id: str, by: DeliverBy, address: str, notify: frozenset[str] | None = None
    ) -> None:
        envelope = Envelope(
            queue_id=queue_id,
            sender="sender@origin.example",
            recipients=(Recipient(address, RcptParams(notify=notify)),),
            params=MailParams(deliver_by=by),
            arrival=self.clock.seconds(),
        )
        content = b"Subject: test\r\n\r\nbody\r\n"
        await self.spool.store(envelope, content)
        record = await self.tracking.record_arrival(
            envelope, reporting_mta="mx", node_id="node1", size=len(content)
        )
        self.queue.enqueue(envelope, content, record)


@pytest.fixture
def node() -> DeliverByNode:
    return DeliverByNode()


@pytest_twisted.ensureDeferred
async def test_r_mode_fails_with_5_4_7_at_the_deadline_not_at_the_next_retry(node):
    await node.start()
    node.transport.script["a@down.example"] = [DOWN]
    try:
        await node.accept_by("q1", DeliverBy(100, "R"), "a@down.example")
        await node.advance(0)
        assert await node.states("q1") == [("deferred", "4.4.1")]
        message = await node.tracking.message("q1")
        assert message.recipients[0].next_attempt == node.clock.seconds() + 100  # not +300
        await node.advance(99)
        assert await node.states("q1") == [("deferred", "4.4.1")]
        assert node.dsns == []
        await node.advance(1)
        # RFC 2852 §4.1.3: no further attempt; a "failed" DSN with 5.4.7.
        assert await node.states("q1") == [("failed", "5.4.7")]
        assert len(node.transport.attempts) == 1
        assert len(node.dsns) == 1
        assert b"Action: failed" in node.dsns[0] and b"Status: 5.4.7" in node.dsns[0]
        assert await node.spool.queue_ids() == []
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_r_mode_failure_dsn_follows_notify(node):
    await node.start()
    node.transport.script["a@down.example"] = [DOWN]
    try:
        await node.accept_by(
            "q2", DeliverBy(100, "R"), "a@down.example", notify=frozenset({"SUCCESS"})
        )
        await node.advance(0)
        await node.advance(100)
        assert await node.states("q2") == [("failed", "5.4.7")]
        assert node.dsns == []  # RFC 2852 §4.1.3: only with NOTIFY absent or FAILURE
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_n_mode_sends_one_delayed_dsn_at_the_deadline_and_goes_on(node):
    await node.start()
    node.transport.script["a@down.example"] = [DOWN, DOWN, DOWN, RecipientState.RELAYED]
    try:
        await node.accept_by("q3", DeliverBy(100, "N", True), "a@down.example")
        await node.advance(0)
        await node.advance(99)
        assert node.dsns == []
        await node.advance(1)
        # RFC 2852 §4.1.3: by-mode N: go on, and a "delayed" DSN with 4.4.7.
        assert await node.states("q3") == [("deferred", "4.4.7")]
        assert len(node.dsns) == 1
        assert b"Action: delayed" in node.dsns[0] and b"Status: 4.4.7" in node.dsns[0]
        await node.advance(POLICY.first_retry * 2)
        assert await node.states("q3") == [("deferred", "4.4.7")]
        assert len(node.dsns) == 1  # once
        await node.advance(POLICY.first_retry * 4)
        assert await node.states("q3") == [("relayed", "2.1.9")]
        assert len(node.transport.attempts) == 4
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_n_mode_delayed_dsn_follows_notify(node):
    await node.start()
    node.transport.script["a@down.example"] = [DOWN]
    try:
        await node.accept_by(
            "q4", DeliverBy(100, "N"), "a@down.example", notify=frozenset({"FAILURE"})
        )
        await node.advance(0)
        await node.advance(100)
        assert await node.states("q4") == [("deferred", "4.4.7")]
        assert node.dsns == []  # RFC 2852 §4.1.3: only with NOTIFY absent or DELAY
    finally:
        await node.close()


def test_deadline_is_arrival_plus_by_time_rounded_up() -> None:
    envelope = Envelope("q", "s@x", (), MailParams(deliver_by=DeliverBy(60, "R")), 1000.25)
    assert deadline_of(envelope) == Deadline(1061, "R")
    assert deadline_of(Envelope("q", "s@x", (), MailParams(), 1000.0)) is None


def test_update_for_caps_the_retry_at_the_deadline_and_fails_r_after_it() -> None:
    outcome = RecipientOutcome(0, RecipientState.DEFERRED, "4.4.1", diagnostic="smtp; 421")
    before = update_for(
        outcome, attempts_before=0, arrival=0.0, now=10.0, policy=POLICY, deadline=Deadline(50, "R")
    )
    assert (before.state, before.next_attempt) == (RecipientState.DEFERRED, 50)
    after = update_for(
        outcome, attempts_before=0, arrival=0.0, now=50.0, policy=POLICY, deadline=Deadline(50, "R")
    )
    assert (after.state, after.status, after.diagnostic) == (
        RecipientState.FAILED,
        "5.4.7",
        "smtp; 421",
    )
    n_after = update_for(
        outcome, attempts_before=0, arrival=0.0, now=50.0, policy=POLICY, deadline=Deadline(50, "N")
    )
    assert (n_after.state, n_after.status, n_after.next_attempt) == (
        RecipientState.DEFERRED,
        "4.4.7",
        350.0,
    )


def test_deliver_by_delay_is_due_once() -> None:
    assert deliver_by_delay_due("4.4.1", "4.4.7", True)
    assert deliver_by_delay_due(None, "4.4.7", True)
    assert not deliver_by_delay_due("4.4.7", "4.4.7", True)
    assert not deliver_by_delay_due("4.4.1", "4.4.1", True)
    assert not deliver_by_delay_due("4.4.1", "4.4.7", False)


@pytest_twisted.ensureDeferred
async def test_a_remote_4_4_7_without_by_owes_no_delayed_dsn(node):
    # Only a message with BY= owes the RFC 2852 §4.1.3 notice; a next hop's own 4.4.7
    # deferral of any other message waits for the ordinary delay warning.
    await node.start()
    node.transport.script["a@down.example"] = [DOWN]
    node.transport.deferred_status = "4.4.7"
    try:
        envelope = Envelope(
            queue_id="q5",
            sender="sender@origin.example",
            recipients=(Recipient("a@down.example"),),
            arrival=node.clock.seconds(),
        )
        await node.spool.store(envelope, b"Subject: t\r\n\r\nb\r\n")
        record = await node.tracking.record_arrival(
            envelope, reporting_mta="mx", node_id="node1", size=16
        )
        node.queue.enqueue(envelope, b"Subject: t\r\n\r\nb\r\n", record)
        await node.advance(0)
        assert await node.states("q5") == [("deferred", "4.4.7")]
        assert node.dsns == []
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_a_remote_4_4_7_before_an_n_deadline_owes_no_delayed_dsn(node):
    # The RFC 2852 §4.1.3 notice is owed once the deliver-by-time has passed, not when
    # a next hop happens to defer with 4.4.7 before it.
    await node.start()
    node.transport.script["a@down.example"] = [DOWN]
    node.transport.deferred_status = "4.4.7"
    try:
        await node.accept_by("q6", DeliverBy(1000, "N"), "a@down.example")
        await node.advance(0)
        assert await node.states("q6") == [("deferred", "4.4.7")]
        assert node.dsns == []
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_r_mode_past_its_deadline_before_the_first_run_is_not_attempted(node):
    # A message whose deliver-by-time has already passed when its run comes (held,
    # or queued behind others) fails with 5.4.7 without an attempt (RFC 2852 §4.1.3).
    await node.start()
    node.transport.script["a@down.example"] = [RecipientState.RELAYED]
    try:
        await node.accept_by("q7", DeliverBy(1, "R"), "a@down.example")
        node.clock.advance(5)
        await node.advance(0)
        assert await node.states("q7") == [("failed", "5.4.7")]
        assert node.transport.attempts == []
        assert b"delivery time expired" in node.dsns[0]
    finally:
        await node.close()
