"""QueueService: schedules accepted messages, routes and delivers them, records every attempt."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from mtrkmta.address import recipient_domain
from mtrkmta.config import DEFAULT_RETENTION
from mtrkmta.delivery.interfaces import (
    Attempt,
    IRouter,
    ITransport,
    NextHop,
    RecipientOutcome,
    RouteFailure,
    Timing,
)
from mtrkmta.envelope import Envelope, Recipient
from mtrkmta.faults import IFaults, NoFaults
from mtrkmta.metrics import IMetrics, NoMetrics
from mtrkmta.queue.deliverylog import Times, delivery_fields
from mtrkmta.queue.expansion import new_envelopes, outcome_for
from mtrkmta.queue.policy import (
    Deadline,
    RetryPolicy,
    deadline_of,
    deliver_by_expired,
    update_for,
)
from mtrkmta.queue.scheduler import Scheduler
from mtrkmta.receive.acceptor import Accepted, Acceptor
from mtrkmta.routing.aliases import Deliver, Loop, Resolution
from mtrkmta.spool.interfaces import (
    ISpool,
    MessageNotFound,
    QuarantinedFile,
    SpoolCorruption,
    SpoolError,
)
from mtrkmta.tracking.interfaces import (
    EventKind,
    ITrackingStore,
    RecipientState,
    RecipientUpdate,
    StoredMessage,
    StoredRecipient,
)

log = Logger()

ADMIN_HOLD = "held by the administrator"
# A queue file that cannot be read fails its recipients: RFC 3463 §3.4, X.3.0 "other or
# undefined mail system status" (the mail system, not the message or the address).
QUARANTINE_STATUS = "5.3.0"
QUARANTINE_DIAGNOSTIC = "x-local; the queue file was damaged"
DELETED_DIAGNOSTIC = "x-local; deleted by the administrator"
BOUNCED_DIAGNOSTIC = "x-local; bounced by the administrator"


def bounced_diagnostic(previous: str | None) -> str:
    """The Diagnostic-Code of a recipient the administrator bounced: said as such, so that
    a stale reply of the last attempt is not taken for the reason, but kept after it."""
    if not previous:
        return BOUNCED_DIAGNOSTIC
    return f"{BOUNCED_DIAGNOSTIC} (last attempt: {previous})"


class QueueActionRefused(Exception):
    """An administrator's action cannot be done; the message says why."""


@dataclass(frozen=True, slots=True)
class QueueEvent:
    """Something happened to some recipients of a message (for DSNs and observers).

    ``updates`` are the recipients' new states; ``message`` is the message as it
    was before the attempt.
    """

    message: StoredMessage
    updates: tuple[RecipientUpdate, ...]


class INotifier(Interface):
    """Delivery status notifications, as the queue needs them (mtrkmta.dsn)."""

    def owed(message: StoredMessage, recipient: StoredRecipient, now: float) -> str | None:
        """The DSN Action owed for the recipient's new state, or None (pure decision)."""

    def send(
        message: StoredMessage,
        recipients: Sequence[StoredRecipient],
        submit: Callable[[Envelope, bytes], Deferred[None]],
    ) -> Deferred[None]:
        """Make the DSN(s) owed for these recipients (their current state says which)
        and hand each to ``submit``, the queue's way in; fires once they are durably
        accepted."""


def _readdressed(recipient: Recipient, address: str) -> Recipient:
    """``recipient`` sent on to ``address``; the original address stays as ORCPT (3461 §5.2.7.2)."""
    if address == recipient.address:
        return recipient
    return replace(
        recipient, address=address, params=replace(recipient.params, orcpt=recipient.original)
    )


def _rewritten(update: RecipientUpdate, final_recipient: str | None) -> RecipientUpdate:
    """``update`` with the recipient's new final address, if an alias rewrote it."""
    if final_recipient is None:
        return update
    return replace(update, final_recipient=final_recipient)


# What a cached message costs beyond its content: its Envelope and the StoredMessage of
# its record, about 2.3 KiB for one recipient by tracemalloc; each further recipient adds
# its Recipient and StoredRecipient.
ENTRY_COST = 2048
RECIPIENT_COST = 512


