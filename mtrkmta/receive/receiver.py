"""The Receiver: relay policy, the free-space floor, and durable acceptance (spool + tracking)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import replace

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from mtrkmta.envelope import ClientInfo, Envelope, MailParams, RcptParams
from mtrkmta.receive.policy import NO_DOMAIN, RelayPolicy, recipient_domain
from mtrkmta.smtp.reply import Reply
from mtrkmta.smtp.server import ContentSink, IReceiver, Session
from mtrkmta.spool.interfaces import IIncoming, ISpool
from mtrkmta.tracking.interfaces import ITrackingStore, StoredMessage

log = Logger()

DISK_FULL = Reply(452, "4.3.1", ("Insufficient system storage; try again later",))


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


@implementer(IReceiver)
class Receiver:
    """Policy and acceptance shared by every listener of one node.

    ``accept`` stores the message in the spool (fsync'd file and directory), then
    commits its tracking record; the tracking store is the authority, so a crash
    between the two leaves an orphan spool file that start-up moves to quarantine/,
    never an acknowledged message without its record. Both steps are group-committed.
    """

    def __init__(
        self,
        *,
        spool: ISpool,
        tracking: ITrackingStore,
        policy: RelayPolicy,
        new_queue_id: Callable[[], str],
        reporting_mta: str,
        node_id: str,
        min_free_space: int,
        clock: IReactorTime,
        on_accepted: Callable[[Envelope, bytes | None, StoredMessage], object] | None = None,
        free_space_interval: float = 5.0,
        check_local: Callable[[str], Reply | None] | None = None,
        max_tracked_per_hour: int = 0,
        check_route: Callable[[str], Reply | None] | None = None,
    ) -> None:
        """``check_local`` refuses unknown local users at RCPT (None: everyone exists);
        ``max_tracked_per_hour`` caps the tracked messages kept per client (0: no cap);
        ``check_route`` refuses at RCPT a recipient whose delivery is already known to
        fail (the router's decision, see ``route_refusal``; None: no such check)."""
        self.spool = spool
        self.tracking = tracking
        self.policy = policy
        self._new_queue_id = new_queue_id
        self.reporting_mta = reporting_mta
        self.node_id = node_id
        self.min_free_space = min_free_space
        self.on_accepted = on_accepted
        self.check_local = check_local
        self.check_route = check_route
        self._tracked = TrackedRate(max_tracked_per_hour, clock)
        self._free_space: int | None = None
        self._monitor = LoopingCall(self._measure_free_space)
        self._monitor.clock = clock
        self._interval = free_space_interval

    # -- free-space floor ------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Start watching free space; fires after the first measurement."""
        self._monitor.start(self._interval, now=False)
        return self._measure_free_space()

    def stop(self) -> None:
        if self._monitor.running:
            self._monitor.stop()

    def _measure_free_space(self) -> Deferred[None]:
        def measured(free: int) -> None:
            was_full = self.disk_full
            self._free_space = free
            if self.disk_full and not was_full:
                log.warn(
                    "spool free space {free} below floor {floor}: refusing mail",
                    free=free,
                    floor=self.min_free_space,
                )
            elif was_full and not self.disk_full:
                log.info("spool free space back to {free}: accepting mail", free=free)

        def failed(failure: object) -> None:
            log.error("cannot measure spool free space: {f}", f=failure)

        return self.spool.free_space().addCallbacks(measured, failed)

    @property
    def disk_full(self) -> bool:
        return self._free_space is not None and self._free_space < self.min_free_space

    # -- IReceiver ---------------------------------------------------------------

    def check_sender(self, session: Session, sender: str, params: MailParams) -> Reply | None:
        if self.disk_full:
            return DISK_FULL
        if params.size is not None and self._free_space is not None:
            if self._free_space - params.size < self.min_free_space:
                return DISK_FULL
        return None

    def check_recipient(self, session: Session, address: str, params: RcptParams) -> Reply | None:
        if not recipient_domain(address) and address.lower() != "postmaster":
            return NO_DOMAIN  # RFC 5321 §4.1.1.3: only <postmaster> goes without a domain
        refusal = self.policy.check(
            address,
            client_address=session.address,
            authenticated=session.authenticated_as is not None,
        )
        if refusal is None and self.check_local is not None:
            refusal = self.check_local(address)
        if refusal is None and self.check_route is not None:
            refusal = self.check_route(address)
        return refusal

    def new_queue_id(self) -> str:
        return self._new_queue_id()

    def incoming(self, queue_id: str) -> IIncoming:
        """The spool's stream for the content of ``queue_id`` (bounded memory)."""
        return self.spool.incoming(queue_id)

    def accept_content(self, envelope: Envelope, content: bytes) -> Deferred[None]:
        """``accept`` for a message made here whole (a DSN): content already in memory."""
        incoming = self.spool.incoming(envelope.queue_id)
        wait = incoming.write(content)
        if wait is None:
            return self.accept(envelope, incoming)
        return wait.addCallback(lambda _: self.accept(envelope, incoming))

    def accept(self, envelope: Envelope, content: ContentSink) -> Deferred[None]:
        if envelope.params.mtrk is not None and not self._tracked.allow(envelope.client):
            # CHECKLIST 3.6, 8.4: over the client's quota the mail is accepted, but no
            # tracking data is kept for it (and no certifier goes on).
            log.warn(
                "{queue_id}: tracked-message quota of {client} exceeded: MTRK not retained",
                queue_id=envelope.queue_id,
                client=TrackedRate.key(envelope.client),
            )
            envelope = replace(envelope, params=replace(envelope.params, mtrk=None))
        incoming = IIncoming(content)  # the spool's, as self.incoming handed it out
        size = incoming.size

        def committed(held: bytes | None) -> Deferred[None]:
            d = self.tracking.record_arrival(
                envelope, reporting_mta=self.reporting_mta, node_id=self.node_id, size=size
            )
            return d.addCallback(self._accepted, envelope, held)

        return incoming.commit(envelope).addCallback(committed)

    def _accepted(self, record: StoredMessage, envelope: Envelope, content: bytes | None) -> None:
        log.info(
            "{queue_id}: accepted from=<{sender}> nrcpt={n} via {listener} client=[{client}]",
            queue_id=envelope.queue_id,
            sender=envelope.sender,
            n=len(envelope.recipients),
            listener=envelope.client.listener,
            client=envelope.client.address,
        )
        if self.on_accepted is not None:
            self.on_accepted(envelope, content, record)
