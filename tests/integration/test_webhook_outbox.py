"""The webhook outbox part of the ITrackingStore contract, against SQLTrackingStore (SQLite,
or PostgreSQL with ``--postgres``) and MemoryTrackingStore: entries are written with the
events they carry, claimed under a lease, delivered, retried, expired and bounded alike."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from test_tracking_contract import ARRIVAL, RETENTION, Subject, envelope, record
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool

from mtrkmta.config import Webhook
from mtrkmta.envelope import OriginalRecipient, RcptParams, Recipient
from mtrkmta.testing import database_url
from mtrkmta.tracking import migrate
from mtrkmta.tracking.interfaces import RecipientState, RecipientUpdate
from mtrkmta.tracking.memory import MemoryTrackingStore
from mtrkmta.tracking.store import SQLTrackingStore

ALL = Webhook("all", "http://127.0.0.1:9/all", Path("/nonexistent"))
FAILURES = Webhook(
    "failures",
    "http://127.0.0.1:9/failures",
    Path("/nonexistent"),
    events=frozenset({"failed", "deferred"}),
)
OTHERS = Webhook("others", "http://127.0.0.1:9/o", Path("/nonexistent"), senders=("other.example",))
HOOKS = (ALL, FAILURES, OTHERS)
LEASE = 30.0


@pytest_twisted.async_yield_fixture(params=["sql", "memory"])
async def subject(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Subject]:
    clock = Clock()
    clock.advance(ARRIVAL + 60)
    if request.param == "memory":
        memory = MemoryTrackingStore(clock, webhooks=HOOKS, **RETENTION)
        yield Subject(memory, clock)
        await memory.close()
        return
    url = database_url(tmp_path)
    migrate.upgrade(url)
    pool = ThreadPool(minthreads=1, maxthreads=2, name="webhook-outbox")
    pool.start()
    store = SQLTrackingStore(reactor, pool, url, clock=clock, webhooks=HOOKS, **RETENTION)
    try:
        yield Subject(store, clock)
        await store.close()
    finally:
        pool.stop()


async def claim_all(subject: Subject, hook: str, owner: str = "node-a", limit: int = 100):
    return await subject.store.claim_webhooks(hook, owner, limit, LEASE)


@pytest_twisted.ensureDeferred
async def test_each_event_goes_to_the_hooks_that_want_it_with_one_id(subject):
    store = subject.store
    env = envelope("w1")
    env = env.__class__(
        **{
            **{f: getattr(env, f) for f in env.__dataclass_fields__},
            "recipients": (
                Recipient("r0@dest.example", RcptParams(orcpt=OriginalRecipient("rfc822", "o@x"))),
                Recipient("r1@dest.example"),
            ),
        }
    )
    await record(store, env)
    subject.clock.advance(5)
    await store.record_outcomes(
        "w1",
        [
            RecipientUpdate(0, RecipientState.DELIVERED, "2.0.0", relay="mx[192.0.2.1]:25"),
            RecipientUpdate(1, RecipientState.FAILED, "5.1.1", diagnostic="smtp; 550 no\r\nX"),
        ],
    )
    everything = await claim_all(subject, "all")
    assert [json.loads(e.body)["kind"] for e in everything] == ["arrived", "delivered", "failed"]
    failures = await claim_all(subject, "failures")
    assert [json.loads(e.body)["kind"] for e in failures] == ["failed"]
    assert failures[0].event_id == everything[2].event_id  # one event, one id
    assert await claim_all(subject, "others") == []  # not this sender
    arrived, delivered, failed = (json.loads(e.body) for e in everything)
    assert arrived["recipient"] is None and arrived["sender"] == "s@origin.example"
    assert arrived["envid"] == "contract@origin.example"
    assert delivered["recipient"] == "o@x"  # the original recipient
    assert delivered["relay"] == "mx[192.0.2.1]:25"
    assert failed["recipient"] == "r1@dest.example"
    assert failed["diagnostic"] == "smtp; 550 no\\x{0D}\\x{0A}X"  # escaped as events are
    assert failed["time"] == "2023-11-14T22:14:25Z"
    assert {e.created for e in everything} == {ARRIVAL + 60, ARRIVAL + 65}


@pytest_twisted.ensureDeferred
async def test_holds_dsns_and_quarantine_write_entries_and_unknown_messages_none(subject):
    store = subject.store
    await record(store, envelope("w2"))
    await store.set_held("w2", True, "by the administrator")
    await store.set_held("w2", False)
    await store.record_outcomes("w2", [RecipientUpdate(0, RecipientState.FAILED, dsn_pending=True)])
    await store.clear_dsn_pending("w2", [0])
    await store.set_quarantined("w2", "damaged")
    await store.set_held("nope", True, "x")
    await store.record_outcomes("nope", [RecipientUpdate(0, RecipientState.FAILED)])
    kinds = [json.loads(e.body)["kind"] for e in await claim_all(subject, "all")]
    assert kinds == ["arrived", "held", "released", "failed", "dsn-sent", "quarantined"]


@pytest_twisted.ensureDeferred
async def test_a_lease_keeps_an_entry_from_other_claims_until_it_runs_out(subject):
    store = subject.store
    await record(store, envelope("w3"))
    first = await store.claim_webhooks("all", "node-a", 10, LEASE)
    assert len(first) == 1
    assert await store.claim_webhooks("all", "node-b", 10, LEASE) == []
    subject.clock.advance(LEASE)
    second = await store.claim_webhooks("all", "node-b", 10, LEASE)
    assert [e.event_id for e in second] == [first[0].event_id]
    assert not await store.webhook_delivered(first[0].id, "node-a")  # the lease passed on
    assert await store.webhook_delivered(second[0].id, "node-b")
    subject.clock.advance(LEASE)
    assert await store.claim_webhooks("all", "node-a", 10, LEASE) == []  # gone for good


@pytest_twisted.ensureDeferred
async def test_a_retry_counts_the_attempt_and_waits_until_it_is_due(subject):
    store = subject.store
    for n in range(3):
        await record(store, envelope(f"w4{n}"))
    claimed = await store.claim_webhooks("all", "node-a", 2, LEASE)
    assert [e.queue_id for e in claimed] == ["w40", "w41"]  # the limit
    now = subject.clock.seconds()
    assert await store.retry_webhook(claimed[0].id, "node-a", now + 9.5)
    assert not await store.retry_webhook(claimed[1].id, "node-b", now + 1)  # not its lease
    assert [e.queue_id for e in await claim_all(subject, "all", "node-c")] == ["w42"]
    subject.clock.advance(9)
    assert await claim_all(subject, "all", "node-c") == []  # due at now + 10 (rounded up)
    subject.clock.advance(1)
    again = await claim_all(subject, "all", "node-c")
    assert [(e.queue_id, e.attempts) for e in again] == [("w40", 1)]
    assert again[0].event_id == claimed[0].event_id and again[0].body == claimed[0].body


@pytest_twisted.ensureDeferred
async def test_expiry_drops_old_entries_unknown_hooks_and_the_oldest_beyond_the_bound(subject):
    store = subject.store
    await record(store, envelope("w5"))
    subject.clock.advance(100)
    for n in range(4):
        await record(store, envelope(f"w6{n}"))
    await store.record_outcomes("w60", [RecipientUpdate(0, RecipientState.FAILED)])
    now = subject.clock.seconds()
    # "failures" is no longer configured; "all" keeps what is less than 50 s old.
    dropped = await store.expire_webhooks({"all": now - 50, "others": now}, 3)
    assert dropped == 1 + 1 + 2  # w5 too old, the "failures" entry, then the 2 oldest
    left = await claim_all(subject, "all")
    assert [(e.queue_id, json.loads(e.body)["kind"]) for e in left] == [
        ("w62", "arrived"),
        ("w63", "arrived"),
        ("w60", "failed"),
    ]
    assert await store.expire_webhooks({"all": now - 50}, 3) == 0


@pytest_twisted.ensureDeferred
async def test_entries_outlive_their_message(subject):
    store = subject.store
    await record(store, envelope("w7"))
    await store.forget(["w7"])
    assert [e.queue_id for e in await claim_all(subject, "all")] == ["w7"]


@pytest_twisted.ensureDeferred
async def test_two_stores_on_one_database_claiming_at_once_never_share_an_entry(tmp_path):
    # Two nodes (two engines, two thread pools) claim the same due entries at the same
    # time: each entry goes to exactly one of them.
    url = database_url(tmp_path)
    migrate.upgrade(url)
    clock = Clock()
    clock.advance(ARRIVAL + 60)
    pools = [ThreadPool(minthreads=1, maxthreads=2, name=f"node-{n}") for n in range(2)]
    for pool in pools:
        pool.start()
    stores = [
        SQLTrackingStore(reactor, pool, url, clock=clock, webhooks=HOOKS, **RETENTION)
        for pool in pools
    ]
    try:
        for n in range(40):
            await record(stores[n % 2], envelope(f"c{n:02}"))
        claims = [
            store.claim_webhooks("all", f"node-{i}", 5, LEASE)
            for _ in range(6)
            for i, store in enumerate(stores)
        ]
        claimed = [entry.event_id for entries in await gatherResults(claims) for entry in entries]
    finally:
        for store in stores:
            await store.close()
        for pool in pools:
            pool.stop()
    assert len(claimed) == len(set(claimed)) == 40
