"""The Acceptor's bound on messages being made durable at once (limits.max_accepting)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mtrkmta.envelope import ClientInfo, Envelope, Recipient
from mtrkmta.receive.acceptor import Accepted, Acceptor
from mtrkmta.spool.memory import MemorySpool
from mtrkmta.tracking.memory import MemoryTrackingStore


class SlowTracking:
    """A MemoryTrackingStore whose commits wait until the test releases them."""

    def __init__(self, clock: Clock) -> None:
        self.store = MemoryTrackingStore(clock)
        self.pending: list[tuple[Deferred[Any], Envelope, dict[str, Any]]] = []

    def record_arrival(self, envelope: Envelope, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((d, envelope, kwargs))
        return d

    def release(self, index: int = 0, error: Exception | None = None) -> str:
        d, envelope, kwargs = self.pending.pop(index)
        if error is not None:
            d.errback(error)
        else:
            self.store.record_arrival(envelope, **kwargs).chainDeferred(d)
        return envelope.queue_id


def acceptor(max_accepting: int) -> tuple[Acceptor, SlowTracking]:
    clock = Clock()
    tracking = SlowTracking(clock)
    ids = iter(f"Q{n}" for n in range(1, 100))
    made = Acceptor(
        spool=MemorySpool(),
        tracking=tracking,  # type: ignore[arg-type]
        new_queue_id=lambda: next(ids),
        reporting_mta="mx.example.test",
        node_id="n1",
        clock=clock,
        max_accepting=max_accepting,
    )
    return made, tracking


def accept(made: Acceptor, results: list[object]) -> Deferred[Accepted]:
    queue_id = made.new_queue_id()
    envelope = Envelope(
        queue_id=queue_id,
        sender="a@x.test",
        recipients=(Recipient("b@y.test"),),
        client=ClientInfo(address="192.0.2.1", listener="smtp"),
    )
    incoming = made.incoming(queue_id)
    incoming.write(b"Subject: x\r\n\r\nbody\r\n")
    d = made.accept(envelope, incoming)
    d.addCallbacks(lambda a: results.append(a.envelope.queue_id), results.append)
    return d


def test_at_most_max_accepting_are_on_their_way_the_others_wait_in_order():
    made, tracking = acceptor(max_accepting=2)
    results: list[object] = []
    for _ in range(5):
        accept(made, results)
    assert [e.queue_id for _, e, _ in tracking.pending] == ["Q1", "Q2"]
    assert made.waiting == 3
    assert tracking.release(1) == "Q2"  # one finishes: the first that waits starts
    assert results == ["Q2"]
    assert [e.queue_id for _, e, _ in tracking.pending] == ["Q1", "Q3"]
    while tracking.pending:
        tracking.release()
    assert results == ["Q2", "Q1", "Q3", "Q4", "Q5"]
    assert made.waiting == 0


def test_a_failed_acceptance_frees_its_place():
    made, tracking = acceptor(max_accepting=1)
    results: list[object] = []
    accept(made, results)
    accept(made, results)
    tracking.release(error=OSError("disk full"))
    assert [e.queue_id for _, e, _ in tracking.pending] == ["Q2"]
    tracking.release()
    assert results[1] == "Q2"
    assert "disk full" in str(results[0])
