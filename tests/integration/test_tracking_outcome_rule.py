"""One rule for an outcome: what ``ITrackingStore.record_outcomes`` writes is what
``StoredRecipient.updated`` says, for any update, in the SQL store and the memory store
alike (the queue relies on that rule to know the state it just committed without
reading it back)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st
from test_tracking_contract import ARRIVAL, RETENTION, envelope
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mtrkmta.tracking import migrate
from mtrkmta.tracking.interfaces import ITrackingStore, RecipientState, RecipientUpdate
from mtrkmta.tracking.memory import MemoryTrackingStore
from mtrkmta.tracking.store import SQLTrackingStore

T = TypeVar("T")


class InlineThreads:
    """A thread pool and a reactor's callFromThread that run each call at once, in the
    caller's thread: the real SQL store then answers before its Deferred is returned,
    which a Hypothesis test (synchronous) needs."""

    def callInThreadWithCallback(self, on_result: Any, func: Any, *args: Any, **kw: Any) -> None:
        try:
            result = func(*args, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)

    def callFromThread(self, func: Any, *args: Any, **kw: Any) -> None:
        func(*args, **kw)


def sql_store(directory: Path) -> SQLTrackingStore:
    url = f"sqlite:///{directory / f'{uuid.uuid4().hex}.sqlite'}"
    migrate.upgrade(url)
    threads = InlineThreads()
    clock = Clock()
    clock.advance(ARRIVAL)
    return SQLTrackingStore(threads, threads, url, clock=clock, **RETENTION)  # type: ignore[arg-type]


def fired(d: Deferred[T]) -> T:
    """The result of a Deferred that has already fired."""
    results: list[T] = []
    failures: list[Failure] = []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "the store did not answer at once"
    return results[0]


times = st.one_of(st.none(), st.floats(min_value=0, max_value=4e9, allow_nan=False))
texts = st.one_of(
    st.none(), st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
)
updates = st.builds(
    RecipientUpdate,
    index=st.just(0),
    state=st.sampled_from(RecipientState),
    status=st.one_of(st.none(), st.sampled_from(["2.1.5", "4.4.1", "5.1.1"])),
    action=st.one_of(st.none(), st.sampled_from(["delivered", "failed", "delayed"])),
    remote_mta=texts,
    diagnostic=texts,
    last_attempt=times,
    will_retry_until=times,
    next_attempt=times,
    certifier_forwarded=st.booleans(),
    count_attempt=st.booleans(),
    dsn_pending=st.booleans(),
    dsn_passed=st.booleans(),
    delay_warned=st.one_of(st.none(), st.booleans()),
    final_recipient=st.one_of(st.none(), st.just("alias-target@dest.example")),
)


def applies_the_rule(store: ITrackingStore, steps: list[RecipientUpdate]) -> None:
    queue_id = f"u{uuid.uuid4().hex[:16]}"
    arrival = envelope(queue_id, recipients=1)
    fired(store.record_arrival(arrival, reporting_mta="m", node_id="n", size=1))
    expected = fired(store.message(queue_id)).recipients[0]
    for update in steps:
        fired(store.record_outcomes(queue_id, [update]))
        expected = expected.updated(update)
        assert fired(store.message(queue_id)).recipients[0] == expected


# Two tests, not one parametrized: pytest-twisted wraps a test function in place, and a
# second parameter of a Hypothesis test would run inside the first one's wrapper.
@settings(max_examples=40)
@given(steps=st.lists(updates, min_size=1, max_size=3))
def test_the_sql_store_applies_an_outcome_by_the_one_rule(tmp_path_factory, steps):
    store = sql_store(tmp_path_factory.getbasetemp())
    try:
        applies_the_rule(store, steps)
    finally:
        fired(store.close())


@settings(max_examples=100)
@given(steps=st.lists(updates, min_size=1, max_size=3))
def test_the_memory_store_applies_an_outcome_by_the_one_rule(steps):
    clock = Clock()
    clock.advance(ARRIVAL)
    applies_the_rule(MemoryTrackingStore(clock, **RETENTION), steps)
