"""QueueService on a clock alone: the memory spool and tracking store (which pass the
same contract tests as the real ones) answer at once, so every queue run happens
exactly when the clock says, and a test reads the result right after advancing it.

The router and transport are small doubles of our own interfaces: what is under
test is scheduling, retries, expiry, recovery, faults and the admin actions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from mtrkmta.delivery.interfaces import (
    IRouter,
    ITransport,
    NextHop,
    RecipientOutcome,
    RouteFailure,
    Server,
)
from mtrkmta.envelope import Envelope, Recipient
from mtrkmta.queue.policy import RetryPolicy
from mtrkmta.queue.service import (
    ENTRY_COST,
    RECIPIENT_COST,
    QueueActionRefused,
    QueueService,
)
from mtrkmta.spool.memory import MemorySpool
from mtrkmta.tracking.interfaces import RecipientState
from mtrkmta.tracking.memory import MemoryTrackingStore

START = 1_800_000_000.0
POLICY = RetryPolicy(first_retry=300, max_interval=3600, max_lifetime=5 * 86400)


@implementer(IRouter)
class TableRouter:
    def __init__(self):
        self.failures: dict[str, RouteFailure] = {}

    def route(self, domain):
        if domain in self.failures:
            return succeed(self.failures[domain])
        return succeed(
            NextHop(
                transport="smtp",
                destination=f"mx:{domain}",
                servers=(Server(f"mx.{domain}", "tcp:host=127.0.0.1:port=9"),),
            )
        )


@implementer(ITransport)
class ScriptedTransport:
    """Answers each recipient by its address: a queue of states per address, then delivered."""

    def __init__(self):
        self.script: dict[str, list[RecipientState]] = {}
        self.attempts: list[tuple[str, tuple[str, ...]]] = []
        self.firsts: list[bool] = []  # Attempt.first of each attempt
        self.in_flight = 0
        self.max_in_flight = 0
        self.holding = False  # while True, each attempt waits for release()
        self.held: list[tuple[Deferred, Any]] = []

    def deliver(self, attempt):
        addresses = tuple(attempt.recipient(i).address for i in attempt.recipients)
        self.attempts.append((attempt.envelope.queue_id, addresses))
        self.firsts.append(attempt.first)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def answer(_=None):
            self.in_flight -= 1
            outcomes = []
            for index, address in zip(attempt.recipients, addresses, strict=True):
                states = self.script.get(address) or [RecipientState.RELAYED]
                state = states.pop(0) if len(states) > 1 else states[0]
                status = {"deferred": "4.4.1", "failed": "5.1.1"}.get(state.value, "2.1.9")
                outcomes.append(
                    RecipientOutcome(
                        index,
                        state,
                        status,
                        diagnostic=f"smtp; {status}",
                        remote_mta=f"dns; mx.{address.split('@')[1]}",
                    )
                )
            return outcomes

        if self.holding:
            d: Deferred = Deferred()
            self.held.append((d, answer))
            return d
        return succeed(answer())

    def release(self):
        """Let every held attempt answer, and the next ones answer at once."""
        self.holding = False
        held, self.held = self.held, []
        for d, answer in held:
            d.callback(answer())

    def close(self):
        return succeed(None)


class GuardedClock(Clock):
    """A Clock that fails a test whose code keeps scheduling calls for "now": a queue
    timer that re-arms itself at once would otherwise make ``advance`` loop forever."""

    LIMIT = 1000

    def __init__(self) -> None:
        super().__init__()
        self._now_calls = 0
        self._at = -1.0

    def callLater(self, delay, callable, *args, **kw):
        if delay <= 0:
            if self._at != self.seconds():
                self._at, self._now_calls = self.seconds(), 0
            self._now_calls += 1
            if self._now_calls > self.LIMIT:
                raise AssertionError("calls keep being scheduled for now: spinning")
        return super().callLater(delay, callable, *args, **kw)


class Node:
    """A queue service over a memory spool and store; ``restart`` is a new process on
    the same (durable) spool and store, with nothing of the old one's memory."""

    def __init__(self):
        self.clock = GuardedClock()
        self.clock.advance(START)
        self.router = TableRouter()
        self.transport = ScriptedTransport()
        self.spool = MemorySpool()
        self.tracking = MemoryTrackingStore(
            self.clock, default_retention=9 * 86400, max_retention=30 * 86400
        )
        self.queue = self.new_queue()

    def new_queue(self, notifier=None) -> QueueService:
        return QueueService(
            spool=self.spool,
            tracking=self.tracking,
            router=self.router,
            transports={"smtp": self.transport},
            clock=self.clock,
            node_id="node1",
            retry=POLICY,
            destination_concurrency=2,
            notifier=notifier,
        )

    async def start(self):
        await self.spool.recover()
        await self.queue.start()

    async def restart(self):
        """Stop the queue as a crash would (nothing flushed) and start a new one."""
        notifier = self.queue.notifier
        await self.queue.stop()
        self.queue = self.new_queue(notifier)
        await self.start()

    async def close(self):
        await self.queue.stop()
        await self.spool.close()
        await self.tracking.close()

    async def accept(self, queue_id: str, *addresses: str, enqueue: bool = True) -> Envelope:
        envelope = Envelope(
            queue_id=queue_id,
            sender="sender@origin.example",
            recipients=tuple(Recipient(a) for a in addresses),
            arrival=self.clock.seconds(),
        )
        content = b"Subject: test\r\n\r\nbody\r\n"
        await self.spool.store(envelope, content)
        record = await self.tracking.record_arrival(
            envelope, reporting_mta="mx", node_id="node1", size=len(content)
        )
        if enqueue:  # as the receiver does: the first run reads neither spool nor store
            self.queue.enqueue(envelope, content, record)
        return envelope

    async def advance(self, seconds: float):
        """Move the clock; the queue runs it starts finish before this returns."""
        self.clock.advance(seconds)

    async def states(self, queue_id: str) -> list[tuple[str, str | None]]:
        message = await self.tracking.message(queue_id)
        return [(r.state.value, r.status) for r in message.recipients]


