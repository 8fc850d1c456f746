"""Pure queue policy: retry backoff, queue lifetime, and attempt outcomes as tracking updates."""

from __future__ import annotations

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
DELIVER_BY_EXPIRED_DIAGNOSTIC = "delivery time expired (BY deadline passed, RFC 2852 §4.1.3)"


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


def return_by(envelope: Envelope) -> float | None:
    """The deliver-by-time of a message sent with a by-mode of R, else None: arrival plus
    the by-time (RFC 2852 §4: "adding the by-time upon receipt to the current time")."""
    by = envelope.params.deliver_by
    if by is None or by.mode != "R":
        return None
    return envelope.arrival + by.seconds


def deliver_by_expired(index: int) -> RecipientOutcome:
    """The outcome of a recipient whose R-mode deliver-by-time has passed: no further
    attempt is made and it fails with 5.4.7 (RFC 2852 §4.1.3)."""
    return RecipientOutcome(
        index=index,
        state=RecipientState.FAILED,
        status=DELIVER_BY_EXPIRED_STATUS,
        diagnostic=None,
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
    deadline: float | None = None,
) -> RecipientUpdate:
    """Turn one attempt's outcome into the recipient's new tracking state.

    A temporary failure is retried after the backoff delay, the last retry
    falling exactly at the end of the queue lifetime; a temporary failure at or
    after that point fails the recipient with 4.4.7, keeping the last remote
    reply as the diagnostic. ``deadline`` is an R-mode deliver-by-time
    (RFC 2852 §4.1.3): the next attempt falls no later than it, and a temporary
    failure at or after it fails the recipient with 5.4.7.
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
        )
    past_deadline = deadline is not None and now >= deadline  # RFC 2852 §4.1.3: 5.4.7
    if deadline is not None:
        give_up = min(give_up, deadline)
    if now >= give_up:
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
    return RecipientUpdate(
        index=outcome.index,
        state=RecipientState.DEFERRED,
        status=outcome.status,
        action="delayed",
        remote_mta=outcome.remote_mta,
        diagnostic=outcome.diagnostic,
        last_attempt=now,
        will_retry_until=give_up,
        next_attempt=min(now + policy.delay(attempts_before + 1), give_up),
        relay=relay,
    )
