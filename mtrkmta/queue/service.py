"""QueueService: schedules accepted messages, routes and delivers them, records every attempt."""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from mtrkmta.delivery.interfaces import (
    Attempt,
    IRouter,
    ITransport,
    NextHop,
    RecipientOutcome,
    RouteFailure,
)
from mtrkmta.envelope import Envelope, Recipient
from mtrkmta.faults import IFaults, NoFaults
from mtrkmta.queue.expansion import new_envelopes, outcome_for
from mtrkmta.queue.policy import RetryPolicy, update_for
from mtrkmta.receive.policy import recipient_domain
from mtrkmta.routing.aliases import Deliver, Loop, Resolution
from mtrkmta.spool.interfaces import ISpool
from mtrkmta.tracking.interfaces import (
    ITrackingStore,
    RecipientState,
    RecipientUpdate,
    StoredMessage,
    StoredRecipient,
)

log = Logger()


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

    def send(message: StoredMessage, recipients: Sequence[StoredRecipient]) -> Deferred[None]:
        """Queue the DSN(s) owed for these recipients (their current state says which);
        fires once they are durably accepted."""


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


def after(recipient: StoredRecipient, update: RecipientUpdate) -> StoredRecipient:
    """The recipient as the tracking store holds it once ``update`` is committed."""
    return replace(
        recipient,
        final_recipient=update.final_recipient or recipient.final_recipient,
        state=update.state,
        status=update.status,
        action=update.action,
        remote_mta=update.remote_mta,
        diagnostic=update.diagnostic,
        last_attempt=None if update.last_attempt is None else int(update.last_attempt),
        will_retry_until=(
            None if update.will_retry_until is None else int(update.will_retry_until)
        ),
        next_attempt=None if update.next_attempt is None else int(update.next_attempt),
        attempts=recipient.attempts + (1 if update.count_attempt else 0),
        certifier_forwarded=update.certifier_forwarded,
        dsn_pending=update.dsn_pending,
        dsn_passed=update.dsn_passed,
        delay_warned=(
            recipient.delay_warned if update.delay_warned is None else update.delay_warned
        ),
    )


