"""Pure queue policy: retry backoff, queue lifetime, deliver-by deadlines, outcomes as updates."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mtrkmta.delivery.interfaces import RecipientOutcome
from mtrkmta.envelope import Envelope
from mtrkmta.tracking.interfaces import RecipientState, RecipientUpdate

FINAL_STATES = frozenset(
    {
        RecipientState.DELIVERED,
        RecipientState.TRANSFERRED,
        RecipientState.RELAYED,
        RecipientState.EXPANDED,
        RecipientState.FAILED,
    }
)
EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired
DELIVER_BY_EXPIRED_STATUS = "5.4.7"  # RFC 2852 §4.1.3, RFC 3463: delivery time expired
DELIVER_BY_DELAYED_STATUS = "4.4.7"  # RFC 2852 §4.1.3, by-mode N: a "delayed" DSN
DELIVER_BY_EXPIRED_DIAGNOSTIC = "x-local; delivery time expired (the deliver-by-time of BY= passed)"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff: first_retry, doubling, capped at max_interval; give up after
    max_lifetime in the queue (the recipient then fails with 4.4.7)."""

    first_retry: float = 300.0
    max_interval: float = 3600.0
    max_lifetime: float = 5 * 86400.0

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1 for the first)."""
        exponent = max(0, attempts - 1)
        if exponent > 60:
            return self.max_interval
        return min(self.max_interval, self.first_retry * (2**exponent))

    def give_up_at(self, arrival: float) -> float:
        return arrival + self.max_lifetime


@dataclass(frozen=True, slots=True)
class Deadline:
    """A message's deliver-by-time (RFC 2852 §4) and its by-mode, ``"R"`` or ``"N"``."""

    at: float
    mode: str

    @property
    def returns(self) -> bool:
        """By-mode R: no attempt after the deadline, the message fails (RFC 2852 §4.1.3)."""
        return self.mode == "R"

    def passed(self, now: float) -> bool:
        """Deliver-by-time "reached or passed" (RFC 2852 §4.1.3)."""
        return now >= self.at


def deadline_of(envelope: Envelope) -> Deadline | None:
    """The deliver-by-time of a message sent with BY=, else None: arrival plus the by-time
    (RFC 2852 §4: "adding the by-time upon receipt to the current time").

    Rounded up to a whole second: the tracking store keeps retry times in whole seconds,
    and a retry stored for the deadline must not come back before it.
    """
    by = envelope.params.deliver_by
    if by is None:
        return None
    return Deadline(at=math.ceil(envelope.arrival + by.seconds), mode=by.mode)


def deliver_by_expired(index: int) -> RecipientOutcome:
    """The outcome of a recipient whose R-mode deliver-by-time has passed: no further
    attempt is made and it fails with 5.4.7 (RFC 2852 §4.1.3)."""
    return RecipientOutcome(
        index=index,
        state=RecipientState.FAILED,
        status=DELIVER_BY_EXPIRED_STATUS,
        diagnostic=DELIVER_BY_EXPIRED_DIAGNOSTIC,
    )


def action_for(state: RecipientState) -> str:
    """The tracking Action of a recipient in ``state`` (RFC 3886 §3.3.3)."""
    return "delayed" if state.in_queue else state.value


def update_for(
    outcome: RecipientOutcome,
    *,
    attempts_before: int,
    arrival: float,
    now: float,
    policy: RetryPolicy,
    deadline: Deadline | None = None,
) -> RecipientUpdate:
    """Turn one attempt's outcome into the recipient's new tracking state.

    A temporary failure is retried after the backoff delay, the last retry
    falling exactly at the end of the queue lifetime; a temporary failure at or
    after that point fails the recipient with 4.4.7, keeping the last remote
    reply as the diagnostic.

    With a deliver-by ``deadline`` (RFC 2852 §4.1.3) the next attempt falls no later
    than it, so that the queue acts at it. By-mode R: a temporary failure at or after
    it fails the recipient with 5.4.7. By-mode N: past it, the recipient stays queued
    with status 4.4.7, and the first such update owes the "delayed" DSN
    (:func:`deliver_by_delay_due`).
    """
    give_up = policy.give_up_at(arrival)
    relay = None if outcome.relay is None else str(outcome.relay)  # for the event only
    if outcome.state in FINAL_STATES:
        return RecipientUpdate(
            index=outcome.index,
            state=outcome.state,
            status=outcome.status,
            action=action_for(outcome.state),
            remote_mta=outcome.remote_mta,
            diagnostic=outcome.diagnostic,
            last_attempt=now,
            certifier_forwarded=outcome.certifier_forwarded,
            dsn_passed=outcome.dsn_passed,
            list_expansion=outcome.list_expansion,
            relay=relay,
            produced=outcome.produced,
            relayed_dsn=outcome.relayed_dsn,
        )
    returns = deadline if deadline is not None and deadline.returns else None
    if returns is not None:
        give_up = min(give_up, returns.at)
    if now >= give_up:
        past_deadline = returns is not None and returns.passed(now)
        return RecipientUpdate(
            index=outcome.index,
            state=RecipientState.FAILED,
            status=DELIVER_BY_EXPIRED_STATUS if past_deadline else EXPIRED_STATUS,
            action="failed",
            remote_mta=outcome.remote_mta,
            diagnostic=outcome.diagnostic,
            last_attempt=now,
            relay=relay,
        )
    next_attempt = min(now + policy.delay(attempts_before + 1), give_up)
    status = outcome.status
    if deadline is not None and not deadline.passed(now):
        next_attempt = min(next_attempt, deadline.at)
    elif deadline is not None:
        status = DELIVER_BY_DELAYED_STATUS  # by-mode N past its deadline (RFC 2852 §4.1.3)
    return RecipientUpdate(
        index=outcome.index,
        state=RecipientState.DEFERRED,
        status=status,
        action="delayed",
        remote_mta=outcome.remote_mta,
        diagnostic=outcome.diagnostic,
        last_attempt=now,
        will_retry_until=give_up,
        next_attempt=next_attempt,
        relay=relay,
    )


def deliver_by_delay_due(previous_status: str | None, status: str | None, deferred: bool) -> bool:
    """True when a deferred recipient has just gone past an N-mode deliver-by-time: the
    "delayed" DSN with 4.4.7 of RFC 2852 §4.1.3 is owed then, once (later deferrals keep
    status 4.4.7 and owe nothing more)."""
    return (
        deferred
        and status == DELIVER_BY_DELAYED_STATUS
        and previous_status != DELIVER_BY_DELAYED_STATUS
    )