@pytest.fixture
def node():
    return Node()


async def started(node: Node) -> Node:
    await node.start()
    return node


@pytest_twisted.ensureDeferred
async def test_delivered_message_leaves_the_spool(node):
    await started(node)
    try:
        await node.accept("q0001", "a@one.example", "b@two.example")
        await node.advance(0)
        assert await node.states("q0001") == [("relayed", "2.1.9"), ("relayed", "2.1.9")]
        assert await node.spool.queue_ids() == []
        assert sorted(a[1] for a in node.transport.attempts) == [
            ("a@one.example",),
            ("b@two.example",),
        ]
        message = await node.tracking.message("q0001")
        assert message.recipients[0].remote_mta == "dns; mx.one.example"
        assert message.recipients[0].action == "relayed"
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_only_the_first_run_of_a_message_accepted_here_is_a_first_attempt(node):
    # Attempt.first tells a transport that no earlier attempt can have delivered
    # (Maildir then need not look for a copy): only the first run of a message this
    # process accepted. Retries, and messages found at start-up, are not first.
    await started(node)
    node.transport.script["a@one.example"] = [RecipientState.DEFERRED, RecipientState.RELAYED]
    try:
        await node.accept("q0901", "a@one.example")
        await node.advance(0)
        await node.advance(24 * 3600)
        await node.accept("q0902", "b@one.example", enqueue=False)  # as after a restart
        node.queue.schedule("q0902", node.clock.seconds())
        await node.advance(0)
        assert [a[0] for a in node.transport.attempts] == ["q0901", "q0901", "q0902"]
        assert node.transport.firsts == [True, False, False]
    finally:
        await node.close()


def count_spool_loads(node: Node) -> list[str]:
    """The queue ids the queue loads from the spool from now on (the cache's misses)."""
    loads: list[str] = []
    load = node.spool.load

    def counted(queue_id: str) -> Deferred:
        loads.append(queue_id)
        return load(queue_id)

    node.spool.load = counted  # type: ignore[method-assign]
    return loads


