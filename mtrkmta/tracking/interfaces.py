"""The tracking store interface and the records it hands out."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from twisted.internet.defer import Deferred
from zope.interface import Interface

from mtrkmta.envelope import ClientInfo, Envelope, OriginalRecipient


class RecipientState(str, enum.Enum):
    """Where one recipient stands in this MTA's queue (RFC 3886 §3.3.3)."""

    QUEUED = "queued"  # waiting for its first attempt
    # Allowed by the schema and read as in the queue, but never written: attempts in
    # flight are not persisted (after a crash their recipients are simply tried again).
    INFLIGHT = "inflight"
    DEFERRED = "deferred"  # an attempt failed temporarily; will retry
    DELIVERED = "delivered"
    TRANSFERRED = "transferred"
    RELAYED = "relayed"
    EXPANDED = "expanded"
    FAILED = "failed"

    @property
    def in_queue(self) -> bool:
        """True while the recipient still sits in our queue (RFC 3885 §3.1)."""
        return self in _IN_QUEUE


_IN_QUEUE = frozenset({RecipientState.QUEUED, RecipientState.INFLIGHT, RecipientState.DEFERRED})

QUEUED_STATES: frozenset[str] = frozenset(state.value for state in _IN_QUEUE)
"""The state values of recipients that are still in our queue."""


@dataclass(frozen=True, slots=True)
class StoredRecipient:
    """One recipient of a stored message, with its delivery state.

    Times are whole POSIX seconds (UTC); ``None`` when not known yet.
    """

    index: int  # position in RCPT order, from 0
    address: str  # RCPT address as received
    orcpt: OriginalRecipient | None
    notify: frozenset[str] | None  # as in RcptParams.notify
    final_recipient: str
    state: RecipientState
    action: str | None = None
    status: str | None = None
    remote_mta: str | None = None
    diagnostic: str | None = None
    last_attempt: int | None = None
    will_retry_until: int | None = None
    next_attempt: int | None = None
    attempts: int = 0
    certifier_forwarded: bool = False
    dsn_pending: bool = False
    dsn_passed: bool = False
    delay_warned: bool = False
    list_expansion: bool = False  # EXPANDED by a mailing list (a DSN says "delivered")

    @property
    def original(self) -> OriginalRecipient:
        """ORCPT when given, else the RCPT address as received (doc/conformance.rst 3886-P2)."""
        return self.orcpt or OriginalRecipient("rfc822", self.address)

    def updated(self, update: RecipientUpdate) -> StoredRecipient:
        """The recipient as a store holds it once ``update`` is committed: the one rule
        of ``ITrackingStore.record_outcomes`` (times in whole seconds, the attempt
        counted if asked, ``delay_warned`` and ``final_recipient`` kept when None)."""
        return replace(
            self,
            final_recipient=update.final_recipient or self.final_recipient,
            state=update.state,
            status=update.status,
            action=update.action,
            remote_mta=update.remote_mta,
            diagnostic=update.diagnostic,
            last_attempt=_whole(update.last_attempt),
            will_retry_until=_whole(update.will_retry_until),
            next_attempt=_whole(update.next_attempt),
            attempts=self.attempts + (1 if update.count_attempt else 0),
            certifier_forwarded=update.certifier_forwarded,
            dsn_pending=update.dsn_pending,
            dsn_passed=update.dsn_passed,
            delay_warned=self.delay_warned if update.delay_warned is None else update.delay_warned,
            list_expansion=update.list_expansion,
        )


