"""MemoryTrackingStore: the tracking store in a dict, for tests driven by a clock alone.

It keeps exactly what ``SQLTrackingStore`` keeps and answers exactly as it does (the
same rows make the records, the same rule applies an outcome); the contract tests in
``tests/integration/test_tracking_contract.py`` run against both. Every call fires
before it returns: no thread, no database.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from mtrkmta.config import DEFAULT_RETENTION, MAX_RETENTION, Webhook
from mtrkmta.envelope import Envelope
from mtrkmta.tracking.events import arrival_event, dsn_event, message_event, outcome_event
from mtrkmta.tracking.interfaces import (
    Event,
    EventKind,
    ITrackingStore,
    OutboxEntry,
    RecipientUpdate,
    StoredMessage,
)
from mtrkmta.tracking.outbox import MessageFacts, entry_of, outbox_rows
from mtrkmta.tracking.store import (
    Retention,
    StoreClosedError,
    certifier_matches,
    quarantine_event,
    stored_message,
    whole_seconds,
)

R = TypeVar("R")


class DuplicateRecord(ValueError):
    """A message with this queue id is already recorded."""


@implementer(ITrackingStore)
class MemoryTrackingStore:
    """``ITrackingStore`` in memory; ``clock`` gives "now" for arrivals and expiry."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        default_retention: float = DEFAULT_RETENTION,
        max_retention: float = MAX_RETENTION,
        webhooks: Sequence[Webhook] = (),
    ) -> None:
        self._retention = Retention(default_retention, max_retention)
        self._hooks = tuple(webhooks)
        # The webhook outbox: rows as SQLTrackingStore's, by id (ids grow as a database's).
        self._outbox: dict[int, dict[str, Any]] = {}
        self._outbox_ids = itertools.count(1)
        self._clock = clock
        self._messages: dict[str, StoredMessage] = {}
        self._events: dict[str, list[Event]] = {}  # per message, in the order recorded
        self._closed = False

    # -- ITrackingStore ---------------------------------------------------------

    def record_arrival(
        self, envelope: Envelope, *, reporting_mta: str, node_id: str, size: int
    ) -> Deferred[StoredMessage]:
        if self._closed:
            return fail(StoreClosedError("tracking store is closed"))
        if envelope.queue_id in self._messages:
            return fail(DuplicateRecord(f"{envelope.queue_id} is already recorded"))
        now = self._clock.seconds()
        message_row, recipient_rows = self._retention.rows(
            envelope, reporting_mta, node_id, size, now
        )
        stored = stored_message(message_row, recipient_rows)
        self._messages[stored.queue_id] = stored
        self._events[stored.queue_id] = []
        self._record(arrival_event(message_row, len(recipient_rows), now))
        return succeed(stored)

    def known(self, queue_ids: Iterable[str]) -> Deferred[frozenset[str]]:
        return self._answer(lambda: frozenset(q for q in queue_ids if q in self._messages))

    def queued_messages(self, node_id: str) -> Deferred[list[str]]:
        return self._answer(lambda: [m.queue_id for m in self._unfinished(node_id)])

    def message(self, queue_id: str) -> Deferred[StoredMessage | None]:
        return self._answer(lambda: self._messages.get(queue_id))

    def lookup_transactions(
        self, envid: str, certifier_candidate: bytes
    ) -> Deferred[list[StoredMessage]]:
        candidate = bytes(certifier_candidate)
        return self._answer(
            lambda: _by_arrival(
                m
                for m in self._messages.values()
                if m.envid == envid
                and m.certifier is not None
                and certifier_matches(m.certifier, candidate)
            )
        )

    def record_outcomes(self, queue_id: str, updates: Sequence[RecipientUpdate]) -> Deferred[None]:
        def apply() -> None:
            message = self._messages.get(queue_id)
            if message is None:
                return
            changed = {u.index: u for u in updates}
            recipients = tuple(
                r.updated(changed[r.index]) if r.index in changed else r for r in message.recipients
            )
            self._messages[queue_id] = replace(message, recipients=recipients)
            now = self._clock.seconds()
            self._record(*(outcome_event(queue_id, u, now) for u in updates))

        return self._answer(apply)

    def clear_dsn_pending(self, queue_id: str, indices: Sequence[int]) -> Deferred[None]:
        def apply() -> None:
            message = self._messages.get(queue_id)
            if message is None:
                return
            wanted = set(indices)
            recipients = tuple(
                replace(r, dsn_pending=False) if r.index in wanted else r
                for r in message.recipients
            )
            self._messages[queue_id] = replace(message, recipients=recipients)
            now = self._clock.seconds()
            self._record(
                *(
                    dsn_event(queue_id, r.index, r.action, now)
                    for r in message.recipients
                    if r.index in wanted and r.dsn_pending
                )
            )

        return self._answer(apply)

    def set_held(self, queue_id: str, held: bool, reason: str | None = None) -> Deferred[bool]:
        now = self._clock.seconds()
        if held:
            event = message_event(queue_id, EventKind.HELD, now, reason=reason)
        else:
            event = message_event(queue_id, EventKind.RELEASED, now)
        return self._answer(
            lambda: self._change(queue_id, event, held=held, hold_reason=reason if held else None)
        )

    def set_quarantined(
        self, queue_id: str, reason: str | None, *, deleted: bool = False
    ) -> Deferred[bool]:
        event = quarantine_event(queue_id, reason, deleted, self._clock.seconds())
        return self._answer(lambda: self._change(queue_id, event, quarantine_reason=reason))

    def events(self, queue_id: str) -> Deferred[list[Event]]:
        return self._answer(
            lambda: sorted(self._events.get(queue_id, []), key=lambda event: event.time)
        )

    def transaction_events(self, queue_ids: Iterable[str]) -> Deferred[dict[str, list[Event]]]:
        return self._answer(
            lambda: {
                queue_id: sorted(self._events.get(queue_id, []), key=lambda event: event.time)
                for queue_id in queue_ids
            }
        )

    def queue_listing(self, node_id: str) -> Deferred[list[StoredMessage]]:
        return self._answer(lambda: self._unfinished(node_id))

    def forget(self, queue_ids: Iterable[str]) -> Deferred[None]:
        def apply() -> None:
            for queue_id in queue_ids:
                self._messages.pop(queue_id, None)
                self._events.pop(queue_id, None)

        return self._answer(apply)

    def expire(self, now: float | None = None) -> Deferred[int]:
        """Purge what ``SQLTrackingStore.expire`` purges: past its expiry, finished,
        and no other transaction of the same tracked message unfinished."""
        cutoff = whole_seconds(self._clock.seconds() if now is None else now)

        def purge() -> int:
            live = [m for m in self._messages.values() if m.unfinished]
            doomed = [
                m.queue_id
                for m in self._messages.values()
                if m.expires_at <= cutoff
                and not m.unfinished
                and not any(_same_tracked_message(m, other) for other in live)
            ]
            for queue_id in doomed:
                del self._messages[queue_id]
                self._events.pop(queue_id, None)
            return len(doomed)

        return self._answer(purge)

    def lower_retention(self, max_retention: float) -> Deferred[int]:
        cap = self._retention.lower(max_retention)

        def apply() -> int:
            lowered = [m for m in self._messages.values() if m.expires_at > m.arrival + cap]
            for m in lowered:
                self._messages[m.queue_id] = replace(m, expires_at=m.arrival + cap)
            return len(lowered)

        return self._answer(apply)

    def claim_webhooks(
        self, hook: str, owner: str, limit: int, lease: float
    ) -> Deferred[list[OutboxEntry]]:
        now = whole_seconds(self._clock.seconds())

        def claim() -> list[OutboxEntry]:
            due = sorted(
                (
                    row
                    for row in self._outbox.values()
                    if row["hook"] == hook
                    and row["due"] <= now
                    and (row["lease_until"] is None or row["lease_until"] <= now)
                ),
                key=lambda row: (row["due"], row["id"]),
            )[:limit]
            for row in due:
                row.update(lease_owner=owner, lease_until=now + math.ceil(lease))
            return [entry_of(row) for row in due]

        return self._answer(claim)

    def webhook_delivered(self, entry_id: int, owner: str) -> Deferred[bool]:
        def apply() -> bool:
            row = self._outbox.get(entry_id)
            if row is None or row["lease_owner"] != owner:
                return False
            del self._outbox[entry_id]
            return True

        return self._answer(apply)

    def retry_webhook(self, entry_id: int, owner: str, due: float) -> Deferred[bool]:
        def apply() -> bool:
            row = self._outbox.get(entry_id)
            if row is None or row["lease_owner"] != owner:
                return False
            row.update(
                attempts=row["attempts"] + 1,
                due=math.ceil(due),
                lease_owner=None,
                lease_until=None,
            )
            return True

        return self._answer(apply)

    def expire_webhooks(self, cutoffs: Mapping[str, float], max_entries: int) -> Deferred[int]:
        def apply() -> int:
            doomed = [
                entry_id
                for entry_id, row in self._outbox.items()
                if row["hook"] not in cutoffs or row["created"] < math.floor(cutoffs[row["hook"]])
            ]
            for entry_id in doomed:
                del self._outbox[entry_id]
            excess = sorted(self._outbox)[: max(0, len(self._outbox) - max_entries)]
            for entry_id in excess:
                del self._outbox[entry_id]
            return len(doomed) + len(excess)

        return self._answer(apply)

    def ping(self) -> Deferred[None]:
        return self._answer(lambda: None)

    def close(self) -> Deferred[None]:
        self._closed = True
        return succeed(None)

    # -- internals --------------------------------------------------------------

    def _answer(self, work: Callable[[], R]) -> Deferred[R]:
        if self._closed:
            return fail(StoreClosedError("tracking store is closed"))
        return succeed(work())

    def _change(self, queue_id: str, event: Event, **values: object) -> bool:
        message = self._messages.get(queue_id)
        if message is None:
            return False
        self._messages[queue_id] = replace(message, **values)  # type: ignore[arg-type]
        self._record(event)
        return True

    def _record(self, *events: Event) -> None:
        for event in events:
            self._events[event.queue_id].append(event)
            message = self._messages[event.queue_id]
            for row in outbox_rows([event], MessageFacts.of(message), self._hooks):
                entry_id = next(self._outbox_ids)
                self._outbox[entry_id] = {**row, "id": entry_id}

    def _unfinished(self, node_id: str) -> list[StoredMessage]:
        return _by_arrival(
            m for m in self._messages.values() if m.node_id == node_id and m.unfinished
        )


def _by_arrival(messages: Iterable[StoredMessage]) -> list[StoredMessage]:
    return sorted(messages, key=lambda m: (m.arrival, m.queue_id))


def _same_tracked_message(one: StoredMessage, other: StoredMessage) -> bool:
    """Two transactions of one tracked message: the same ENVID and certifier."""
    return (
        one.queue_id != other.queue_id
        and one.envid is not None
        and one.certifier is not None
        and one.envid == other.envid
        and one.certifier == other.certifier
    )