@pytest_twisted.ensureDeferred
async def test_the_cache_serves_the_first_run_only_and_a_retry_reads_the_spool(node):
    await started(node)
    node.transport.script["a@one.example"] = [RecipientState.DEFERRED, RecipientState.RELAYED]
    loads = count_spool_loads(node)
    try:
        envelope = await node.accept("q0903", "a@one.example", "b@two.example")
        content_cost = len(b"Subject: test\r\n\r\nbody\r\n")
        assert node.queue._cache.size == content_cost + ENTRY_COST + 2 * RECIPIENT_COST
        await node.advance(0)
        assert (loads, node.queue._cache.size) == ([], 0)  # the first run: no spool read
        await node.advance(24 * 3600)
        assert loads == [envelope.queue_id]  # the retry
        assert await node.states("q0903") == [("relayed", "2.1.9"), ("relayed", "2.1.9")]
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_a_full_cache_keeps_what_it_holds_and_a_newcomer_is_read_from_the_spool(node):
    # A burst beyond the bound: the messages held (the older ones, which run first) stay;
    # evicting them for newer ones would make every run read the spool.
    await started(node)
    one_message = len(b"Subject: test\r\n\r\nbody\r\n") + ENTRY_COST + RECIPIENT_COST
    node.queue._cache.max_bytes = 2 * one_message
    loads = count_spool_loads(node)
    try:
        for n in range(4):
            await node.accept(f"q091{n}", f"r{n}@one.example")
        assert node.queue._cache.size == 2 * one_message
        await node.advance(0)
        assert sorted(loads) == ["q0912", "q0913"]
        assert node.queue._cache.size == 0
        assert sorted(a[0] for a in node.transport.attempts) == [f"q091{n}" for n in range(4)]
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_same_destination_shares_one_attempt(node):
    await started(node)
    try:
        await node.accept("q0002", "a@one.example", "b@one.example")
        await node.advance(0)
        assert node.transport.attempts == [("q0002", ("a@one.example", "b@one.example"))]
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_temporary_failure_backs_off_exponentially(node):
    await started(node)
    d = RecipientState.DEFERRED
    node.transport.script["a@one.example"] = [d, d, d, RecipientState.RELAYED]
    try:
        await node.accept("q0003", "a@one.example")
        await node.advance(0)
        message = await node.tracking.message("q0003")
        first = message.recipients[0]
        assert (first.state, first.status, first.action) == (d, "4.4.1", "delayed")
        assert first.next_attempt == START + 300
        assert first.will_retry_until == START + POLICY.max_lifetime
        await node.advance(299)
        assert len(node.transport.attempts) == 1  # not yet
        await node.advance(1)
        assert len(node.transport.attempts) == 2
        message = await node.tracking.message("q0003")
        assert message.recipients[0].next_attempt == START + 300 + 600  # doubled
        await node.advance(600)
        assert len(node.transport.attempts) == 3
        await node.advance(1200)
        assert await node.states("q0003") == [("relayed", "2.1.9")]
        assert await node.spool.queue_ids() == []
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_permanent_failure_is_final(node):
    await started(node)
    node.transport.script["x@one.example"] = [RecipientState.FAILED]
    try:
        await node.accept("q0004", "x@one.example")
        await node.advance(0)
        message = await node.tracking.message("q0004")
        r = message.recipients[0]
        assert (r.state, r.status, r.diagnostic) == (RecipientState.FAILED, "5.1.1", "smtp; 5.1.1")
        assert await node.spool.queue_ids() == []
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_queue_lifetime_expiry_fails_with_4_4_7(node):
    await started(node)
    node.transport.script["slow@one.example"] = [RecipientState.DEFERRED]
    try:
        await node.accept("q0005", "slow@one.example")
        await node.advance(0)
        for _ in range(200):
            message = await node.tracking.message("q0005")
            if not message.recipients[0].state.in_queue:
                break
            await node.advance(3600)
        r = message.recipients[0]
        assert (r.state, r.status, r.action) == (RecipientState.FAILED, "4.4.7", "failed")
        assert r.last_attempt >= START + POLICY.max_lifetime
        assert await node.spool.queue_ids() == []
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_route_failure(node):
    await started(node)
    node.router.failures["nullmx.example"] = RouteFailure(
        RecipientState.FAILED, "5.1.10", "null MX"
    )
    try:
        await node.accept("q0006", "a@nullmx.example")
        await node.advance(0)
        message = await node.tracking.message("q0006")
        assert (message.recipients[0].state, message.recipients[0].status) == (
            RecipientState.FAILED,
            "5.1.10",
        )
        assert node.transport.attempts == []
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_restart_redelivers_only_recipients_not_final(node):
    await started(node)
    node.transport.script["later@two.example"] = [RecipientState.DEFERRED]
    await node.accept("q0007", "now@one.example", "later@two.example")
    await node.advance(0)
    # A message accepted but never scheduled (crash right after the 250).
    await node.accept("q0008", "x@three.example", enqueue=False)
    node.transport.attempts.clear()
    node.transport.script.clear()
    await node.restart()
    try:
        await node.advance(0)
        attempted = {a for a in node.transport.attempts}
        assert ("q0008", ("x@three.example",)) in attempted
        assert all("now@one.example" not in a[1] for a in attempted)  # final: never again
        assert ("q0007", ("later@two.example",)) not in attempted  # retry time not reached
        await node.advance(300)
        assert ("q0007", ("later@two.example",)) in node.transport.attempts
        assert await node.spool.queue_ids() == []
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_destination_concurrency_limit(node):
    await started(node)
    node.transport.holding = True
    try:
        for n in range(5):
            await node.accept(f"q01{n:02d}", f"r{n}@busy.example")
        await node.advance(0)
        assert node.transport.in_flight == node.transport.max_in_flight == 2
        node.transport.release()  # the waiting attempts start as these finish
        assert node.transport.max_in_flight == 2
        assert await node.spool.queue_ids() == []
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_a_full_queue_waits_for_a_finished_attempt_without_spinning(node):
    # GuardedClock fails the test if a timer keeps re-arming itself for "now".
    node.queue.max_active_messages = 2
    await started(node)
    node.transport.holding = True
    try:
        for n in range(5):
            await node.accept(f"q03{n:02d}", f"r{n}@d{n}.example")
        await node.advance(0)
        assert node.transport.in_flight == 2
        # Three messages are due, but nothing may start: no timer is armed for them
        # (one would fire at once, find the queue full and re-arm itself, forever).
        assert [
            c for c in node.clock.getDelayedCalls() if c.getTime() <= node.clock.seconds()
        ] == []
        node.transport.release()
        for _ in range(3):
            await node.advance(0)
        assert sorted(q for q, _ in node.transport.attempts) == [f"q03{n:02d}" for n in range(5)]
        assert await node.spool.queue_ids() == []
    finally:
        node.transport.release()  # a failed check: let the stuck attempts end
        await node.close()


