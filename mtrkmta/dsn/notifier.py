"""DsnNotifier: the queue's INotifier — decides which DSNs are owed and queues them as mail."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mtrkmta.dsn.policy import (
    DsnEvent,
    delay_warning_due,
    event_for_state,
    group,
    is_null_sender,
    notification_for,
)
from mtrkmta.dsn.render import RecipientReport, render_dsn
from mtrkmta.envelope import ClientInfo, Envelope, MailParams, RcptParams, Recipient
from mtrkmta.metrics import IMetrics, NoMetrics
from mtrkmta.queue.policy import deliver_by_delay_due
from mtrkmta.queue.service import INotifier
from mtrkmta.spool.interfaces import ISpool, MessageNotFound, SpoolCorruption
from mtrkmta.tracking.interfaces import RecipientState, StoredMessage, StoredRecipient

log = Logger()

# The Action of a DSN owed for a recipient in each state (decided by ``owed`` when
# the outcome was recorded; a transfer that owes one is reported as relayed).
PENDING_ACTIONS = {
    RecipientState.FAILED: "failed",
    RecipientState.DEFERRED: "delayed",
    RecipientState.QUEUED: "delayed",
    RecipientState.DELIVERED: "delivered",
    RecipientState.RELAYED: "relayed",
    RecipientState.TRANSFERRED: "relayed",
    RecipientState.EXPANDED: "expanded",
}


def pending_action(recipient: StoredRecipient) -> str | None:
    """The Action of the DSN owed for ``recipient`` in its current state."""
    if recipient.state is RecipientState.EXPANDED and recipient.list_expansion:
        return "delivered"
    return PENDING_ACTIONS.get(recipient.state)


# The whole original message goes back in a failure DSN up to this size; larger
# messages are returned as headers only (RFC 3461 §6.2 allows the truncation).
RETURN_LIMIT = 1024 * 1024


@implementer(INotifier)
class DsnNotifier:
    """Decides per recipient whether a DSN is owed (RFC 3461 §5.2) and sends it.

    A DSN is an ordinary message: ``MAIL FROM:<>``, one recipient (the original
    envelope sender) with ``NOTIFY=NEVER``, no RET, no ENVID, no MTRK (RFC 3461 §6.1,
    RFC 3464 §2); it enters the queue through the same durable acceptance as any mail and
    is tracked without MTRK. One DSN is sent per Action, covering every recipient
    of the message that owes that Action (RFC 3461 §5.2.8, RFC 3464 §3).
    """

    def __init__(
        self,
        *,
        spool: ISpool,
        new_queue_id: Callable[[], str],
        reporting_mta: str,
        delay_warning: float,
        clock: IReactorTime,
        return_limit: int = RETURN_LIMIT,
        metrics: IMetrics = NoMetrics(),
    ) -> None:
        self.spool = spool
        self.metrics = metrics  # told each DSN queued
        self.new_queue_id = new_queue_id
        self.reporting_mta = reporting_mta
        self.delay_warning = delay_warning
        self.clock = clock
        self.return_limit = return_limit

    def owed(self, message: StoredMessage, recipient: StoredRecipient, now: float) -> str | None:
        """The DSN Action owed for the recipient's new state, or None."""
        if is_null_sender(message.sender):
            return None  # RFC 3461 §5.2: never a DSN about a DSN
        deferred = recipient.state is RecipientState.DEFERRED
        previous = message.recipients[recipient.index].status
        if (
            deferred
            and not delay_warning_due(
                message.arrival, now, recipient.delay_warned, self.delay_warning
            )
            # RFC 2852 §4.1.3: by-mode N, deliver-by-time passed: a "delayed" DSN, 4.4.7.
            and not (
                message.deliver_by is not None
                and now >= message.deliver_by
                and deliver_by_delay_due(previous, recipient.status, deferred)
            )
        ):
            return None
        event = event_for_state(recipient.state)
        if recipient.state is RecipientState.EXPANDED and recipient.list_expansion:
            event = DsnEvent.LIST_ACCEPTED  # a list: "delivered" in a DSN (3461 §5.2.7.1)
        if event is None:
            return None
        return notification_for(
            event, recipient.notify, sender=message.sender, dsn_passed=recipient.dsn_passed
        )

    def send(
        self,
        message: StoredMessage,
        recipients: Sequence[StoredRecipient],
        submit: Callable[[Envelope, bytes], Deferred[None]],
    ) -> Deferred[None]:
        return ensureDeferred(self._send(message, recipients, submit))

    async def _send(
        self,
        message: StoredMessage,
        recipients: Sequence[StoredRecipient],
        submit: Callable[[Envelope, bytes], Deferred[None]],
    ) -> None:
        try:
            _, content = await self.spool.load(message.queue_id)
        except (MessageNotFound, SpoolCorruption):
            content = None  # quarantined: the DSN goes out from the tracking record alone
        now = self.clock.seconds()
        for batch in group((r, pending_action(r)) for r in recipients):
            dsn = render_dsn(
                message=message,
                recipients=[RecipientReport.from_stored(r, batch.action) for r in batch.recipients],
                reporting_mta=self.reporting_mta,
                original_content=content,
                ret=message.ret,
                max_full_size=self.return_limit,
                now=now,
            )
            envelope = Envelope(
                queue_id=self.new_queue_id(),
                sender="",
                recipients=(Recipient(message.sender, RcptParams(notify=frozenset({"NEVER"}))),),
                params=MailParams(),
                arrival=now,
                client=ClientInfo(
                    address="", helo=self.reporting_mta, protocol="local", listener="dsn"
                ),
            )
            await submit(envelope, dsn)
            self.metrics.dsn_sent(batch.action)
            log.info(
                "{queue_id}: {action} DSN {dsn_id} to <{sender}> for {recipients}",
                queue_id=message.queue_id,
                action=batch.action,
                dsn_id=envelope.queue_id,
                sender=message.sender,
                recipients=" ".join(f"<{r.address}>" for r in batch.recipients),
            )