class ContentCache:
    """Recently accepted messages, so that their first attempt needs no spool read and
    no tracking-store read.

    Each entry holds the envelope and content, and until it is taken the tracking
    record as committed at acceptance (still current: nothing but the first attempt
    or an administrator changes it, and the administrator's commands drop it).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[Envelope, bytes]] = OrderedDict()
        self._records: dict[str, StoredMessage] = {}
        self._size = 0

    def put(self, envelope: Envelope, content: bytes, record: StoredMessage | None) -> None:
        if len(content) > self.max_bytes:
            return
        self.drop(envelope.queue_id)
        self._items[envelope.queue_id] = (envelope, content)
        if record is not None:
            self._records[envelope.queue_id] = record
        self._size += len(content)
        while self._size > self.max_bytes:
            queue_id, (_, dropped) = self._items.popitem(last=False)
            self._records.pop(queue_id, None)
            self._size -= len(dropped)

    def get(self, queue_id: str) -> tuple[Envelope, bytes] | None:
        return self._items.get(queue_id)

    def take_record(self, queue_id: str) -> StoredMessage | None:
        """The record committed at acceptance, once (later runs read the store)."""
        return self._records.pop(queue_id, None)

    def forget_record(self, queue_id: str) -> None:
        self._records.pop(queue_id, None)

    def drop(self, queue_id: str) -> None:
        self._records.pop(queue_id, None)
        item = self._items.pop(queue_id, None)
        if item is not None:
            self._size -= len(item[1])


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
        content_cache_bytes: int = 32 * 1024 * 1024,
        notifier: INotifier | None = None,
        expander: Callable[[str], Resolution] | None = None,
        inject: Callable[[Envelope, bytes], Deferred[None]] | None = None,
        new_queue_id: Callable[[], str] | None = None,
        hostname: str = "localhost",
        default_retention: float = 9 * 86400.0,
        faults: IFaults = NoFaults(),
    ) -> None:
        """``expander`` resolves aliases and lists of local recipients; the messages
        that carry expanded mail on are durably accepted with ``inject`` under ids
        from ``new_queue_id`` (both required with an expander)."""
        self.spool = spool
        self.tracking = tracking
        self.router = router
        self.transports = transports
        self.clock = clock
        self.node_id = node_id
        self.retry = retry
        self.destination_concurrency = destination_concurrency
        self.max_active_messages = max_active_messages
        self.observers: list[Callable[[QueueEvent], object]] = []
        self.notifier = notifier
        self.expander = expander
        self.inject = inject
        self.new_queue_id = new_queue_id
        self.hostname = hostname
        self.default_retention = default_retention
        self.faults = faults  # told each named step (mtrkmta.faults.POINTS)
        self._cache = ContentCache(content_cache_bytes)
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}
        self._sequence = itertools.count()
        self._timer: IDelayedCall | None = None
        self._active: dict[str, Deferred[None]] = {}
        self._forced: set[str] = set()
        self._again: dict[str, float] = {}  # asked for while an attempt ran: when
        self._semaphores: dict[str, DeferredSemaphore] = {}
        self._running = False

    # -- life cycle -------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the schedule from the tracking store (crash recovery) and run."""
        self._running = True
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
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._active:
            return
        abort = None
        if grace is not None:
            abort = self.clock.callLater(grace, self._abort_transports)
        try:
            await DeferredList(list(self._active.values()))
        finally:
            if abort is not None and abort.active():
                abort.cancel()

    def _abort_transports(self) -> None:
        log.info(
            "queue: {n} delivery attempt(s) still running at shutdown: cut short",
            n=len(self._active),
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

    def schedule(self, queue_id: str, when: float, *, force: bool = False) -> None:
        """Attempt ``queue_id`` at ``when`` (or earlier if it is already due earlier)."""
        if force:
            self._forced.add(queue_id)
        if queue_id in self._active:
            # Remember when it was asked for: a retry time set by the running attempt
            # itself must not turn into an immediate new run (that would spin until the
            # retry is due).
            self._again[queue_id] = min(when, self._again.get(queue_id, when))
            return
        current = self._due.get(queue_id)
        if current is not None and current <= when:
            return
        self._due[queue_id] = when
        heapq.heappush(self._heap, (when, next(self._sequence), queue_id))
        self._arm()

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

    async def hold(self, queue_id: str) -> bool:
        self._cache.forget_record(queue_id)
        return bool(await self.tracking.set_held(queue_id, True))

    async def release(self, queue_id: str) -> bool:
        released = bool(await self.tracking.set_held(queue_id, False))
        if released:
            self.schedule(queue_id, self.clock.seconds())
        return released

    async def delete(self, queue_id: str) -> bool:
        """Remove a message without notifying anyone."""
        await self._wait_idle(queue_id)
        message = await self.tracking.message(queue_id)
        if message is None or message.node_id != self.node_id:
            return False
        await self.spool.remove([queue_id])
        await self.tracking.forget([queue_id])
        self._cache.drop(queue_id)
        self._due.pop(queue_id, None)
        log.info("{queue_id}: deleted by the administrator", queue_id=queue_id)
        return True

    async def bounce(self, queue_id: str) -> bool:
        """Fail every recipient still queued (5.0.0, administrative); DSNs follow."""
        await self._wait_idle(queue_id)
        message = await self.tracking.message(queue_id)
        if message is None or message.node_id != self.node_id:
            return False
        now = self.clock.seconds()
        updates = tuple(
            RecipientUpdate(
                index=r.index,
                state=RecipientState.FAILED,
                status="5.0.0",
                action="failed",
                remote_mta=r.remote_mta,
                diagnostic=r.diagnostic,
                last_attempt=r.last_attempt,
                count_attempt=False,
            )
            for r in message.recipients
            if r.state.in_queue
        )
        await self._record(message, updates, now)
        log.info("{queue_id}: bounced by the administrator", queue_id=queue_id)
        return True

    async def _wait_idle(self, queue_id: str) -> None:
        active = self._active.get(queue_id)
        if active is not None:
            await DeferredList([active])

    # -- scheduling -----------------------------------------------------------------

    def _arm(self) -> None:
        if not self._running or len(self._active) >= self.max_active_messages:
            # Full: a finishing attempt re-arms (_finished). A timer now would find
            # nothing to start and re-arm itself at once, spinning the reactor.
            return
        while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # stale entry: rescheduled or already taken
        if not self._heap:
            return
        delay = max(0.0, self._heap[0][0] - self.clock.seconds())
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        while self._heap and len(self._active) < self.max_active_messages:
            when, _, queue_id = self._heap[0]
            if self._due.get(queue_id) != when:
                heapq.heappop(self._heap)
                continue
            if when > now:
                break
            heapq.heappop(self._heap)
            del self._due[queue_id]
            self._start(queue_id)
        self._arm()

    def _start(self, queue_id: str) -> None:
        force = queue_id in self._forced
        self._forced.discard(queue_id)
        d = ensureDeferred(self._attempt(queue_id, force))
        self._active[queue_id] = d
        d.addErrback(self._attempt_failed, queue_id)
        d.addBoth(self._finished, queue_id)

    def _attempt_failed(self, failure: Failure, queue_id: str) -> None:
        log.failure("{queue_id}: queue run failed", failure, queue_id=queue_id)
        if self._running:
            self.schedule(queue_id, self.clock.seconds() + self.retry.first_retry)

    def _finished(self, _: object, queue_id: str) -> None:
        del self._active[queue_id]
        again = self._again.pop(queue_id, None)
        if again is not None and self._running:
            self.schedule(queue_id, again)
        self._arm()
        if self._heap and self._timer is None:
            self._wake()

    # -- one queue run of one message ---------------------------------------------------

    async def _attempt(self, queue_id: str, force: bool) -> None:
        accepted = self._cache.take_record(queue_id)
        # The record cached at acceptance exists only until the first run of a message
        # this process accepted: then no earlier attempt can have delivered anything.
        first = accepted is not None
        message = accepted or await self.tracking.message(queue_id)
        if message is None or message.node_id != self.node_id:
            self._cache.drop(queue_id)
            return
        if message.held:
            return
        now = self.clock.seconds()
        owed = [r for r in message.recipients if r.dsn_pending]
        if owed:
            # A DSN was owed when the last outcome was recorded, but not yet queued
            # (a crash, or the DSN could not be accepted): send it now.
            await self._notify(message, owed)
            message = await self.tracking.message(queue_id)
            if message is None:
                return
        waiting = [r for r in message.recipients if r.state.in_queue]
        due = [r for r in waiting if force or r.next_attempt is None or r.next_attempt <= now]
        if not message.unfinished:
            await self._finish_message(queue_id)
            return
        if not waiting:
            self.schedule(queue_id, now + self.retry.first_retry)  # the DSN is still owed
            return
        if not due:
            self.schedule(queue_id, min(r.next_attempt or now for r in waiting))
            return
        cached = self._cache.get(queue_id)
        envelope, content = cached if cached is not None else await self.spool.load(queue_id)
        # Recipients are routed by their final address (a single-target alias may
        # have rewritten it); the envelope of the attempt carries those addresses.
        final = {r.index: r.final_recipient for r in message.recipients}
        outcomes, rewritten = await self._expand(envelope, content, due, now)
        final.update(rewritten)
        readdressed = tuple(
            _readdressed(rcpt, final.get(i, rcpt.address))
            for i, rcpt in enumerate(envelope.recipients)
        )
        current = (
            envelope
            if readdressed == envelope.recipients
            else replace(envelope, recipients=readdressed)
        )
        expanded = {o.index for o in outcomes}
        routed = [r.index for r in due if r.index not in expanded]
        if routed:
            outcomes += await self._deliver(current, content, routed, now, first=first)
        attempts = {r.index: r.attempts for r in message.recipients}
        finished_at = self.clock.seconds()
        updates = tuple(
            _rewritten(
                update_for(
                    outcome,
                    attempts_before=attempts[outcome.index],
                    arrival=message.arrival,
                    now=finished_at,
                    policy=self.retry,
                ),
                rewritten.get(outcome.index),
            )
            for outcome in sorted(outcomes, key=lambda o: o.index)
        )
        await self._record(message, updates, finished_at)

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
                assert self.inject is not None and self.new_queue_id is not None
                for copy in new_envelopes(
                    envelope,
                    recipient.index,
                    resolution,
                    now=now,
                    new_queue_id=self.new_queue_id,
                    hostname=self.hostname,
                    default_retention=self.default_retention,
                ):
                    trace = f"Delivered-To: <{recipient.final_recipient}>\r\n".encode()
                    await self.inject(copy, trace + content)
            outcomes.append(outcome_for(recipient.index, resolution))
        return outcomes, rewritten

    async def _record(
        self, message: StoredMessage, updates: Sequence[RecipientUpdate], now: float
    ) -> None:
        """Commit the updates (marking the DSNs they owe in the same write), tell the
        observers, queue the DSNs, then finish or reschedule the message."""
        updates = list(updates)
        owed: list[StoredRecipient] = []
        if self.notifier is not None:
            for position, update in enumerate(updates):
                recipient = after(message.recipients[update.index], update)
                action = self.notifier.owed(message, recipient, now)
                if action is not None:
                    flags: dict[str, Any] = {"dsn_pending": True}
                    if action == "delayed":
                        flags["delay_warned"] = True
                    updates[position] = replace(update, **flags)
                    owed.append(after(message.recipients[update.index], updates[position]))
        await self.tracking.record_outcomes(message.queue_id, updates)
        self.faults.reached("queue.outcome_committed")
        for update in updates:
            recipient = message.recipients[update.index]
            log.info(
                "{queue_id}: to=<{to}> action={action} status={status} {diagnostic}",
                queue_id=message.queue_id,
                to=recipient.address,
                action=update.action,
                status=update.status,
                diagnostic=update.diagnostic or "",
            )
        event = QueueEvent(message=message, updates=tuple(updates))
        for observer in list(self.observers):
            try:
                observer(event)
            except Exception:
                log.failure("queue observer failed")
        changed = {u.index: u for u in updates}
        current = replace(
            message,
            recipients=tuple(
                after(r, changed[r.index]) if r.index in changed else r for r in message.recipients
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
        await self.notifier.send(message, recipients)
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
                routes[domain] = await self._route(domain)
        outcomes: list[RecipientOutcome] = []
        groups: dict[str, tuple[NextHop, list[int]]] = {}
        for index in indices:
            route = routes[recipient_domain(envelope.recipients[index].address)]
            if isinstance(route, RouteFailure):
                outcomes.append(
                    RecipientOutcome(index, route.state, route.status, f"x-local; {route.reason}")
                )
                continue
            groups.setdefault(route.destination, (route, []))[1].append(index)
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
            else:
                log.failure(
                    "transport failed for {dest}", result, dest=attempt.next_hop.destination
                )
                outcomes.extend(
                    RecipientOutcome(i, RecipientState.DEFERRED, "4.3.0")
                    for i in attempt.recipients
                )
        return sorted(outcomes, key=lambda o: o.index)

    async def _route(self, domain: str) -> NextHop | RouteFailure:
        try:
            return await self.router.route(domain)
        except Exception as error:
            log.error("routing {domain} failed: {error}", domain=domain, error=error)
            return RouteFailure(RecipientState.DEFERRED, "4.4.3", f"routing failed: {error}")

    def _limited(self, attempt: Attempt) -> Deferred[list[RecipientOutcome]]:
        destination = attempt.next_hop.destination
        semaphore = self._semaphores.get(destination)
        if semaphore is None:
            semaphore = self._semaphores[destination] = DeferredSemaphore(
                self.destination_concurrency
            )
        transport = self.transports[attempt.next_hop.transport]
        d = semaphore.run(transport.deliver, attempt)
        d.addBoth(self._release_semaphore, destination, semaphore)
        return d

    def _release_semaphore(
        self, result: Any, destination: str, semaphore: DeferredSemaphore
    ) -> Any:
        if semaphore.tokens == semaphore.limit and not semaphore.waiting:
            self._semaphores.pop(destination, None)
        return result