@pytest_twisted.ensureDeferred
async def test_hold_release_flush_delete_bounce(node):
    await started(node)
    node.transport.script["d@one.example"] = [RecipientState.DEFERRED]
    try:
        await node.accept("q0201", "d@one.example")
        await node.advance(0)
        assert len(node.transport.attempts) == 1
        assert await node.queue.hold("q0201")
        await node.advance(300)
        assert len(node.transport.attempts) == 1  # held: not attempted
        listing = await node.tracking.queue_listing("node1")
        assert [(m.queue_id, m.held) for m in listing] == [("q0201", True)]
        assert await node.queue.release("q0201")
        await node.advance(0)
        assert len(node.transport.attempts) == 2
        assert await node.queue.flush("q0201") == 1
        await node.advance(0)
        assert len(node.transport.attempts) == 3  # flush ignores the retry time
        assert await node.queue.bounce("q0201")
        assert await node.states("q0201") == [("failed", "5.0.0")]
        assert await node.spool.queue_ids() == []
        # Each change is an event of the message, the administrator's as such.
        events = await node.tracking.events("q0201")
        assert [(e.kind.value, e.recipient) for e in events] == [
            ("arrived", None),
            ("deferred", 0),
            ("held", None),
            ("released", None),
            ("deferred", 0),
            ("deferred", 0),
            ("bounced", 0),
        ]
        first = events[1]
        assert (first.time, first.get("relay"), first.get("status")) == (
            START,
            "dns; mx.one.example",
            "4.4.1",
        )
        assert first.get("next_attempt") == str(int(START) + 300)
        assert events[2].get("reason") == "held by the administrator"
        assert events[-1].get("by") == "the administrator"

        await node.accept("q0202", "d@one.example")
        await node.advance(0)
        assert await node.queue.delete("q0202")
        # Tracked still, as failed by the administrator, with no DSN (none is owed).
        (deleted,) = (await node.tracking.message("q0202")).recipients
        assert (deleted.state, deleted.status, deleted.dsn_pending) == (
            RecipientState.FAILED,
            "5.0.0",
            False,
        )
        assert deleted.diagnostic == "x-local; deleted by the administrator"
        last = (await node.tracking.events("q0202"))[-1]
        assert (last.kind.value, last.recipient, last.get("by")) == (
            "deleted",
            0,
            "the administrator",
        )
        assert await node.tracking.queued_messages("node1") == []
        assert await node.spool.queue_ids() == []
        assert not await node.queue.delete("nosuch")
    finally:
        await node.close()