class ContentCache:
    """Accepted messages waiting for their first queue run, so that it needs no spool
    read and no tracking-store read.

    Each entry holds the envelope and content, and until it is taken the tracking
    record as committed at acceptance (still current: nothing but the first attempt
    or an administrator changes it, and the administrator's commands drop it). The
    first run ends the entry (later runs read the spool and the store).

    At most ``max_bytes`` are held, counting each entry's content and objects
    (:data:`ENTRY_COST`, :data:`RECIPIENT_COST`). A message that does not fit is not
    cached: the messages already here run first, and evicting them for newer ones in a
    burst would only make every run read the spool.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: dict[str, tuple[Envelope, bytes, int]] = {}
        self._records: dict[str, StoredMessage] = {}
        self._size = 0

    @property
    def size(self) -> int:
        """The bytes counted for what is held now."""
        return self._size

    def put(self, envelope: Envelope, content: bytes, record: StoredMessage | None) -> None:
        self.drop(envelope.queue_id)
        cost = len(content) + ENTRY_COST + RECIPIENT_COST * len(envelope.recipients)
        if self._size + cost > self.max_bytes:
            return
        self._items[envelope.queue_id] = (envelope, content, cost)
        if record is not None:
            self._records[envelope.queue_id] = record
        self._size += cost

    def get(self, queue_id: str) -> tuple[Envelope, bytes] | None:
        item = self._items.get(queue_id)
        return None if item is None else (item[0], item[1])

    def take_record(self, queue_id: str) -> StoredMessage | None:
        """The record committed at acceptance, once (later runs read the store)."""
        return self._records.pop(queue_id, None)

    def forget_record(self, queue_id: str) -> None:
        self._records.pop(queue_id, None)

    def drop(self, queue_id: str) -> None:
        self._records.pop(queue_id, None)
        item = self._items.pop(queue_id, None)
        if item is not None:
            self._size -= item[2]


def administrative_failures(
    message: StoredMessage, event: EventKind, diagnostic: Callable[[str | None], str]
) -> tuple[RecipientUpdate, ...]:
    """The administrator's bounce or delete: every recipient still queued fails with
    5.0.0, recorded as ``event``, with ``diagnostic`` of its last diagnostic."""
    return tuple(
        RecipientUpdate(
            index=r.index,
            state=RecipientState.FAILED,
            status="5.0.0",
            action="failed",
            remote_mta=r.remote_mta,
            diagnostic=diagnostic(r.diagnostic),
            last_attempt=r.last_attempt,
            count_attempt=False,
            event=event,
        )
        for r in message.recipients
        if r.state.in_queue
    )


class QueueService:
    """The queue manager of one node.

    Per recipient the state walks queued -> (attempt) -> delivered / transferred /
    relayed / expanded / failed, or deferred with a next-attempt time. Every
    attempt's outcome is committed to the tracking store before anything else
    happens; a message leaves the spool only when every recipient is final.
    Attempts in flight are not persisted: after a crash their recipients are
    simply still queued or deferred and are tried again (at-least-once).
    """

    def __init__(
        self,
        *,
        spool: ISpool,
        tracking: ITrackingStore,
        router: IRouter,
        transports: Mapping[str, ITransport],
        clock: IReactorTime,
        node_id: str,
        retry: RetryPolicy,
        destination_concurrency: int = 20,
        max_active_messages: int = 200,
        content_cache_bytes: int = 8 * 1024 * 1024,
        notifier: INotifier | None = None,
        expander: Callable[[str], Resolution] | None = None,
        acceptor: Acceptor | None = None,
        hostname: str = "localhost",
        default_retention: float = DEFAULT_RETENTION,
        transient_errors: tuple[type[BaseException], ...] = (OSError, SpoolError),
        faults: IFaults = NoFaults(),
        metrics: IMetrics = NoMetrics(),
    ) -> None:
        """``expander`` resolves aliases and lists of local recipients; the messages
        that carry expanded mail on, and the DSNs of ``notifier``, enter through
        ``acceptor`` (required with either), as every message does.

        A queue run that fails with one of ``transient_errors`` (a full disk, a
        database that is away) is tried again after ``retry.first_retry``; any other
        error is a fault in this program, and the message is held with the error as
        its reason, so that one message cannot stop or spin the queue.
        """
        self.spool = spool
        self.tracking = tracking
        self.router = router
        self.transports = transports
        self.clock = clock
        self.node_id = node_id
        self.retry = retry
        self.destination_concurrency = destination_concurrency
        self.observers: list[Callable[[QueueEvent], object]] = []
        self.notifier = notifier
        self.expander = expander
        self.acceptor = acceptor
        self.hostname = hostname
        self.default_retention = default_retention
        self.transient_errors = transient_errors
        self.faults = faults  # told each named step (mtrkmta.faults.POINTS)
        self._cache = ContentCache(content_cache_bytes)
        self.scheduler = Scheduler(clock, self._run, max_active_messages)
        self._semaphores: dict[str, DeferredSemaphore] = {}
        self.metrics = metrics  # told each outcome and its delays (mtrkmta.metrics)
        metrics.watch_queue(self.queue_counts)

    def queue_counts(self) -> dict[str, int]:
        """Messages in a queue run (active) and scheduled for later (waiting), from memory."""
        return {"active": self.scheduler.active, "waiting": self.scheduler.waiting}

    @property
    def max_active_messages(self) -> int:
        """At most this many messages are in a queue run at the same time."""
        return self.scheduler.max_active

    @max_active_messages.setter
    def max_active_messages(self, value: int) -> None:
        self.scheduler.max_active = value

    # -- life cycle -------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the schedule from the tracking store (crash recovery) and run."""
        self.scheduler.run()
        queued = await self.tracking.queued_messages(self.node_id)
        now = self.clock.seconds()
        for queue_id in queued:
            self.schedule(queue_id, now)
        if queued:
            log.info("queue: {n} message(s) to resume", n=len(queued))

    async def stop(self, grace: float | None = None) -> None:
        """Stop scheduling and wait for the attempts in flight to be recorded.

        With ``grace``, attempts still running after that many seconds (a next hop
        that does not answer) are cut short: every transport drops its connections,
        the recipients are recorded as deferred, and they are tried again after the
        restart.
        """
        in_progress = self.scheduler.stop()
        if not in_progress:
            return
        abort = None
        if grace is not None:
            abort = self.clock.callLater(grace, self._abort_transports, len(in_progress))
        try:
            await DeferredList(in_progress)
        finally:
            if abort is not None and abort.active():
                abort.cancel()

    def _abort_transports(self, running: int) -> None:
        log.info(
            "queue: {n} delivery attempt(s) still running at shutdown: cut short",
            n=running,
        )
        for transport in self.transports.values():
            transport.abort()

    # -- entry points -------------------------------------------------------------

    def enqueue(
        self,
        envelope: Envelope,
        content: bytes | None = None,
        record: StoredMessage | None = None,
    ) -> None:
        """A message was accepted (``record``: its tracking record as committed then):
        attempt it now."""
        if content is not None:
            self._cache.put(envelope, content, record)
        self.schedule(envelope.queue_id, self.clock.seconds())

    def admit(self, accepted: Accepted) -> None:
        """A message the acceptor took (the Receiver's ``enqueue``): attempt it now."""
        self.enqueue(accepted.envelope, accepted.content, accepted.record)

    def submit(self, envelope: Envelope, content: bytes) -> Deferred[None]:
        """Accept a message made here (a DSN, an expansion copy) and queue it."""
        assert self.acceptor is not None
        return self.acceptor.accept_content(envelope, content).addCallback(self.admit)

    def schedule(self, queue_id: str, when: float, *, force: bool = False) -> None:
        """Attempt ``queue_id`` at ``when`` (or earlier if it is already due earlier)."""
        self.scheduler.schedule(queue_id, when, force=force)

    async def flush(self, queue_id: str | None = None) -> int:
        """Attempt one message, or every queued message, now, ignoring retry times."""
        ids = (
            [queue_id]
            if queue_id is not None
            else await self.tracking.queued_messages(self.node_id)
        )
        now = self.clock.seconds()
        for each in ids:
            self.schedule(each, now, force=True)
        return len(ids)

    async def hold(self, queue_id: str, reason: str = ADMIN_HOLD) -> bool:
        """Leave the message out of queue runs until it is released."""
        self._cache.forget_record(queue_id)
        return bool(await self.tracking.set_held(queue_id, True, reason))

    async def release(self, queue_id: str) -> bool:
        """Release a held message, or put a quarantined one back into the queue."""
        if await self._is_quarantined(queue_id):
            return await self._release_quarantined(queue_id)
        released = bool(await self.tracking.set_held(queue_id, False))
        if released:
            self.schedule(queue_id, self.clock.seconds())
        return released

    async def quarantined(self) -> list[tuple[QuarantinedFile, StoredMessage | None]]:
        """The quarantined messages, each with its tracking record if there is one."""
        found = []
        for entry in await self.spool.quarantined():
            record = await self.tracking.message(entry.queue_id)
            if record is None or record.node_id == self.node_id:
                found.append((entry, record))
        return found

    async def _is_quarantined(self, queue_id: str) -> bool:
        return any(entry.queue_id == queue_id for entry in await self.spool.quarantined())

    async def _release_quarantined(self, queue_id: str) -> bool:
        """Put a quarantined file back into the queue once it reads whole again.

        Recipients that the quarantine failed are queued again (their sender was told
        they failed: releasing is the administrator's choice). A file without a
        tracking record is recorded now, as if it had just arrived.
        """
        message = await self.tracking.message(queue_id)
        if message is not None and message.node_id != self.node_id:
            return False
        try:
            envelope, content = await self.spool.unquarantine(queue_id)
        except SpoolCorruption as error:
            raise QueueActionRefused(
                f"{queue_id} is still damaged ({error}): repair the file in quarantine or delete it"
            ) from None
        if message is None:
            await self.tracking.record_arrival(
                envelope, reporting_mta=self.hostname, node_id=self.node_id, size=len(content)
            )
        else:
            again = [
                RecipientUpdate(index=r.index, state=RecipientState.QUEUED, count_attempt=False)
                for r in message.recipients
                if r.state is RecipientState.FAILED
                and (r.diagnostic or "").startswith(QUARANTINE_DIAGNOSTIC)
            ]
            await self.tracking.record_outcomes(queue_id, again)
            await self.tracking.set_quarantined(queue_id, None)
        log.info("{queue_id}: released from quarantine by the administrator", queue_id=queue_id)
        self.schedule(queue_id, self.clock.seconds())
        return True

    async def delete(self, queue_id: str) -> bool:
        """Remove a message without notifying anyone (from the queue or quarantine); its
        tracking record stays, the recipients it still had failed by the administrator."""
        await self._wait_idle(queue_id)
        if await self.spool.drop_quarantined(queue_id):
            # Its tracking record (finished, the sender notified) stays until it expires.
            await self.tracking.set_quarantined(queue_id, None, deleted=True)
            log.info("{queue_id}: deleted from quarantine by the administrator", queue_id=queue_id)
            return True
        message = await self.tracking.message(queue_id)
        if message is None or message.node_id != self.node_id:
            return False
        # The record stays, for tracking: the queued recipients fail, with no DSN, and
        # that commits before the file goes (a removal lost in a crash then leaves a
        # finished message, which start-up removes).
        updates = administrative_failures(message, EventKind.DELETED, lambda _: DELETED_DIAGNOSTIC)
        await self.tracking.record_outcomes(queue_id, updates)
        await self.spool.remove([queue_id])
        self._cache.drop(queue_id)
        self.scheduler.forget(queue_id)
        if any(r.dsn_pending for r in message.recipients):  # owed before: it still goes
            self.schedule(queue_id, self.clock.seconds())
        log.info("{queue_id}: deleted by the administrator", queue_id=queue_id)
        return True

    async def bounce(self, queue_id: str) -> bool:
        """Fail every recipient still queued (5.0.0, administrative); DSNs follow."""
        await self._wait_idle(queue_id)
        message = await self.tracking.message(queue_id)
        if message is None or message.node_id != self.node_id:
            return False
        now = self.clock.seconds()
        updates = administrative_failures(message, EventKind.BOUNCED, bounced_diagnostic)
        await self._record(message, updates, now)
        log.info("{queue_id}: bounced by the administrator", queue_id=queue_id)
        return True

    async def _wait_idle(self, queue_id: str) -> None:
        active = self.scheduler.in_progress(queue_id)
        if active is not None:
            await DeferredList([active])

    # -- one queue run of one message ---------------------------------------------------

    def _run(self, queue_id: str, force: bool) -> Deferred[None]:
        """The scheduler's start: one queue run, whose faults are handled here."""
        d = ensureDeferred(self._attempt(queue_id, force))
        d.addErrback(self._attempt_failed, queue_id)
        d.addBoth(self._run_ended, queue_id)
        return d

    def _run_ended(self, result: None, queue_id: str) -> None:
        """Whatever the run did, its cache entry is done with: later runs read the spool."""
        self._cache.drop(queue_id)
        return result

    def _attempt_failed(self, failure: Failure, queue_id: str) -> Deferred[None] | None:
        """A queue run of ``queue_id`` raised: try again later, or hold the message.

        A transient error is one log line and a retry after ``retry.first_retry``.
        Anything else is logged once, with its traceback, and the message is held
        with the error as its reason (``mtrkmta queue list`` shows it; over MTQP its
        recipients are ``delayed``) until the administrator releases it.
        """
        if not self.scheduler.running:
            log.failure("{queue_id}: queue run failed", failure, queue_id=queue_id)
            return None
        if failure.check(*self.transient_errors):
            self._retry_later(failure, queue_id, "queue run failed")
            return None
        reason = f"internal error: {type(failure.value).__name__}: {failure.getErrorMessage()}"
        log.failure(
            "{queue_id}: queue run failed; the message is held ({reason})",
            failure,
            queue_id=queue_id,
            reason=reason,
        )
        self._cache.forget_record(queue_id)
        d = self.tracking.set_held(queue_id, True, reason)
        return d.addCallbacks(
            lambda _: None, self._retry_later, errbackArgs=(queue_id, "could not be held")
        )

    def _retry_later(self, failure: Failure, queue_id: str, what: str) -> None:
        """A passing trouble: one log line, and the message tried again after
        ``retry.first_retry``."""
        log.error(
            "{queue_id}: {what}: {error}; tried again in {delay:.0f}s",
            queue_id=queue_id,
            what=what,
            error=failure.getErrorMessage(),
            delay=self.retry.first_retry,
        )
        if self.scheduler.running:
            self.schedule(queue_id, self.clock.seconds() + self.retry.first_retry)

    async def _attempt(self, queue_id: str, force: bool) -> None:
        """One queue run of one message, step by step: its record; the DSNs still
        owed; the recipients due; the content; aliases and lists; delivery per next
        hop; the outcomes recorded (which finishes or reschedules the message)."""
        taken = await self._take_record(queue_id)
        if taken is None:
            return
        message, first = taken
        after_dsns = await self._send_owed_dsns(message)
        if after_dsns is None:
            return
        message = after_dsns
        due = await self._due_recipients(message, force)
        if not due:
            return
        loaded = await self._load(message)
        if loaded is None:
            return
        envelope, content = loaded
        now = self.clock.seconds()
        deadline = deadline_of(envelope)
        if deadline is not None and deadline.returns and deadline.passed(now):
            # RFC 2852 §4.1.3: by-mode R at its deliver-by-time: no further attempt.
            outcomes: list[RecipientOutcome] = [deliver_by_expired(r.index) for r in due]
            rewritten: Mapping[int, str] = {}
        else:
            outcomes, rewritten = await self._expand(envelope, content, due, now)
        expanded = {o.index for o in outcomes}
        routed = [r.index for r in due if r.index not in expanded]
        if routed:
            current = self._readdressed(envelope, message, rewritten)
            outcomes += await self._deliver(current, content, routed, now, first=first)
        finished_at = self.clock.seconds()
        await self._record(
            message,
            self._updates(message, outcomes, rewritten, finished_at, deadline),
            finished_at,
            outcomes={o.index: o for o in outcomes},
            arrival=envelope.arrival or message.arrival,
            started=now,
        )

    async def _take_record(self, queue_id: str) -> tuple[StoredMessage, bool] | None:
        """The message's record, and whether this is the first run of a message this
        process accepted (then no earlier attempt can have delivered anything: the
        record cached at acceptance exists only until that run). None: not ours to
        run (gone, another node's, or held)."""
        accepted = self._cache.take_record(queue_id)
        message = accepted or await self.tracking.message(queue_id)
        if message is None or message.node_id != self.node_id:
            self._cache.drop(queue_id)
            return None
        if message.held:
            return None
        return message, accepted is not None

    async def _send_owed_dsns(self, message: StoredMessage) -> StoredMessage | None:
        """Queue the DSNs owed when an earlier outcome was recorded but not yet queued
        (a crash, or the DSN could not be accepted); the record as it is then."""
        owed = [r for r in message.recipients if r.dsn_pending]
        if not owed:
            return message
        await self._notify(message, owed)
        return await self.tracking.message(message.queue_id)

    async def _due_recipients(self, message: StoredMessage, force: bool) -> list[StoredRecipient]:
        """The recipients to try now (all that wait, for a forced run). With none, the
        message is finished or scheduled for its next due time here."""
        now = self.clock.seconds()
        waiting = [r for r in message.recipients if r.state.in_queue]
        due = [r for r in waiting if force or r.next_attempt is None or r.next_attempt <= now]
        if due:
            return due
        if not message.unfinished:
            await self._finish_message(message.queue_id)
        elif not waiting:
            self.schedule(message.queue_id, now + self.retry.first_retry)  # a DSN still owed
        else:
            self.schedule(message.queue_id, min(r.next_attempt or now for r in waiting))
        return []

    async def _load(self, message: StoredMessage) -> tuple[Envelope, bytes] | None:
        """The envelope and content, from the cache or the spool; None when the queue
        file cannot be read (then it is quarantined)."""
        cached = self._cache.get(message.queue_id)
        if cached is not None:
            return cached
        try:
            return await self.spool.load(message.queue_id)
        except (SpoolCorruption, MessageNotFound) as error:
            await self._quarantine(message, error)
            return None

    @staticmethod
    def _readdressed(
        envelope: Envelope, message: StoredMessage, rewritten: Mapping[int, str]
    ) -> Envelope:
        """The envelope of the attempt: recipients are routed by their final address
        (a single-target alias may have rewritten it)."""
        final = {r.index: r.final_recipient for r in message.recipients}
        final.update(rewritten)
        readdressed = tuple(
            _readdressed(rcpt, final.get(i, rcpt.address))
            for i, rcpt in enumerate(envelope.recipients)
        )
        if readdressed == envelope.recipients:
            return envelope
        return replace(envelope, recipients=readdressed)

    def _updates(
        self,
        message: StoredMessage,
        outcomes: Sequence[RecipientOutcome],
        rewritten: Mapping[int, str],
        now: float,
        deadline: Deadline | None = None,
    ) -> tuple[RecipientUpdate, ...]:
        """The outcomes as tracking updates (queue.policy: retry times, lifetime)."""
        attempts = {r.index: r.attempts for r in message.recipients}
        return tuple(
            _rewritten(
                update_for(
                    outcome,
                    attempts_before=attempts[outcome.index],
                    arrival=message.arrival,
                    now=now,
                    policy=self.retry,
                    deadline=deadline,
                ),
                rewritten.get(outcome.index),
            )
            for outcome in sorted(outcomes, key=lambda o: o.index)
        )

    async def _quarantine(self, message: StoredMessage, error: Exception) -> None:
        """The queue file cannot be read: move it to quarantine, fail the recipients
        still queued, and notify the sender from the tracking record (the content is
        lost, so the DSN returns none)."""
        problem = "the queue file is missing" if isinstance(error, MessageNotFound) else str(error)
        where = await self.spool.quarantine([message.queue_id])
        await self.tracking.set_quarantined(message.queue_id, problem)
        log.warn(
            "{queue_id}: queue file damaged ({problem}): moved to {where}; its queued "
            "recipients fail (5.3.0) and the sender is notified",
            queue_id=message.queue_id,
            problem=problem,
            where=where,
        )
        now = self.clock.seconds()
        updates = tuple(
            RecipientUpdate(
                index=r.index,
                state=RecipientState.FAILED,
                status=QUARANTINE_STATUS,
                action="failed",
                diagnostic=f"{QUARANTINE_DIAGNOSTIC} ({problem})",
                last_attempt=now,
                count_attempt=False,
            )
            for r in message.recipients
            if r.state.in_queue
        )
        await self._record(message, updates, now)

    async def _expand(
        self,
        envelope: Envelope,
        content: bytes,
        due: Sequence[StoredRecipient],
        now: float,
    ) -> tuple[list[RecipientOutcome], dict[int, str]]:
        """Resolve aliases and lists; queue the messages that carry expanded mail on.

        Returns the outcomes of the recipients that expansion settled and the new
        final address of those a single-target alias rewrote.
        """
        outcomes: list[RecipientOutcome] = []
        rewritten: dict[int, str] = {}
        if self.expander is None:
            return outcomes, rewritten
        for recipient in due:
            resolution = self.expander(recipient.final_recipient)
            if isinstance(resolution, Deliver):
                if resolution.address != recipient.final_recipient:
                    rewritten[recipient.index] = resolution.address
                continue
            if not isinstance(resolution, Loop):
                assert self.acceptor is not None
                for copy in new_envelopes(
                    envelope,
                    recipient.index,
                    resolution,
                    now=now,
                    new_queue_id=self.acceptor.new_queue_id,
                    hostname=self.hostname,
                    default_retention=self.default_retention,
                ):
                    trace = f"Delivered-To: <{recipient.final_recipient}>\r\n".encode()
                    await self.submit(copy, trace + content)
            outcomes.append(outcome_for(recipient.index, resolution))
        return outcomes, rewritten

    async def _record(
        self,
        message: StoredMessage,
        updates: Sequence[RecipientUpdate],
        now: float,
        *,
        outcomes: Mapping[int, RecipientOutcome] | None = None,
        arrival: float | None = None,
        started: float | None = None,
    ) -> None:
        """Commit the updates (marking the DSNs they owe in the same write), log one
        delivery line per recipient (``outcomes`` of the attempt begun at ``started``:
        relay and timing; ``arrival`` to the fraction of a second, the record's is
        whole seconds), tell the observers, queue the DSNs, then finish or reschedule
        the message."""
        updates = list(updates)
        owed: list[StoredRecipient] = []
        if self.notifier is not None:
            for position, update in enumerate(updates):
                recipient = message.recipients[update.index].updated(update)
                action = self.notifier.owed(message, recipient, now)
                if action is None and update.relayed_dsn:
                    action = "relayed"  # RFC 2852 §4.1.4, §4.1.4.2 (the transport decided)
                if action is not None:
                    flags: dict[str, Any] = {"dsn_pending": True}
                    if action == "delayed":
                        flags["delay_warned"] = True
                    updates[position] = replace(update, **flags)
                    owed.append(message.recipients[update.index].updated(updates[position]))
        await self.tracking.record_outcomes(message.queue_id, updates)
        self.faults.reached("queue.outcome_committed")
        times = Times(
            message.arrival if arrival is None else arrival,
            now if started is None else started,
            self.clock.seconds(),
        )
        for update in updates:
            outcome = outcomes.get(update.index) if outcomes is not None else None
            if outcome is not None and not update.state.in_queue:
                self.metrics.end_to_end_delay(update.state.value, times.recorded - times.arrival)
            fmt, fields = delivery_fields(
                message.queue_id, message.recipients[update.index], update, outcome, times
            )
            log.info(fmt, **fields)
        event = QueueEvent(message=message, updates=tuple(updates))
        for observer in list(self.observers):
            try:
                observer(event)
            except Exception:
                log.failure("{queue_id}: queue observer failed", queue_id=message.queue_id)
        changed = {u.index: u for u in updates}
        current = replace(
            message,
            recipients=tuple(
                r.updated(changed[r.index]) if r.index in changed else r for r in message.recipients
            ),
        )
        if owed:
            await self._notify(current, owed)
            current = replace(
                current,
                recipients=tuple(replace(r, dsn_pending=False) for r in current.recipients),
            )
        if not current.unfinished:
            await self._finish_message(message.queue_id)
            return
        waiting = [r.next_attempt for r in current.recipients if r.state.in_queue]
        retry_at = min(
            (when for when in waiting if when is not None), default=now + self.retry.first_retry
        )
        self.schedule(message.queue_id, retry_at)

    async def _notify(self, message: StoredMessage, recipients: Sequence[StoredRecipient]) -> None:
        """Queue the DSNs owed for ``recipients``, then clear their pending marks.

        If the DSN cannot be queued, the marks stay: the message is not finished and
        the next run tries again.
        """
        assert self.notifier is not None
        await self.notifier.send(message, recipients, self.submit)
        await self.tracking.clear_dsn_pending(message.queue_id, [r.index for r in recipients])

    async def _finish_message(self, queue_id: str) -> None:
        await self.spool.remove([queue_id])
        self.faults.reached("queue.spool_removed")
        self._cache.drop(queue_id)
        log.info("{queue_id}: removed (every recipient final)", queue_id=queue_id)

    async def _deliver(
        self,
        envelope: Envelope,
        content: bytes,
        indices: list[int],
        now: float,
        *,
        first: bool = False,
    ) -> list[RecipientOutcome]:
        """Route every due recipient, then deliver per next hop, all hops concurrently."""
        routes: dict[str, NextHop | RouteFailure] = {}
        for index in indices:
            domain = recipient_domain(envelope.recipients[index].address)
            if domain not in routes:
                routes[domain] = await self._route(envelope.queue_id, domain)
        outcomes: list[RecipientOutcome] = []
        groups: dict[tuple[object, ...], tuple[NextHop, list[int]]] = {}
        for index in indices:
            route = routes[recipient_domain(envelope.recipients[index].address)]
            if isinstance(route, RouteFailure):
                outcomes.append(
                    RecipientOutcome(index, route.state, route.status, f"x-local; {route.reason}")
                )
                self.metrics.delivery(route.state.value, "routing")
                continue
            key = (route.destination, route.tls, route.ca, route.auth)  # never mix credentials
            groups.setdefault(key, (route, []))[1].append(index)
        attempts = [
            Attempt(envelope, content, tuple(members), hop, now, first)
            for hop, members in groups.values()
        ]
        results = await DeferredList(
            [self._limited(attempt) for attempt in attempts], consumeErrors=True
        )
        for attempt, (ok, result) in zip(attempts, results, strict=True):
            if ok:
                outcomes.extend(result)
                for outcome in result:
                    self.metrics.delivery(outcome.state.value, attempt.next_hop.transport)
            else:
                # DeferredList's annotation omits it: a failed attempt's result is its Failure.
                log.failure(
                    "{queue_id}: transport failed for {dest}",
                    cast(Failure, result),
                    queue_id=envelope.queue_id,
                    dest=attempt.next_hop.destination,
                )
                outcomes.extend(
                    RecipientOutcome(i, RecipientState.DEFERRED, "4.3.0")
                    for i in attempt.recipients
                )
                for _ in attempt.recipients:
                    self.metrics.delivery("deferred", attempt.next_hop.transport)
        return sorted(outcomes, key=lambda o: o.index)

    async def _route(self, queue_id: str, domain: str) -> NextHop | RouteFailure:
        try:
            return await self.router.route(domain)
        except Exception as error:
            log.error(
                "{queue_id}: routing {domain} failed: {error}",
                queue_id=queue_id,
                domain=domain,
                error=error,
            )
            return RouteFailure(RecipientState.DEFERRED, "4.4.3", f"routing failed: {error}")

    def _limited(self, attempt: Attempt) -> Deferred[list[RecipientOutcome]]:
        destination = attempt.next_hop.destination
        semaphore = self._semaphores.get(destination)
        if semaphore is None:
            semaphore = self._semaphores[destination] = DeferredSemaphore(
                self.destination_concurrency
            )
        transport = self.transports[attempt.next_hop.transport]
        d = semaphore.run(self._timed, transport, attempt)
        d.addBoth(self._release_semaphore, destination, semaphore)
        return d

    def _timed(self, transport: ITransport, attempt: Attempt) -> Deferred[list[RecipientOutcome]]:
        """``transport.deliver(attempt)``, its outcomes timed here when the transport
        did not time them (a Maildir write: from its start to its end)."""
        started = self.clock.seconds()

        def timed(outcomes: list[RecipientOutcome]) -> list[RecipientOutcome]:
            done = self.clock.seconds()
            self.metrics.attempt_delay(attempt.next_hop.transport, done - started)
            return [
                o if o.timing is not None else replace(o, timing=Timing(started, done))
                for o in outcomes
            ]

        d: Deferred[list[RecipientOutcome]] = transport.deliver(attempt)
        return d.addCallback(timed)

    def _release_semaphore(
        self, result: Any, destination: str, semaphore: DeferredSemaphore
    ) -> Any:
        if semaphore.tokens == semaphore.limit and not semaphore.waiting:
            self._semaphores.pop(destination, None)
        return result
