"""The delivery log line of one recipient's attempt, in Postfix's shape (pure: no reactor)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mtrkmta.delivery.interfaces import RecipientOutcome
from mtrkmta.tracking.interfaces import RecipientState, RecipientUpdate, StoredRecipient

EVENT = "delivery"
"""The ``event`` field of a delivery line (doc/running.rst, "Logging")."""

FORMAT = (
    "{queue_id}: to=<{to}>, relay={relay}, delay={delay:.2f}, delays={delays},"
    " dsn={dsn}, status={status} ({reply})"
)
FORMAT_ORIG_TO = (
    "{queue_id}: to=<{to}>, orig_to=<{orig_to}>, relay={relay}, delay={delay:.2f},"
    " delays={delays}, dsn={dsn}, status={status} ({reply})"
)

# Postfix's words for where a recipient stands after the attempt; a next hop that took
# the message over SMTP (and so owes the rest) is "relayed", final delivery "sent".
_STATUS = {
    RecipientState.DELIVERED: "sent",
    RecipientState.TRANSFERRED: "relayed",
    RecipientState.RELAYED: "relayed",
    RecipientState.EXPANDED: "expanded",
    RecipientState.FAILED: "bounced",
    RecipientState.DEFERRED: "deferred",
    RecipientState.QUEUED: "deferred",
}


@dataclass(frozen=True, slots=True)
class Times:
    """The queue's times of one attempt (POSIX seconds on the node's clock): when the
    message arrived, when this queue run started and when its outcome was recorded."""

    arrival: float
    started: float
    recorded: float


def seconds(value: float) -> str:
    """A duration as the log writes it: two decimals, never negative (``0.25``)."""
    return f"{max(0.0, value):.2f}"


def delays(times: Times, outcome: RecipientOutcome | None) -> tuple[float, float, float]:
    """``delays=a/b/c`` of one recipient: a, the wait in the queue before this attempt
    (arrival to the start of this queue run); b, connection set-up (routing and its DNS
    lookups, waiting for a connection slot, connecting, greeting, EHLO, STARTTLS; the
    whole failed try when no connection was made); c, transmission (from the connection
    ready to the outcome: MAIL, RCPT, DATA and the reply; a Maildir write). A recipient
    that no transport saw (expanded, routing failed, an administrator's bounce) has
    b = c = 0 and spends the rest of the time until the record in a."""
    queued = times.started - times.arrival
    timing = outcome.timing if outcome is not None else None
    if timing is None:
        return times.recorded - times.arrival, 0.0, 0.0
    if timing.connected is None:
        return queued, timing.done - times.started, 0.0
    return queued, timing.connected - times.started, timing.done - timing.connected


def reply_text(update: RecipientUpdate, outcome: RecipientOutcome | None) -> str:
    """What the parentheses after ``status=`` hold: the remote reply or what happened,
    without its Diagnostic-Code type (``smtp; ``, ``x-mtrkmta; ``)."""
    text = update.diagnostic
    if text:
        kind, sep, rest = text.partition("; ")
        return rest if sep and " " not in kind else text
    if update.state is RecipientState.DELIVERED and outcome is not None:
        if outcome.relay is not None and outcome.relay.host == "local":
            return "delivered to maildir"
    return update.action or update.state.value


def delivery_fields(
    queue_id: str,
    recipient: StoredRecipient,
    update: RecipientUpdate,
    outcome: RecipientOutcome | None,
    times: Times,
) -> tuple[str, dict[str, Any]]:
    """The log format and fields of one recipient's line after an attempt (or an
    administrator's bounce, a quarantine): ``to`` is the address delivered to, ``orig_to``
    (only when it differs) the address the client gave."""
    to = update.final_recipient or recipient.final_recipient
    a, b, c = delays(times, outcome)
    fields: dict[str, Any] = {
        "queue_id": queue_id,
        "event": EVENT,
        "to": to,
        "relay": str(outcome.relay) if outcome is not None and outcome.relay else "none",
        "delay": round(max(0.0, times.recorded - times.arrival), 2),
        "delays": "/".join(seconds(part) for part in (a, b, c)),
        "dsn": update.status or ("4.0.0" if update.state.in_queue else "2.0.0"),
        "status": _STATUS.get(update.state, update.state.value),
        "reply": reply_text(update, outcome),
    }
    if recipient.address != to:
        fields["orig_to"] = recipient.address
        return FORMAT_ORIG_TO, fields
    return FORMAT, fields