class RecordingNotifier:
    """Owes a DSN for every failed recipient; can be told to fail the next sends."""

    def __init__(self):
        self.sent: list[tuple[str, list[tuple[str, str]]]] = []
        self.failures = 0

    def owed(self, message, recipient, now):
        return "failed" if recipient.state is RecipientState.FAILED else None

    def send(self, message, recipients, submit):
        if self.failures:
            self.failures -= 1
            from twisted.internet.defer import fail

            return fail(OSError("cannot queue the DSN"))
        self.sent.append((message.queue_id, [(r.address, r.state.value) for r in recipients]))
        return succeed(None)


@pytest_twisted.ensureDeferred
async def test_owed_dsn_is_recorded_then_sent_then_cleared(node):
    notifier = node.queue.notifier = RecordingNotifier()
    await started(node)
    node.transport.script["bad@one.example"] = [RecipientState.FAILED]
    try:
        await node.accept("q0301", "bad@one.example", "good@one.example")
        await node.advance(0)
        assert notifier.sent == [("q0301", [("bad@one.example", "failed")])]
        message = await node.tracking.message("q0301")
        assert [r.dsn_pending for r in message.recipients] == [False, False]
        assert await node.spool.queue_ids() == []
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_dsn_that_cannot_be_queued_is_retried_and_keeps_the_message(node):
    # The outcome and the debt are committed together; the message stays (with its
    # content, for RET=FULL) until the DSN is queued.
    notifier = node.queue.notifier = RecordingNotifier()
    notifier.failures = 1
    await started(node)
    node.transport.script["bad@one.example"] = [RecipientState.FAILED]
    try:
        await node.accept("q0302", "bad@one.example")
        await node.advance(0)
        assert notifier.sent == []
        message = await node.tracking.message("q0302")
        assert message.recipients[0].dsn_pending
        assert await node.spool.queue_ids() == ["q0302"]
        assert await node.tracking.queued_messages("node1") == ["q0302"]
        await node.advance(POLICY.first_retry)
        assert notifier.sent == [("q0302", [("bad@one.example", "failed")])]
        assert await node.spool.queue_ids() == []
        assert len(node.transport.attempts) == 1  # the recipient itself was final
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_delete_sends_no_dsn_for_its_recipients_but_still_the_one_owed_before(node):
    # One recipient failed earlier and its DSN could not be queued yet; the other is
    # deferred. Deleting fails the deferred one silently; the DSN owed before goes out.
    notifier = node.queue.notifier = RecordingNotifier()
    notifier.failures = 1
    await started(node)
    node.transport.script["bad@one.example"] = [RecipientState.FAILED]
    node.transport.script["slow@one.example"] = [RecipientState.DEFERRED]
    try:
        await node.accept("q0303", "bad@one.example", "slow@one.example")
        await node.advance(0)
        assert notifier.sent == []
        assert await node.queue.delete("q0303")
        await node.advance(0)
        assert notifier.sent == [("q0303", [("bad@one.example", "failed")])]
        assert await node.states("q0303") == [("failed", "5.1.1"), ("failed", "5.0.0")]
        assert await node.tracking.queued_messages("node1") == []
        assert await node.spool.queue_ids() == []
        assert len(node.transport.attempts) == 1
    finally:
        await node.close()


# -- faults: an error in a queue run, a damaged queue file ----------------------------------


