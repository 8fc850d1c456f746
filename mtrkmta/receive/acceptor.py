"""The Acceptor: the one way into the queue (Postfix's cleanup): spool, then tracking record.

Every message enters through it: SMTP, submission and LMTP sessions (through the
``Receiver``), the DSNs the queue owes and the messages that carry alias and list
expansion on. It stores the message in the spool (fsync'd file and directory), then
commits its tracking record; the tracking store is the authority, so a crash between
the two leaves an orphan spool file that start-up moves to quarantine/, never an
acknowledged message without its record. Both steps are group-committed. What it
accepted it hands back (``Accepted``); the caller gives it to the queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtrkmta.envelope import ClientInfo, Envelope
from mtrkmta.metrics import IMetrics, NoMetrics
from mtrkmta.spool.interfaces import IIncoming, ISpool
from mtrkmta.tracking.interfaces import ITrackingStore, StoredMessage

log = Logger()

T = TypeVar("T")


class TrackedRate:
    """At most ``limit`` tracked messages per client in any hour (0: no limit)."""

    def __init__(self, limit: int, clock: IReactorTime) -> None:
        self.limit = limit
        self.clock = clock
        self._seen: dict[str, deque[float]] = {}

    @staticmethod
    def key(client: ClientInfo) -> str:
        """The authenticated user, else the client address."""
        return client.authenticated_as or client.address or "local"

    def allow(self, client: ClientInfo) -> bool:
        if self.limit <= 0:
            return True
        now = self.clock.seconds()
        times = self._seen.setdefault(self.key(client), deque())
        while times and times[0] <= now - 3600:
            times.popleft()
        if len(times) >= self.limit:
            return False
        times.append(now)
        if len(self._seen) > 100_000:  # bound the memory: forget clients quiet for an hour
            self._seen = {k: v for k, v in self._seen.items() if v and v[-1] > now - 3600}
        return True


@dataclass(frozen=True, slots=True)
class Accepted:
    """A message durably accepted: its envelope as stored, its content when it was small
    enough to be held in memory (else None), and its tracking record as committed."""

    envelope: Envelope
    content: bytes | None
    record: StoredMessage


@dataclass(kw_only=True)
class Acceptor:
    """Durable acceptance for one node: spool first, tracking record second.

    ``max_tracked_per_hour`` caps the tracked messages kept per client (0: no cap).

    At most ``max_accepting`` messages are on their way through the spool's and the
    tracking store's group commits at once; the others wait their turn, in order,
    holding only what their sessions hold already. A burst of final dots (20,000 slow
    sessions ending together, bench/ (f)) then costs the objects of that many
    acceptances instead of one set per session (about 4 KiB each, 30 MiB in (f)).
    """

    spool: ISpool
    tracking: ITrackingStore
    new_queue_id: Callable[[], str]
    reporting_mta: str
    node_id: str
    clock: IReactorTime
    max_tracked_per_hour: int = 0
    metrics: IMetrics = field(default_factory=NoMetrics)  # told each message accepted
    max_accepting: int = 256  # limits.max_accepting
    _tracked: TrackedRate = field(init=False, repr=False)
    _accepting: int = field(default=0, init=False, repr=False)
    _waiting: deque[tuple[Envelope, IIncoming, Deferred[Accepted]]] = field(
        default_factory=deque, init=False, repr=False
    )

    def __post_init__(self) -> None:
        self._tracked = TrackedRate(self.max_tracked_per_hour, self.clock)

    def incoming(self, queue_id: str) -> IIncoming:
        """The spool's stream for the content of ``queue_id`` (bounded memory)."""
        return self.spool.incoming(queue_id)

    def accept_content(self, envelope: Envelope, content: bytes) -> Deferred[Accepted]:
        """``accept`` for a message made here whole (a DSN, an expansion copy)."""
        incoming = self.spool.incoming(envelope.queue_id)
        wait = incoming.write(content)
        if wait is None:
            return self.accept(envelope, incoming)
        return wait.addCallback(lambda _: self.accept(envelope, incoming))

    def accept(self, envelope: Envelope, content: IIncoming) -> Deferred[Accepted]:
        """Store the message, then record it; fires once both are durable."""
        if self._accepting >= self.max_accepting:
            waiter: Deferred[Accepted] = Deferred()
            self._waiting.append((envelope, content, waiter))
            return waiter
        return self._start(envelope, content)

    @property
    def waiting(self) -> int:
        """How many messages wait for their turn to be made durable."""
        return len(self._waiting)

    def _start(self, envelope: Envelope, content: IIncoming) -> Deferred[Accepted]:
        self._accepting += 1
        return maybeDeferred(self._store, envelope, content).addBoth(self._finished)

    def _finished(self, result: T) -> T:
        self._accepting -= 1
        if self._waiting:
            envelope, content, waiter = self._waiting.popleft()
            self._start(envelope, content).chainDeferred(waiter)
        return result

    def _store(self, envelope: Envelope, content: IIncoming) -> Deferred[Accepted]:
        if envelope.params.mtrk is not None and not self._tracked.allow(envelope.client):
            # RFC 3885 §4.1, doc/conformance.rst 3885-P8: over the client's quota the mail is
            # accepted, but no tracking data is kept for it (and no certifier goes on).
            log.warn(
                "{queue_id}: tracked-message quota of {client} exceeded: MTRK not retained",
                queue_id=envelope.queue_id,
                client=TrackedRate.key(envelope.client),
            )
            envelope = replace(envelope, params=replace(envelope.params, mtrk=None))
        size = content.size

        def committed(held: bytes | None) -> Deferred[Accepted]:
            d = self.tracking.record_arrival(
                envelope, reporting_mta=self.reporting_mta, node_id=self.node_id, size=size
            )
            return d.addCallback(self._accepted, envelope, held)

        return content.commit(envelope).addCallback(committed)

    def _accepted(
        self, record: StoredMessage, envelope: Envelope, content: bytes | None
    ) -> Accepted:
        self.metrics.accepted(envelope.client.listener)
        log.info(
            "{queue_id}: accepted from=<{sender}> nrcpt={n} via {listener} client=[{client}]",
            queue_id=envelope.queue_id,
            sender=envelope.sender,
            n=len(envelope.recipients),
            listener=envelope.client.listener,
            client=envelope.client.address,
        )
        return Accepted(envelope, content, record)
