"""The queue honours an R-mode BY deadline (RFC 2852 §4.1.3), on a clock alone."""

from __future__ import annotations

import pytest_twisted
from test_queue_service import START, Node

from mtrkmta.delivery.interfaces import RecipientOutcome
from mtrkmta.envelope import DeliverBy, Envelope, MailParams, Recipient
from mtrkmta.queue.policy import RetryPolicy, return_by, update_for
from mtrkmta.tracking.interfaces import RecipientState

DEFERRED = RecipientState.DEFERRED
POLICY = RetryPolicy(first_retry=300, max_interval=3600, max_lifetime=5 * 86400)


def test_return_by_is_arrival_plus_by_time_for_r_only() -> None:
    """RFC 2852 §4: deliver-by-time = by-time added to the time of receipt."""

    def envelope(by: DeliverBy | None) -> Envelope:
        return Envelope("q", "a@b", (), MailParams(deliver_by=by), arrival=1000.0)

    assert return_by(envelope(DeliverBy(120, "R"))) == 1120.0
    assert return_by(envelope(DeliverBy(120, "N"))) is None
    assert return_by(envelope(None)) is None


def test_a_temporary_failure_is_retried_no_later_than_the_deadline_then_fails_5_4_7() -> None:
    deferred = RecipientOutcome(index=0, state=DEFERRED, status="4.4.1", diagnostic="smtp; 421")
    before = update_for(
        deferred, attempts_before=0, arrival=START, now=START, policy=POLICY, deadline=START + 100
    )
    assert (before.state, before.next_attempt, before.will_retry_until) == (
        DEFERRED,
        START + 100,  # the deadline, not the 300 s backoff
        START + 100,
    )
    after = update_for(
        deferred,
        attempts_before=1,
        arrival=START,
        now=START + 100,
        policy=POLICY,
        deadline=START + 100,
    )
    assert (after.state, after.status, after.action) == (RecipientState.FAILED, "5.4.7", "failed")
    assert after.diagnostic == "smtp; 421"  # the last remote reply is kept


async def accept_with_by(node: Node, queue_id: str, by: DeliverBy, *addresses: str) -> None:
    envelope = Envelope(
        queue_id=queue_id,
        sender="sender@origin.example",
        recipients=tuple(Recipient(a) for a in addresses),
        params=MailParams(deliver_by=by),
        arrival=node.clock.seconds(),
    )
    content = b"Subject: test\r\n\r\nbody\r\n"
    await node.spool.store(envelope, content)
    record = await node.tracking.record_arrival(
        envelope, reporting_mta="mx", node_id="node1", size=len(content)
    )
    node.queue.enqueue(envelope, content, record)


@pytest_twisted.ensureDeferred
async def test_r_mode_fails_with_5_4_7_at_the_deadline_without_another_attempt() -> None:
    """RFC 2852 §4.1.3: at deliver-by-time no further attempt; failed with 5.4.7."""
    node = Node()
    await node.start()
    node.transport.script["slow@one.example"] = [DEFERRED] * 10
    try:
        await accept_with_by(node, "q0100", DeliverBy(120, "R"), "slow@one.example")
        await node.advance(0)
        assert len(node.transport.attempts) == 1
        await node.advance(119)
        assert await node.states("q0100") == [("deferred", "4.4.1")]
        await node.advance(1)  # the run is scheduled at the deadline, before the 300 s retry
        assert await node.states("q0100") == [("failed", "5.4.7")]
        assert len(node.transport.attempts) == 1  # no attempt at or after the deadline
        assert await node.spool.queue_ids() == []
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_n_mode_is_not_failed_at_the_deadline() -> None:
    """RFC 2852 §4.1.3: with N, attempts continue past deliver-by-time."""
    node = Node()
    await node.start()
    node.transport.script["slow@one.example"] = [DEFERRED, DEFERRED, RecipientState.RELAYED]
    try:
        await accept_with_by(node, "q0101", DeliverBy(120, "N"), "slow@one.example")
        await node.advance(0)
        await node.advance(300)
        assert await node.states("q0101") == [("deferred", "4.4.1")]
        await node.advance(600)
        assert await node.states("q0101") == [("relayed", "2.1.9")]
    finally:
        await node.close()