class BrokenNotifier(RecordingNotifier):
    """Owes a DSN for every failed recipient; sending it hits a fault in this program
    (as rendering a DSN from a field it could not carry once did)."""

    def send(self, message, recipients, submit):
        raise ValueError("cannot render that field")


@pytest.fixture
def logged() -> Iterator[list[dict]]:
    """The log events emitted during the test."""
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def failures_logged(events: list[dict], queue_id: str) -> list[dict]:
    from twisted.logger import formatEvent

    return [
        e for e in events if e.get("queue_id") == queue_id and "queue run failed" in formatEvent(e)
    ]


@pytest_twisted.ensureDeferred
async def test_an_error_in_a_queue_run_holds_that_message_once_and_the_queue_goes_on(node, logged):
    # One message whose run raises must neither stop the others nor be retried in a
    # loop: it is logged once, with its traceback, and held with the error as reason.
    node.queue.notifier = BrokenNotifier()
    await started(node)
    node.transport.script["bad@one.example"] = [RecipientState.FAILED]
    try:
        await node.accept("q0401", "bad@one.example")
        await node.accept("q0402", "good@two.example")
        await node.advance(0)
        held = await node.tracking.message("q0401")
        assert held.held
        assert held.hold_reason == "internal error: ValueError: cannot render that field"
        assert await node.states("q0402") == [("relayed", "2.1.9")]
        (failure,) = failures_logged(logged, "q0401")
        assert failure["log_failure"].check(ValueError)
        # Hours later: not tried again, not logged again, still in the queue.
        for _ in range(5):
            await node.advance(POLICY.max_interval)
        assert failures_logged(logged, "q0401") == [failure]
        assert [a for a, _ in node.transport.attempts].count("q0401") == 1
        assert await node.spool.queue_ids() == ["q0401"]
        listing = await node.tracking.queue_listing("node1")
        assert [(m.queue_id, m.hold_reason) for m in listing] == [("q0401", held.hold_reason)]
        # Fixed (here: a notifier that works), the administrator releases it.
        node.queue.notifier = RecordingNotifier()
        assert await node.queue.release("q0401")
        await node.advance(0)
        assert (await node.tracking.message("q0401")).hold_reason is None
        assert node.queue.notifier.sent == [("q0401", [("bad@one.example", "failed")])]
        assert await node.spool.queue_ids() == []
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_a_transient_error_is_retried_later_not_held(node, logged):
    # A full disk or an absent database passes: one line, and a retry after first_retry.
    notifier = node.queue.notifier = RecordingNotifier()
    notifier.failures = 1  # OSError
    await started(node)
    node.transport.script["bad@one.example"] = [RecipientState.FAILED]
    try:
        await node.accept("q0403", "bad@one.example")
        await node.advance(0)
        assert not (await node.tracking.message("q0403")).held
        (line,) = failures_logged(logged, "q0403")
        assert "log_failure" not in line
        await node.advance(POLICY.first_retry)
        assert notifier.sent == [("q0403", [("bad@one.example", "failed")])]
    finally:
        await node.close()


