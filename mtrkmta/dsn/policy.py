"""Pure DSN policy: which recipient gets which notification, delay warnings, batching."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Generic, NamedTuple, TypeVar

from mtrkmta.envelope import NOTIFY_NEVER
from mtrkmta.tracking.interfaces import RecipientState

T = TypeVar("T")

DSN_ACTIONS: frozenset[str] = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
"""The Actions a DSN may carry (RFC 3464 §2.3.3); never transferred/opaque (RFC 3886 §3.3.3)."""

BATCH_ORDER: tuple[str, ...] = ("failed", "delayed", "delivered", "expanded", "relayed")
"""The order in which :func:`group` returns batches: bad news first."""


class DsnEvent(str, enum.Enum):
    """What happened to one recipient, as the events of RFC 3461 §5.2.2-§5.2.7."""

    DELIVERED = "delivered"  # placed in a mailbox or handed to the LDA (3461 §5.2.3)
    LIST_ACCEPTED = "list-accepted"  # accepted by a list exploder (3461 §5.2.7.1)
    RELAYED = "relayed"  # RCPT got 2xx from the next SMTP hop (3461 §5.2.1, §5.2.2 b,e)
    RELAY_REJECTED = "relay-rejected"  # RCPT got 5xx from the next SMTP hop (3461 §5.2.2 c,d,f)
    GATEWAYED = "gatewayed"  # into a foreign environment (3461 §5.2.4 b-d)
    FAILED = "failed"  # we gave up here (3461 §5.2.6)
    DELAYED = "delayed"  # still queued after an unusually long time (3461 §5.2.5)
    EXPANDED = "expanded"  # multi-recipient alias, option (c) (3461 §5.2.7.3)


class _Row(NamedTuple):
    """One event of RFC 3461 §5.2.2-§5.2.7: the keyword, then the Action per NOTIFY column."""

    keyword: str
    absent: str | None
    never: str | None
    has_keyword: str | None
    lacks_keyword: str | None


_TABLE: Mapping[DsnEvent, _Row] = MappingProxyType(
    {
        DsnEvent.DELIVERED: _Row("SUCCESS", None, None, "delivered", None),
        DsnEvent.LIST_ACCEPTED: _Row("SUCCESS", None, None, "delivered", None),
        DsnEvent.RELAYED: _Row("SUCCESS", None, None, "relayed", None),
        DsnEvent.RELAY_REJECTED: _Row("FAILURE", "failed", None, "failed", None),
        DsnEvent.GATEWAYED: _Row("SUCCESS", None, None, "relayed", None),
        DsnEvent.FAILED: _Row("FAILURE", "failed", None, "failed", None),
        # NOTIFY absent: a MAY in RFC 3461 §5.2.5 (b); we send it, as absent means FAILURE,DELAY
        # here (project decision, doc/conformance.rst 3461-P1).
        DsnEvent.DELAYED: _Row("DELAY", "delayed", None, "delayed", None),
        DsnEvent.EXPANDED: _Row("SUCCESS", None, None, "expanded", None),
    }
)

# Events whose success report becomes the next hop's duty when it took the DSN parameters.
_PASSED_ON = frozenset(
    {DsnEvent.DELIVERED, DsnEvent.LIST_ACCEPTED, DsnEvent.RELAYED, DsnEvent.GATEWAYED}
)


def is_null_sender(sender: str) -> bool:
    """True for the null reverse-path ``<>`` (stored as the empty string)."""
    return sender.strip() in ("", "<>")


def notification_for(
    event: DsnEvent, notify: frozenset[str] | None, *, sender: str, dsn_passed: bool
) -> str | None:
    """The DSN Action to send to the sender for one recipient, or None (RFC 3461 §5.2).

    ``notify`` is the recipient's NOTIFY as in ``RcptParams.notify`` (None when absent).
    ``dsn_passed`` is True when the next hop advertised DSN and received the DSN
    parameters (3461 §5.2.1, §5.2.4 a): a success report is then its duty, not ours,
    so DELIVERED, LIST_ACCEPTED, RELAYED and GATEWAYED give no DSN. Failures and
    delays are still ours, and EXPANDED (alias option (c): SUCCESS is stripped before
    passing NOTIFY on) is always ours. A null sender never gets a DSN (3461 §5.2).
    """
    if is_null_sender(sender):
        return None
    if dsn_passed and event in _PASSED_ON:
        return None
    row = _TABLE[event]
    if notify is None:
        return row.absent
    keywords = frozenset(keyword.upper() for keyword in notify)
    if NOTIFY_NEVER in keywords:
        return row.never
    return row.has_keyword if row.keyword in keywords else row.lacks_keyword


def event_for_state(state: RecipientState) -> DsnEvent | None:
    """The DSN event a recipient's new queue state stands for, or None while in flight.

    DEFERRED maps to DELAYED: whether a delay warning is due is
    :func:`delay_warning_due`'s decision. TRANSFERRED (to an MTRK hop) and RELAYED
    are both relays; ``dsn_passed`` then tells whether a ``relayed`` DSN is owed.
    FAILED covers a 5xx from the next hop and a failure here alike: both rows of the
    rules of RFC 3461 §5.2.2-§5.2.7 give the same answers.
    """
    if state is RecipientState.DELIVERED:
        return DsnEvent.DELIVERED
    if state in (RecipientState.RELAYED, RecipientState.TRANSFERRED):
        return DsnEvent.RELAYED
    if state is RecipientState.EXPANDED:
        return DsnEvent.EXPANDED
    if state is RecipientState.FAILED:
        return DsnEvent.FAILED
    if state is RecipientState.DEFERRED:
        return DsnEvent.DELAYED
    return None


def delay_warning_due(arrival: float, now: float, warned: bool, delay_warning: float) -> bool:
    """True when a ``delayed`` DSN is due: once, ``delay_warning`` seconds after arrival.

    A ``delay_warning`` of zero or less disables delay warnings (they are optional,
    3461 §5.2.5 NOTE).
    """
    if warned or delay_warning <= 0:
        return False
    return now - arrival >= delay_warning


@dataclass(frozen=True, slots=True)
class Batch(Generic[T]):
    """Recipients of one message that one DSN reports on, all with the same Action."""

    action: str
    recipients: tuple[T, ...]


def group(recipients_with_actions: Iterable[tuple[T, str | None]]) -> list[Batch[T]]:
    """Batch the recipients of one message and one event into DSNs (RFC 3461 §5.2.8, RFC 3464 §3).

    Recipients whose Action is None did not ask and appear in no batch (3461 §5.2.8).
    One batch per Action, in :data:`BATCH_ORDER`; recipients keep their order.
    Raises ValueError for an Action a DSN cannot carry (transferred, opaque, ...).
    """
    by_action: dict[str, list[T]] = {}
    for recipient, action in recipients_with_actions:
        if action is None:
            continue
        if action not in DSN_ACTIONS:
            raise ValueError(f"Action {action!r} cannot appear in a DSN (RFC 3464 §2.3.3)")
        by_action.setdefault(action, []).append(recipient)
    return [
        Batch(action, tuple(by_action[action])) for action in BATCH_ORDER if action in by_action
    ]
