"""The ITrackingStore contract, run against SQLTrackingStore (a real database and thread
pool: SQLite, or PostgreSQL with ``--postgres``) and MemoryTrackingStore (the one the
clock-driven queue tests use): both must answer alike.

test_tracking_outcome_rule.py checks both against ``StoredRecipient.updated``.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from mtrkmta.config import DAY
from mtrkmta.envelope import ClientInfo, Envelope, MailParams, Mtrk, RcptParams, Recipient
from mtrkmta.faults import FaultPlan
from mtrkmta.testing import database_url
from mtrkmta.tracking import migrate
from mtrkmta.tracking.interfaces import (
    EventKind,
    ITrackingStore,
    RecipientState,
    RecipientUpdate,
)
from mtrkmta.tracking.memory import MemoryTrackingStore
from mtrkmta.tracking.store import SQLTrackingStore, StoreClosedError

ARRIVAL = 1_700_000_000
SECRET = b"contract secret"
CERTIFIER = hashlib.sha1(SECRET).digest()
RETENTION = {"default_retention": 9 * DAY, "max_retention": 30 * DAY}
T = TypeVar("T")
CLIENT = ClientInfo(address="192.0.2.7", port=4025, helo="client.example", listener="submission")


class Subject:
    def __init__(self, store: ITrackingStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock


@pytest_twisted.async_yield_fixture(params=["sql", "memory"])
async def subject(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Subject]:
    clock = Clock()
    clock.advance(ARRIVAL + 60)
    if request.param == "memory":
        memory = MemoryTrackingStore(clock, **RETENTION)
        yield Subject(memory, clock)
        await memory.close()
        return
    url = database_url(tmp_path)
    migrate.upgrade(url)
    pool = ThreadPool(minthreads=1, maxthreads=2, name="tracking-contract")
    pool.start()
    store = SQLTrackingStore(reactor, pool, url, clock=clock, **RETENTION)
    try:
        yield Subject(store, clock)
        await store.close()
    finally:
        pool.stop()


def envelope(
    queue_id: str,
    *,
    envid: str | None = "contract@origin.example",
    secret: bytes | None = SECRET,
    arrival: float = ARRIVAL,
    timeout: int | None = None,
    recipients: int = 2,
) -> Envelope:
    mtrk = None if secret is None else Mtrk(hashlib.sha1(secret).digest(), timeout)
    return Envelope(
        queue_id=queue_id,
        sender="s@origin.example",
        recipients=tuple(
            Recipient(f"r{i}@dest.example", RcptParams(notify=frozenset({"FAILURE"})))
            for i in range(recipients)
        ),
        params=MailParams(envid=envid, mtrk=mtrk),
        arrival=arrival,
        client=CLIENT,
    )


async def record(store: ITrackingStore, env: Envelope, node_id: str = "n1"):
    return await store.record_arrival(env, reporting_mta="mx.example", node_id=node_id, size=9)


async def finish(store: ITrackingStore, queue_id: str, state=RecipientState.DELIVERED) -> None:
    message = await store.message(queue_id)
    updates = [RecipientUpdate(r.index, state, "2.1.5", "delivered") for r in message.recipients]
    await store.record_outcomes(queue_id, updates)


@pytest_twisted.ensureDeferred
async def test_provides_itrackingstore(subject):
    assert verifyObject(ITrackingStore, subject.store)


@pytest_twisted.ensureDeferred
async def test_an_arrival_is_recorded_as_it_is_read_back(subject):
    store = subject.store
    stored = await record(store, envelope("k1", timeout=3 * DAY))
    assert await store.message("k1") == stored
    assert stored.expires_at == ARRIVAL + 3 * DAY
    assert [r.state for r in stored.recipients] == [RecipientState.QUEUED] * 2
    assert await store.known(["k1", "k2"]) == frozenset({"k1"})
    assert await store.message("k2") is None
    with pytest.raises(Exception):  # noqa: B017 (each store has its own error type)
        await record(store, envelope("k1"))
    unset = await record(store, envelope("k3", arrival=0))
    assert unset.arrival == ARRIVAL + 60  # 0 counts as now


@pytest_twisted.ensureDeferred
async def test_the_queue_is_the_unfinished_messages_of_a_node_by_arrival(subject):
    store = subject.store
    await record(store, envelope("q2", arrival=ARRIVAL + 2))
    await record(store, envelope("q1", arrival=ARRIVAL + 1))
    await record(store, envelope("q3"), node_id="n2")
    await record(store, envelope("q4"))
    await finish(store, "q4")
    assert await store.queued_messages("n1") == ["q1", "q2"]
    assert [m.queue_id for m in await store.queue_listing("n1")] == ["q1", "q2"]
    assert await store.queued_messages("n2") == ["q3"]
    await store.record_outcomes("q1", [RecipientUpdate(0, RecipientState.FAILED, dsn_pending=True)])
    await finish(store, "q1", RecipientState.FAILED)
    await store.record_outcomes("q1", [RecipientUpdate(0, RecipientState.FAILED, dsn_pending=True)])
    assert await store.queued_messages("n1") == ["q1", "q2"]  # a DSN still owed
    await store.clear_dsn_pending("q1", [0])
    assert await store.queued_messages("n1") == ["q2"]


@pytest_twisted.ensureDeferred
async def test_lookup_finds_every_transaction_and_only_with_the_certifier(subject):
    store = subject.store
    await record(store, envelope("t2", arrival=ARRIVAL + 5))
    await record(store, envelope("t1"))
    await record(store, envelope("t3", secret=b"another"))
    await record(store, envelope("t4", secret=None))
    found = await store.lookup_transactions("contract@origin.example", CERTIFIER)
    assert [m.queue_id for m in found] == ["t1", "t2"]
    assert await store.lookup_transactions("contract@origin.example", bytes(20)) == []
    assert await store.lookup_transactions("Contract@origin.example", CERTIFIER) == []
    assert await store.lookup_transactions("nobody@origin.example", CERTIFIER) == []


@pytest_twisted.ensureDeferred
async def test_hold_and_quarantine_reasons(subject):
    store = subject.store
    await record(store, envelope("h1"))
    assert await store.set_held("h1", True, "held by the administrator") is True
    held = await store.message("h1")
    assert (held.held, held.hold_reason) == (True, "held by the administrator")
    assert await store.set_held("h1", False) is True
    released = await store.message("h1")
    assert (released.held, released.hold_reason) == (False, None)
    assert await store.set_quarantined("h1", "checksum mismatch") is True
    assert (await store.message("h1")).quarantine_reason == "checksum mismatch"
    assert await store.set_held("h404", True) is False
    assert await store.set_quarantined("h404", None) is False


@pytest_twisted.ensureDeferred
async def test_expiry_spares_the_queued_and_their_other_transactions(subject):
    store = subject.store
    await record(store, envelope("e1", timeout=DAY))
    await record(store, envelope("e2", timeout=DAY))  # the same message, still queued
    await record(store, envelope("e3", envid="other@origin.example", timeout=DAY))
    await record(store, envelope("e4", secret=None, envid=None))
    for queue_id in ("e1", "e3", "e4"):
        await finish(store, queue_id)
    assert await store.expire(ARRIVAL + 2 * DAY) == 1  # e3
    assert await store.known(["e1", "e2", "e3", "e4"]) == frozenset({"e1", "e2", "e4"})
    await finish(store, "e2")
    subject.clock.advance(20 * DAY)
    assert await store.expire() == 3  # now from the store's clock
    assert await store.known(["e1", "e2", "e4"]) == frozenset()


@pytest_twisted.ensureDeferred
async def test_lowering_retention_applies_to_existing_records(subject):
    store = subject.store
    await record(store, envelope("l1", timeout=20 * DAY))
    await record(store, envelope("l2", timeout=DAY))
    assert await store.lower_retention(2 * DAY) == 1
    assert (await store.message("l1")).expires_at == ARRIVAL + 2 * DAY
    with pytest.raises(ValueError):
        await store.lower_retention(DAY / 2)


@pytest_twisted.ensureDeferred
async def test_forget_and_close(subject):
    store = subject.store
    await record(store, envelope("f1"))
    await store.forget(["f1", "f404"])
    assert await store.message("f1") is None
    await store.close()
    with pytest.raises(StoreClosedError):
        await store.message("f1")


@pytest_twisted.ensureDeferred
async def test_ping_answers_while_open_and_fails_once_closed(subject):
    store = subject.store
    assert await store.ping() is None
    await store.close()
    with pytest.raises(StoreClosedError):
        await store.ping()


# -- events ----------------------------------------------------------------------------


def kinds(events) -> list[tuple[str, int | None]]:
    return [(e.kind.value, e.recipient) for e in events]


@pytest_twisted.ensureDeferred
async def test_every_change_is_an_event_with_its_time_in_order(subject):
    store, clock = subject.store, subject.clock
    start = ARRIVAL + 60
    await record(store, envelope("v1"))
    clock.advance(10)
    deferred = RecipientUpdate(
        0,
        RecipientState.DEFERRED,
        "4.2.1",
        "delayed",
        remote_mta="dns; mx.dest.example",
        diagnostic="smtp; 451 4.2.1 busy",
        next_attempt=start + 310.5,
        relay="mx.dest.example[198.51.100.2]:25",
    )
    expanded = RecipientUpdate(
        1, RecipientState.EXPANDED, "2.1.5", "expanded", produced=("a@x.example", "b@x.example")
    )
    await store.record_outcomes("v1", [deferred, expanded])
    clock.advance(10)
    await store.set_held("v1", True, "held by the administrator")
    await store.set_held("v1", False)
    bounce = RecipientUpdate(
        0, RecipientState.FAILED, "5.0.0", "failed", count_attempt=False,
        event=EventKind.BOUNCED, dsn_pending=True,
    )  # fmt: skip
    await store.record_outcomes("v1", [bounce])
    clock.advance(1)
    await store.clear_dsn_pending("v1", [0, 1])  # only recipient 0 owed one
    await store.clear_dsn_pending("v1", [0])  # nothing owed any more: no event
    await store.set_quarantined("v1", "checksum mismatch")
    await store.set_quarantined("v1", None)
    await store.set_quarantined("v1", None, deleted=True)

    events = await store.events("v1")
    assert kinds(events) == [
        ("arrived", None),
        ("deferred", 0),
        ("expanded", 1),
        ("held", None),
        ("released", None),
        ("bounced", 0),
        ("dsn-sent", 0),
        ("quarantined", None),
        ("released", None),
        ("deleted", None),
    ]
    assert [e.time for e in events] == [start, *[start + 10] * 2, *[start + 20] * 3] + [
        start + 21
    ] * 4
    arrived, deferred_event, expanded_event, held, _, bounced, dsn, quarantined, *rest = events
    assert dict(arrived.detail) == {
        "listener": "submission",
        "client": "client.example [192.0.2.7]:4025",
        "protocol": "ESMTP",
        "sender": "<s@origin.example>",
        "envid": "contract@origin.example",
        "recipients": "2",
        "size": "9",
    }
    assert dict(deferred_event.detail) == {
        "status": "4.2.1",
        "relay": "mx.dest.example[198.51.100.2]:25",
        "diagnostic": "smtp; 451 4.2.1 busy",
        "next_attempt": str(start + 310),
    }
    assert expanded_event.get("produced") == "a@x.example, b@x.example"
    assert held.get("reason") == "held by the administrator"
    assert dict(bounced.detail) == {"status": "5.0.0", "by": "the administrator"}
    assert dict(dsn.detail) == {"action": "failed"}
    assert quarantined.get("reason") == "checksum mismatch"
    assert rest[0].get("source") == "quarantine"
    assert rest[1].get("by") == "the administrator"
    # The message's record says the same as its last events.
    (first, _) = (await store.message("v1")).recipients
    assert (first.state, first.dsn_pending) == (RecipientState.FAILED, False)


@pytest_twisted.ensureDeferred
async def test_events_go_with_their_message_and_never_without_one(subject):
    store, clock = subject.store, subject.clock
    await record(store, envelope("w1", envid="w1@origin.example", timeout=DAY))
    await record(store, envelope("w2", envid="w2@origin.example", timeout=DAY))
    await record(store, envelope("w3"))
    await finish(store, "w1")
    assert kinds(await store.events("w1")) == [
        ("arrived", None),
        ("delivered", 0),
        ("delivered", 1),
    ]
    # Nothing is recorded for a message that is not: no record, no event.
    await store.record_outcomes("w404", [RecipientUpdate(0, RecipientState.DELIVERED, "2.0.0")])
    assert await store.set_held("w404", True, "no such message") is False
    await store.clear_dsn_pending("w404", [0])
    assert await store.events("w404") == []
    # Expiry and forget take the events with the record.
    clock.advance(2 * DAY)
    assert await store.expire() == 1  # w1 (w2 still queued)
    assert await store.events("w1") == []
    assert kinds(await store.events("w2")) == [("arrived", None)]
    await store.forget(["w2"])
    assert await store.events("w2") == []
    assert kinds(await store.events("w3")) == [("arrived", None)]


@pytest_twisted.ensureDeferred
async def test_an_outcome_that_fails_to_commit_records_no_event(tmp_path):
    # The event commits with the outcome it describes, in one transaction: an outcome
    # write that fails (here: EIO before its COMMIT) leaves neither.
    url = database_url(tmp_path)
    migrate.upgrade(url)
    pool = ThreadPool(minthreads=1, maxthreads=2, name="tracking-contract")
    pool.start()
    clock = Clock()
    clock.advance(ARRIVAL + 60)
    faults = FaultPlan("tracking.write", "eio", hit=2)  # the write after the arrival
    store = SQLTrackingStore(reactor, pool, url, clock=clock, faults=faults, **RETENTION)
    try:
        await record(store, envelope("x1"))
        update = RecipientUpdate(0, RecipientState.DELIVERED, "2.0.0", "delivered")
        with pytest.raises(OSError):
            await store.record_outcomes("x1", [update])
        assert kinds(await store.events("x1")) == [("arrived", None)]
        assert (await store.message("x1")).recipients[0].state is RecipientState.QUEUED
        await store.record_outcomes("x1", [update])  # the fault acts once
        assert kinds(await store.events("x1")) == [("arrived", None), ("delivered", 0)]
        await store.close()
    finally:
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_the_events_of_a_message_s_transactions_in_one_read(subject):
    # RFC 3885 §3.1: one message may arrive as several transactions; a timeline reads
    # the events of all that lookup_transactions found.
    store, clock = subject.store, subject.clock
    await record(store, envelope("y1"))
    clock.advance(5)
    await record(store, envelope("y2"))
    await store.set_held("y1", True, "held by the administrator")
    found = await store.lookup_transactions("contract@origin.example", CERTIFIER)
    events = await store.transaction_events([m.queue_id for m in found] + ["y404"])
    assert {q: kinds(e) for q, e in events.items()} == {
        "y1": [("arrived", None), ("held", None)],
        "y2": [("arrived", None)],
        "y404": [],
    }
    assert events["y1"] == await store.events("y1")
    assert events["y1"][1].time == ARRIVAL + 65