def _whole(posix_time: float | None) -> int | None:
    """A time as stores keep it: the whole POSIX second containing it."""
    return None if posix_time is None else math.floor(posix_time)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One accepted message as the tracking store knows it (RFC 3885 §3.1).

    Times are whole POSIX seconds (UTC). ``certifier`` is B, the decoded MTRK
    certifier (16 or 20 octets), or None for an untracked message.
    """

    queue_id: str
    node_id: str
    envid: str | None
    certifier: bytes | None
    sender: str
    arrival: int
    requested_timeout: int | None
    expires_at: int
    reporting_mta: str
    size: int
    ret: str | None
    body: str | None
    smtputf8: bool
    auth: str | None
    client: ClientInfo
    recipients: tuple[StoredRecipient, ...]
    held: bool = False  # left out of queue runs until released
    hold_reason: str | None = None  # why: the administrator, or an error while processing it
    quarantine_reason: str | None = None  # why its spool file is in spool/quarantine/
    deliver_by: int | None = None  # the deliver-by-time of BY= (RFC 2852 §4), POSIX seconds

    @property
    def tracked(self) -> bool:
        """True when the message came with MTRK and may be answered over MTQP."""
        return self.certifier is not None

    @property
    def in_queue(self) -> bool:
        """True while any recipient is still in our queue; then it never expires."""
        return any(r.state.in_queue for r in self.recipients)

    @property
    def unfinished(self) -> bool:
        """True while the queue still owes work: a recipient queued or a DSN not sent."""
        return any(r.state.in_queue or r.dsn_pending for r in self.recipients)


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    """The new delivery state of one recipient after an attempt (or an admin action).

    Times are POSIX seconds. ``count_attempt`` adds one to the recipient's attempt
    counter (False for admin actions such as bounce). ``dsn_pending`` records, in
    the same transaction as the outcome, that a DSN is owed for it; ``delay_warned``
    None leaves that flag as it was.
    """

    index: int
    state: RecipientState
    status: str | None = None
    action: str | None = None
    remote_mta: str | None = None
    diagnostic: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None
    next_attempt: float | None = None
    certifier_forwarded: bool = False
    count_attempt: bool = True
    dsn_pending: bool = False
    dsn_passed: bool = False
    delay_warned: bool | None = None
    final_recipient: str | None = None  # a new final address (alias rewrite); None: keep
    list_expansion: bool = False  # EXPANDED by a mailing list
    # For the event the update is recorded with (not kept in the recipient's row):
    event: EventKind | None = None  # None: the kind follows the new state
    relay: str | None = None  # the next hop of the attempt, host[address]:port
    produced: tuple[str, ...] = ()  # the addresses an expansion produced
    relayed_dsn: bool = False  # a "relayed" DSN owed whatever NOTIFY says (RFC 2852 §4.1.4)


class EventKind(str, enum.Enum):
    """What an event of a message's timeline records (``ITrackingStore.events``)."""

    ARRIVED = "arrived"  # the message was accepted (message-level)
    QUEUED = "queued"  # the recipient waits again (put back from quarantine)
    DEFERRED = "deferred"  # an attempt failed temporarily; ``next_attempt`` says when again
    DELIVERED = "delivered"
    TRANSFERRED = "transferred"  # handed to an MTRK-aware next hop, which tracks it on
    RELAYED = "relayed"
    EXPANDED = "expanded"  # an alias or list: ``produced`` names the addresses
    FAILED = "failed"
    BOUNCED = "bounced"  # failed by the administrator (``mtrkmta queue bounce``)
    HELD = "held"  # message-level, with the reason
    RELEASED = "released"  # message-level: from a hold, or from quarantine
    QUARANTINED = "quarantined"  # message-level: the spool file was damaged
    DELETED = "deleted"  # by the administrator: a recipient failed without DSN, or the
    # file in quarantine (message-level)
    DSN_SENT = "dsn-sent"  # the DSN owed for the recipient was queued (``action`` says which)

    @classmethod
    def of_state(cls, state: RecipientState) -> EventKind:
        """The kind of the event that records a recipient's new ``state``."""
        if state is RecipientState.INFLIGHT:
            return cls.QUEUED
        return cls(state.value)