@pytest.mark.parametrize("how", ["damaged", "missing"])
@pytest_twisted.ensureDeferred
async def test_a_damaged_queue_file_is_quarantined_and_its_recipients_fail(node, logged, how):
    # Found at the first read: moved aside with one line, the outcome recorded, the
    # sender told from the tracking record (RFC 3464: the DSN needs no content).
    # (How a FileSpool file is found damaged: test_file_spool.py; a whole node with
    # four damaged files: test_queue_cli.py.)
    notifier = node.queue.notifier = RecordingNotifier()
    await node.accept("q0501", "a@one.example", "b@two.example", enqueue=False)
    if how == "missing":
        await node.spool.remove(["q0501"])
    else:
        node.spool.damage("q0501", "checksum mismatch")
    await started(node)
    try:
        await node.advance(0)
        assert node.transport.attempts == []
        message = await node.tracking.message("q0501")
        assert [(r.state.value, r.status) for r in message.recipients] == [("failed", "5.3.0")] * 2
        assert message.recipients[0].diagnostic.startswith("x-local; the queue file was damaged")
        assert message.quarantine_reason == (
            "the queue file is missing" if how == "missing" else "q0501: checksum mismatch"
        )
        assert notifier.sent == [
            ("q0501", [("a@one.example", "failed"), ("b@two.example", "failed")])
        ]
        assert await node.spool.queue_ids() == []
        assert await node.tracking.queued_messages("node1") == []
        quarantined = [(e.queue_id, m.queue_id) for e, m in await node.queue.quarantined()]
        assert quarantined == ([] if how == "missing" else [("q0501", "q0501")])
        warnings = [e for e in logged if "queue file damaged" in e.get("log_format", "")]
        assert len(warnings) == 1
        for _ in range(3):
            await node.advance(POLICY.max_interval)
        assert failures_logged(logged, "q0501") == []
        assert len(notifier.sent) == 1
        if how == "missing":
            return
        # Still damaged, it cannot be released; repaired, it can, and is delivered.
        await node.restart()
        with pytest.raises(QueueActionRefused, match="still damaged"):
            await node.queue.release("q0501")
        node.spool.repair("q0501")
        assert await node.queue.release("q0501")
        await node.advance(0)
        assert await node.states("q0501") == [("relayed", "2.1.9")] * 2
        assert (await node.tracking.message("q0501")).quarantine_reason is None
        assert await node.queue.quarantined() == []
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_a_quarantined_file_can_be_deleted(node):
    node.queue.notifier = RecordingNotifier()
    await node.accept("q0502", "a@one.example", enqueue=False)
    node.spool.damage("q0502")
    await started(node)
    try:
        await node.advance(0)
        assert [e.queue_id for e, _ in await node.queue.quarantined()] == ["q0502"]
        assert await node.queue.delete("q0502")
        assert await node.queue.quarantined() == []
        events = await node.tracking.events("q0502")
        assert [(e.kind.value, e.recipient) for e in events] == [
            ("arrived", None),
            ("quarantined", None),
            ("failed", 0),
            ("dsn-sent", 0),
            ("deleted", None),
        ]
        assert (events[2].get("status"), events[3].get("action")) == ("5.3.0", "failed")
        assert await node.spool.drop_quarantined("q0502") is False
        # The finished record (failed, sender notified) stays for tracking until it expires.
        message = await node.tracking.message("q0502")
        assert message.recipients[0].state is RecipientState.FAILED
        assert message.quarantine_reason is None
    finally:
        await node.close()


@pytest_twisted.ensureDeferred
async def test_a_dsn_enters_the_queue_through_the_acceptor_like_any_message():
    # One way into the queue: the DSN the real notifier makes is stored, recorded
    # (untracked, from <>) and queued by the same Acceptor the listeners use.
    from mtrkmta.dsn.notifier import DsnNotifier
    from mtrkmta.receive.acceptor import Acceptor

    node = Node()
    ids = iter(f"dsn{n:04d}" for n in range(100))
    acceptor = Acceptor(
        spool=node.spool,
        tracking=node.tracking,
        new_queue_id=lambda: next(ids),
        reporting_mta="mx.example.test",
        node_id="node1",
        clock=node.clock,
    )
    notifier = DsnNotifier(
        spool=node.spool,
        new_queue_id=acceptor.new_queue_id,
        reporting_mta="mx.example.test",
        delay_warning=4 * 3600,
        clock=node.clock,
    )
    node.queue = QueueService(
        spool=node.spool,
        tracking=node.tracking,
        router=node.router,
        transports={"smtp": node.transport},
        clock=node.clock,
        node_id="node1",
        retry=POLICY,
        notifier=notifier,
        acceptor=acceptor,
    )
    await started(node)
    node.transport.script["bad@one.example"] = [RecipientState.FAILED]
    try:
        await node.accept("q0601", "bad@one.example")
        await node.advance(0)
        dsn = await node.tracking.message("dsn0000")
        assert (dsn.sender, dsn.certifier, dsn.client.listener) == ("", None, "dsn")
        assert [r.address for r in dsn.recipients] == ["sender@origin.example"]
        # Admitted to the queue at once: its attempt went to the sender's next hop.
        assert ("dsn0000", ("sender@origin.example",)) in node.transport.attempts
        assert await node.spool.queue_ids() == []
    finally:
        await node.close()
