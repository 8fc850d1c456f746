"""The Receiver: what the listeners may accept (relay policy, RCPT checks, free-space floor)."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from mtrkmta.address import recipient_domain
from mtrkmta.envelope import BINARYMIME, Envelope, MailParams, RcptParams
from mtrkmta.receive.acceptor import Accepted, Acceptor
from mtrkmta.receive.policy import NO_DOMAIN, RelayPolicy
from mtrkmta.smtp.reply import Reply
from mtrkmta.smtp.server import ContentSink, IReceiver, Session
from mtrkmta.spool.interfaces import IIncoming

log = Logger()

DISK_FULL = Reply(452, "4.3.1", ("Insufficient system storage; try again later",))


@implementer(IReceiver)
class Receiver:
    """The ``IReceiver`` of every listener of one node: the policy of what may be
    accepted, and acceptance through the node's one ``Acceptor``, whose result goes to
    ``enqueue`` (the queue's; a node that does not deliver passes none)."""

    def __init__(
        self,
        *,
        acceptor: Acceptor,
        policy: RelayPolicy,
        min_free_space: int,
        clock: IReactorTime,
        enqueue: Callable[[Accepted], object] | None = None,
        free_space_interval: float = 5.0,
        check_local: Callable[[str], Reply | None] | None = None,
        check_route: Callable[[str], Reply | None] | None = None,
        check_binary: Callable[[str], Reply | None] | None = None,
    ) -> None:
        """``check_local`` refuses unknown local users at RCPT (None: everyone exists);
        ``check_route`` refuses at RCPT a recipient whose delivery is already known to
        fail (the router's decision, see ``route_refusal``; None: no such check);
        ``check_binary`` refuses, for a ``BODY=BINARYMIME`` transaction of a client that
        neither authenticated nor is in ``relay.trusted_networks``, a recipient not known
        to take binary content (None: no such check)."""
        self.acceptor = acceptor
        self.spool = acceptor.spool
        self.policy = policy
        self.min_free_space = min_free_space
        self.enqueue = enqueue
        self.check_local = check_local
        self.check_route = check_route
        self.check_binary = check_binary
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

    def check_recipient(
        self, session: Session, address: str, params: RcptParams, mail: MailParams
    ) -> Reply | None:
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
        if (
            refusal is None
            and self.check_binary is not None
            and mail.body == BINARYMIME
            and session.authenticated_as is None
            and not self.policy.is_trusted(session.address)
        ):
            # A binary message that a next hop may refuse would bounce to a sender who may
            # be forged (a client neither authenticated nor in relay.trusted_networks):
            # refused here unless it stays on a path known to take it.
            refusal = self.check_binary(address)
        return refusal

    def new_queue_id(self) -> str:
        return self.acceptor.new_queue_id()

    def incoming(self, queue_id: str) -> IIncoming:
        """The spool's stream for the content of ``queue_id`` (bounded memory)."""
        return self.acceptor.incoming(queue_id)

    def accept(self, envelope: Envelope, content: ContentSink) -> Deferred[None]:
        """Durably accept the message (``Acceptor.accept``) and hand it to the queue."""
        incoming = IIncoming(content)  # the spool's, as self.incoming handed it out
        return self.acceptor.accept(envelope, incoming).addCallback(self._enqueue)

    def _enqueue(self, accepted: Accepted) -> None:
        if self.enqueue is not None:
            self.enqueue(accepted)