@dataclass(frozen=True, slots=True)
class Event:
    """One change of a message, or of one of its recipients, with its time.

    ``recipient`` is the recipient's index, None for the whole message; ``time`` is
    whole POSIX seconds (UTC); ``detail`` is a few (name, value) pairs, each value
    bounded and escaped (mtrkmta.tracking.events).
    """

    queue_id: str
    recipient: int | None
    time: int
    kind: EventKind
    detail: tuple[tuple[str, str], ...] = ()

    def get(self, name: str) -> str | None:
        """The detail value called ``name``, or None."""
        return next((value for key, value in self.detail if key == name), None)


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One event still to be POSTed to one webhook (a row of ``webhook_outbox``).

    ``body`` is the JSON sent (mtrkmta.tracking.outbox.event_body); ``created`` is the
    event's time and ``due`` when it may be sent next, whole POSIX seconds;
    ``attempts`` counts the failed attempts so far.
    """

    id: int
    hook: str
    event_id: str
    queue_id: str
    body: str
    created: int
    due: int
    attempts: int = 0


class ITrackingStore(Interface):
    """Durable record of accepted messages and of each recipient's fate.

    Every method is asynchronous and returns a Deferred; none blocks the reactor.
    The store is the authority for which messages exist: a spool file whose
    queue id the store does not know was never acknowledged.
    """

    def record_arrival(
        envelope: Envelope, *, reporting_mta: str, node_id: str, size: int
    ) -> Deferred[StoredMessage]:
        """Durably record a message that finished DATA; fires once committed, with
        the record as stored (what ``message`` would read back).

        Reply 250 only after this fires. Arrivals submitted together share one
        transaction (group commit). Fails for a queue id already recorded. An
        ``envelope.arrival`` of 0 (unset) counts as now.
        """

    def known(queue_ids: Iterable[str]) -> Deferred[frozenset[str]]:
        """The subset of ``queue_ids`` that have a record (spool reconciliation)."""

    def queued_messages(node_id: str) -> Deferred[list[str]]:
        """Queue ids of ``node_id``'s unfinished messages: a recipient still in the
        queue, or a DSN still owed. Ordered by arrival, then queue id.
        """

    def message(queue_id: str) -> Deferred[StoredMessage | None]:
        """The message with its recipients, or None when unknown."""

    def lookup_transactions(
        envid: str, certifier_candidate: bytes
    ) -> Deferred[list[StoredMessage]]:
        """Every transaction of the tracked message with exactly this ENVID whose
        certifier B matches, by arrival (RFC 3885 §3.1: one message may arrive as
        several transactions). Empty for an unknown ENVID or a wrong secret, with
        the same work done."""

    def record_outcomes(queue_id: str, updates: Sequence[RecipientUpdate]) -> Deferred[None]:
        """Durably record what happened to some recipients (group-committed), each
        with its event (kind ``update.event``, else after the new state)."""

    def clear_dsn_pending(queue_id: str, indices: Sequence[int]) -> Deferred[None]:
        """The DSNs owed for these recipients are now queued themselves."""

    def set_held(queue_id: str, held: bool, reason: str | None = None) -> Deferred[bool]:
        """Hold (recording ``reason``) or release a message; fires with False when the
        message is unknown."""

    def set_quarantined(
        queue_id: str, reason: str | None, *, deleted: bool = False
    ) -> Deferred[bool]:
        """Record why the message's spool file was moved to quarantine (None: it was
        released, or ``deleted``); fires with False when the message is unknown."""

    def events(queue_id: str) -> Deferred[list[Event]]:
        """The message's events in time order (then in the order they were recorded);
        empty for an unknown message.

        Every write above records its events in the same transaction as the change
        they describe: an arrival, each outcome (an attempt, a bounce, a quarantine),
        a hold or release, a quarantine, each DSN queued. They go with the message's
        record (``expire``, ``forget``).
        """

    def transaction_events(queue_ids: Iterable[str]) -> Deferred[dict[str, list[Event]]]:
        """``events`` of several messages in one read, keyed by queue id (a message
        without events, or unknown, has none): the transactions of one tracked message
        that ``lookup_transactions`` found, for a timeline across them."""

    def queue_listing(node_id: str) -> Deferred[list[StoredMessage]]:
        """``node_id``'s messages with a recipient still in the queue, by arrival."""

    def forget(queue_ids: Iterable[str]) -> Deferred[None]:
        """Drop the records of these messages; unknown ids are ignored."""

    def expire(now: float | None = None) -> Deferred[int]:
        """Purge messages past their expiry that are no longer queued; fires with the count.

        ``now`` defaults to the store's clock. A message with a recipient still
        in the queue is never purged (RFC 3885 §3.1).
        """

    def lower_retention(max_retention: float) -> Deferred[int]:
        """Lower the retention cap, for new and existing records (RFC 3885 §3.1, §4.1);
        fires with how many records got an earlier expiry."""

    def claim_webhooks(
        hook: str, owner: str, limit: int, lease: float
    ) -> Deferred[list[OutboxEntry]]:
        """Up to ``limit`` of ``hook``'s outbox entries that are due and not leased (or
        whose lease ran out), by due time then age, each now leased to ``owner`` for
        ``lease`` seconds: while a lease lasts, no other claim returns the entry, from
        this process or another on the same database.

        The outbox is written with the events (``events``): each write that records an
        event also records, in the same transaction, one entry per webhook the store
        was made with that wants it (``Webhook.wants``; mtrkmta.tracking.outbox).
        """

    def webhook_delivered(entry_id: int, owner: str) -> Deferred[bool]:
        """Delete a delivered (or dropped) entry still leased to ``owner``; fires with
        False when its lease passed to another owner meanwhile (nothing is changed)."""

    def retry_webhook(entry_id: int, owner: str, due: float) -> Deferred[bool]:
        """Count a failed attempt of an entry still leased to ``owner``, release the
        lease and make it due again at ``due``; False when the lease passed on."""

    def expire_webhooks(cutoffs: Mapping[str, float], max_entries: int) -> Deferred[int]:
        """Drop the entries of hooks not in ``cutoffs``, those created before their hook's
        cutoff, then the oldest beyond ``max_entries``; fires with how many went."""

    def ping() -> Deferred[None]:
        """A cheap query that proves the database answers (``/readyz``): fires with None,
        or fails with what the database (or StoreClosedError after ``close``) raised."""

    def close() -> Deferred[None]:
        """Finish pending work and release the database; later calls fail."""
