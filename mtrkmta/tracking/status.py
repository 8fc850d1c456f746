"""message/tracking-status (RFC 3886): report values, built from the store, rendered, parsed."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime, parsedate_to_datetime
from types import MappingProxyType

from mtrkmta.reportfields import escape, join_within, safe_mta_name, typed_mta
from mtrkmta.tracking.interfaces import Event, EventKind, StoredMessage, StoredRecipient

MEDIA_TYPE = "message/tracking-status"
MAX_LINE = 998  # RFC 5322 §2.1.1; also the MTQP data-line limit (RFC 3887 §2.2)

ACTIONS: frozenset[str] = frozenset(
    {"failed", "delayed", "delivered", "expanded", "relayed", "transferred", "opaque"}
)
"""The seven Action values of RFC 3886 §3.3.3 (RFC 3464's grammar extended:
doc/conformance.rst 3886-P4)."""

DEFAULT_STATUS: Mapping[str, str] = MappingProxyType(
    {
        "failed": "5.0.0",
        "delayed": "4.0.0",
        "delivered": "2.1.5",
        "expanded": "2.1.5",
        "relayed": "2.1.9",
        "transferred": "2.4.0",
        "opaque": "2.0.0",
    }
)
"""The Status used when the store has none that fits the Action (doc/conformance.rst 3886-P3)."""

RELAYED_STATUS = "2.1.9"  # X.1.9, RFC 3886 §3.3.4: only ever with Action relayed

Extension = tuple[str, str]
"""An extension field (RFC 3464 §2.4): its name and its value."""

_ORIGINAL_ENVELOPE_ID = "Original-Envelope-Id"
_REPORTING_MTA = "Reporting-MTA"
_ARRIVAL_DATE = "Arrival-Date"
_ORIGINAL_RECIPIENT = "Original-Recipient"
_FINAL_RECIPIENT = "Final-Recipient"
_ACTION = "Action"
_STATUS = "Status"
_REMOTE_MTA = "Remote-MTA"
_LAST_ATTEMPT_DATE = "Last-Attempt-Date"
_WILL_RETRY_UNTIL = "Will-Retry-Until"
_DIAGNOSTIC_CODE = "Diagnostic-Code"
DELIVER_BY_FIELD = "X-Mtrkmta-Deliver-By"
"""The deliver-by-time (RFC 2852 §4) of a recipient still queued, while it lies ahead."""

_MESSAGE_FIELDS = frozenset(
    name.lower() for name in (_ORIGINAL_ENVELOPE_ID, _REPORTING_MTA, _ARRIVAL_DATE)
)
_RECIPIENT_FIELDS = frozenset(
    name.lower()
    for name in (
        _ORIGINAL_RECIPIENT,
        _FINAL_RECIPIENT,
        _ACTION,
        _STATUS,
        _REMOTE_MTA,
        _LAST_ATTEMPT_DATE,
        _WILL_RETRY_UNTIL,
    )
)
_KNOWN_FIELDS = _MESSAGE_FIELDS | _RECIPIENT_FIELDS

# status-code = DIGIT "." 1*3DIGIT "." 1*3DIGIT, no leading zeros (RFC 3464 §2.3.4); the
# class is 2, 4 or 5 (RFC 3463 §3.1). Reading accepts any DIGIT and leading zeros.
_STATUS_STRICT = re.compile(r"[245]\.(?:0|[1-9][0-9]{0,2})\.(?:0|[1-9][0-9]{0,2})")
_STATUS_LAX = re.compile(r"[0-9]\.[0-9]{1,3}\.[0-9]{1,3}")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")  # RFC 5322 atext
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # ftext: printable US-ASCII except ":"
_TEXT = re.compile(r"[\t -~]*")  # 7bit text: printable US-ASCII, SP and HTAB
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")  # RFC 2046
_CRLF = re.compile(r"\r\n|\n")
# A stored value is cut to _MAX_VALUE characters and a type longer than _MAX_KIND is
# dropped, so the longest field line (name, ": ", type, "; ", value) fits MAX_LINE.
_MAX_VALUE = 900
_MAX_KIND = 40


class TrackingStatusError(ValueError):
    """A report that cannot be rendered, or message/tracking-status text that cannot be read."""


@dataclass(frozen=True, slots=True)
class TypedValue:
    """A ``type; value`` field body: address-type or MTA-name-type, then the value (3464 §2.1.2).

    ``kind`` is an atom such as ``rfc822`` or ``dns`` (case-insensitive on the wire,
    kept as written); ``value`` is the address or MTA name, case kept.
    """

    kind: str
    value: str

    def __str__(self) -> str:
        return f"{self.kind}; {self.value}" if self.value else f"{self.kind};"


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """One per-recipient block of an MTSN (RFC 3886 §3.3); dates are timezone-aware."""

    original_recipient: TypedValue
    final_recipient: TypedValue
    action: str
    status: str
    remote_mta: TypedValue | None = None
    last_attempt_date: datetime | None = None
    will_retry_until: datetime | None = None
    extensions: tuple[Extension, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "extensions", tuple(self.extensions))


@dataclass(frozen=True, slots=True)
class TrackingReport:
    """One message/tracking-status body: per-message fields and recipient blocks (3886 §3)."""

    original_envelope_id: str
    reporting_mta: TypedValue
    arrival_date: datetime
    recipients: tuple[RecipientStatus, ...]
    extensions: tuple[Extension, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "recipients", tuple(self.recipients))
        object.__setattr__(self, "extensions", tuple(self.extensions))


# --- building a report from the tracking store -------------------------------------------


def report_from_store(
    message: StoredMessage,
    *,
    now: float,
    hide: Callable[[StoredRecipient], bool] | None = None,
    retry_until: float | None = None,
) -> TrackingReport:
    """The MTSN this MTA gives for one stored transaction (see ``report_from_transactions``)."""
    return report_from_transactions(
        [message], now=now, hide=hide, retry_until=lambda _: retry_until
    )


def report_from_transactions(
    messages: Sequence[StoredMessage],
    *,
    now: float,
    hide: Callable[[StoredRecipient], bool] | None = None,
    retry_until: Callable[[StoredMessage], float | None] | None = None,
    events: Mapping[str, Sequence[Event]] | None = None,
) -> TrackingReport:
    """The MTSN this MTA gives at time ``now`` for a message that reached it as the
    transactions ``messages`` (same ENVID and certifier, by arrival; RFC 3885 §3.1):
    one recipient block per recipient of every transaction, each with its own state,
    and the earliest Arrival-Date.

    Action follows the recipient's queue state (in queue -> ``delayed``); a stored
    Action ``opaque`` is kept. The stored Status is used when it fits the Action,
    otherwise the default for the Action (``DEFAULT_STATUS``); 2.1.9 only ever goes
    with ``relayed`` (RFC 3886 §3.3.4). Remote-MTA and Last-Attempt-Date appear only after
    an attempt (and never for ``opaque``); Will-Retry-Until only for recipients still
    in our queue, from the store or else ``retry_until`` of their transaction, and
    only while it lies after ``now``. A Diagnostic-Code extension carries the last
    diagnostic of failed and delayed recipients.

    ``hide`` marks recipients whose final address must never show (a confidential
    forwarding target, a role-alias target, list members: RFC 3885 §4.2). Such a
    recipient is reported under its RCPT address, without Remote-MTA or
    diagnostic, and ``transferred`` becomes ``relayed`` 2.1.9 (3886 §4.2 (a)).
    Several hidden recipients with the same original recipient and RCPT address
    (list members) collapse into one ``expanded`` 2.1.5 block (3886 §4.2).

    Values that 7bit text cannot carry (non-ASCII addresses under SMTPUTF8) are
    written as ``utf-8`` addresses with ``\\x{HEX}`` escapes (RFC 6533 §3).

    ``events`` (``ITrackingStore.transaction_events``, keyed by queue id) adds each
    recipient's events to its block, and the message-level ones to the per-message
    block, as ``X-Mtrkmta-Event`` extension fields (RFC 3464 §2.4): see
    :func:`event_fields` for what they carry and how many. A collapsed list block
    gets none.

    A recipient still in our queue whose transaction has a deliver-by-time (RFC 2852
    §4) after ``now`` gets it as an ``X-Mtrkmta-Deliver-By`` extension field.
    Raises :class:`TrackingStatusError` for no transaction or one without an ENVID.
    """
    if not messages:
        raise TrackingStatusError("no transaction to report on")
    first = messages[0]
    if first.envid is None:
        raise TrackingStatusError("a message without ENVID cannot be tracked")
    is_hidden = hide or _hide_nothing
    found = events or {}
    entries = [
        (recipient, None if retry_until is None else retry_until(message))
        for message in messages
        for recipient in message.recipients
    ]
    deadlines = [message.deliver_by for message in messages for _ in message.recipients]
    history = [
        [e for e in found.get(message.queue_id, ()) if e.recipient == recipient.index]
        for message in messages
        for recipient in message.recipients
    ]
    groups: dict[tuple[str, str, str], list[int]] = {}
    order: list[int | tuple[str, str, str]] = []  # an entry, or a group of hidden ones
    for position, (recipient, _) in enumerate(entries):
        if is_hidden(recipient):
            key = (recipient.original.addr_type, recipient.original.address, recipient.address)
            if key not in groups:
                groups[key] = []
                order.append(key)
            groups[key].append(position)
        else:
            order.append(position)
    blocks: list[RecipientStatus] = []
    for item in order:
        if isinstance(item, int):
            recipient, until = entries[item]
            block = _recipient_block(recipient, now, until, hidden=False)
            block = _with_deadline(block, recipient, deadlines[item], now)
            blocks.append(_with_events(block, history[item], hidden=False))
            continue
        members = groups[item]
        if len(members) == 1:
            recipient, until = entries[members[0]]
            block = _recipient_block(recipient, now, until, hidden=True)
            block = _with_deadline(block, recipient, deadlines[members[0]], now)
            blocks.append(_with_events(block, history[members[0]], hidden=True))
        else:
            blocks.append(_expanded_block([entries[i][0] for i in members]))
    return TrackingReport(
        original_envelope_id=_seven_bit(first.envid),
        reporting_mta=_mta_name(first.reporting_mta),
        arrival_date=_timestamp(min(m.arrival for m in messages)),
        recipients=tuple(blocks),
        extensions=event_fields(
            sorted(
                (e for m in messages for e in found.get(m.queue_id, ()) if e.recipient is None),
                key=lambda e: e.time,
            )
        ),
    )


def _with_events(
    block: RecipientStatus, history: Sequence[Event], *, hidden: bool
) -> RecipientStatus:
    fields = event_fields(history, hidden=hidden)
    if not fields:
        return block
    return RecipientStatus(
        block.original_recipient,
        block.final_recipient,
        block.action,
        block.status,
        block.remote_mta,
        block.last_attempt_date,
        block.will_retry_until,
        (*block.extensions, *fields),
    )


def _with_deadline(
    block: RecipientStatus, recipient: StoredRecipient, deadline: int | None, now: float
) -> RecipientStatus:
    """``block`` with the deliver-by-time, when the recipient waits and time remains."""
    if deadline is None or not recipient.state.in_queue or deadline <= now:
        return block
    field = (DELIVER_BY_FIELD, format_datetime(_timestamp(deadline)))
    return replace(block, extensions=(*block.extensions, field))


def _hide_nothing(recipient: StoredRecipient) -> bool:
    return False


def _recipient_block(
    recipient: StoredRecipient, now: float, retry_until: float | None, *, hidden: bool
) -> RecipientStatus:
    if recipient.state.in_queue:
        action = "delayed"
    elif recipient.action == "opaque":
        action = "opaque"
    else:
        action = recipient.state.value
    status = _status_for(action, recipient.status)
    if hidden and action == "transferred":
        action, status = "relayed", RELAYED_STATUS
    if action == "opaque":
        return RecipientStatus(
            _original(recipient), _final(recipient, hidden=hidden), action, status
        )
    attempted = recipient.last_attempt is not None
    remote_mta: TypedValue | None = None
    if attempted and not hidden and recipient.remote_mta:
        remote_mta = _mta_name(recipient.remote_mta)
    will_retry: datetime | None = None
    if recipient.state.in_queue:
        until: float | None = recipient.will_retry_until
        if until is None:
            until = retry_until
        if until is not None and until > now:
            will_retry = _timestamp(until)
    extensions: tuple[Extension, ...] = ()
    if not hidden and recipient.diagnostic and action in ("failed", "delayed"):
        diagnostic = _diagnostic(recipient.diagnostic)
        if diagnostic:
            extensions = ((_DIAGNOSTIC_CODE, diagnostic),)
    return RecipientStatus(
        original_recipient=_original(recipient),
        final_recipient=_final(recipient, hidden=hidden),
        action=action,
        status=status,
        remote_mta=remote_mta,
        last_attempt_date=(
            _timestamp(recipient.last_attempt) if recipient.last_attempt is not None else None
        ),
        will_retry_until=will_retry,
        extensions=extensions,
    )


def _expanded_block(members: Sequence[StoredRecipient]) -> RecipientStatus:
    first = members[0]
    attempts = [m.last_attempt for m in members if m.last_attempt is not None]
    return RecipientStatus(
        original_recipient=_original(first),
        final_recipient=_final(first, hidden=True),
        action="expanded",
        status=DEFAULT_STATUS["expanded"],
        last_attempt_date=_timestamp(max(attempts)) if attempts else None,
    )


def _status_for(action: str, stored: str | None) -> str:
    """The stored Status when it suits ``action``, else the doc/conformance.rst 3886-P3 default."""
    if action == "opaque" or stored is None or not _STATUS_STRICT.fullmatch(stored):
        return DEFAULT_STATUS[action]
    if stored == RELAYED_STATUS and action != "relayed":
        return DEFAULT_STATUS[action]
    wanted = {"delayed": "4", "failed": "45"}.get(action, "2")
    return stored if stored[0] in wanted else DEFAULT_STATUS[action]


def _original(recipient: StoredRecipient) -> TypedValue:
    original = recipient.original
    return _address(original.addr_type, original.address)


def _final(recipient: StoredRecipient, *, hidden: bool) -> TypedValue:
    address = recipient.address if hidden else recipient.final_recipient
    return _address("rfc822", address)


def _address(kind: str, address: str) -> TypedValue:
    """``kind; address`` when both fit their fields, else ``utf-8`` with ``\\x{HEX}``
    escapes (RFC 6533 §3); a stored address type that is not a short atom is dropped."""
    kind_ok = _ATOM.fullmatch(kind) is not None and len(kind) <= _MAX_KIND
    if kind_ok and _clean_text(address) and len(address) <= _MAX_VALUE:
        return TypedValue(kind, address)
    return TypedValue("utf-8", _bounded(_escape_unicode(address)))


def _seven_bit(value: str) -> str:
    return _bounded(value if _clean_text(value) else _escape_unicode(value))


def _bounded(value: str) -> str:
    """At most :data:`_MAX_VALUE` characters, cut before an escape it would split, so that
    every field line stays within :data:`MAX_LINE` (RFC 5322 §2.1.1) whatever was stored."""
    if len(value) <= _MAX_VALUE:
        return value
    cut = value[:_MAX_VALUE]
    start = cut.rfind("\\x{")
    if start >= 0 and "}" not in cut[start:]:
        cut = cut[:start]
    return cut.rstrip(" \t")


def _clean_text(value: str) -> bool:
    return _TEXT.fullmatch(value) is not None and value == value.strip(" \t")


def _escape_unicode(value: str) -> str:
    """``\\x{HEX}`` for every character outside VCHAR and for ``\\`` (RFC 6533 §3)."""
    return "".join(
        char if "!" <= char <= "~" and char != "\\" else f"\\x{{{ord(char):02X}}}" for char in value
    )


def _mta_name(value: str) -> TypedValue:
    """``dns; host`` from a stored name that may already carry its type; the name made
    safe by :func:`~mtrkmta.reportfields.safe_mta_name` (no comment parentheses, spaces or
    controls: they become ``\\x{HEX}``, RFC 6533 §3 notation)."""
    kind, name = typed_mta(value)  # an IP address as a domain-literal (RFC 3461 §9.3)
    if len(kind) > _MAX_KIND or not _ATOM.fullmatch(kind):  # no type: all of it is the name
        kind, name = "dns", value
    return TypedValue(kind, _bounded(safe_mta_name(name)))


def _diagnostic(text: str) -> str:
    printable = "".join(char if " " <= char <= "~" else " " for char in text)
    collapsed = " ".join(printable.split())
    limit = MAX_LINE - len(_DIAGNOSTIC_CODE) - 2
    return collapsed[:limit].rstrip()


def _timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(int(seconds), tz=timezone.utc)


# --- events as extension fields (RFC 3464 §2.4) ------------------------------------------

EVENT_FIELD = "X-Mtrkmta-Event"
"""The extension field that carries one event of a block (doc/tracking.rst)."""
OMITTED = "omitted"
"""The kind of the one event line that says how many events were left out."""
EVENTS_FIRST = 10
"""Events of one block sent from its start..."""
EVENTS_LAST = 30
"""...and from its end; those in between are counted in one ``omitted`` line."""

# What each kind of event may tell the tracking client. The rest stays in the store,
# for the administrator (`mtrkmta queue show`): an arrival's client name, address, port,
# listener and login, the sender and size (RFC 3885 §4.2 gives a report's reader the
# Arrival-Date only), and the addresses an expansion produced (only their number,
# ``produced``, as RFC 3886 §4.2 allows only "expanded" for a list).
_WIRE_DETAIL: Mapping[EventKind, tuple[str, ...]] = MappingProxyType(
    {
        EventKind.ARRIVED: ("protocol", "recipients"),
        EventKind.HELD: ("reason",),
        EventKind.RELEASED: ("source",),
        EventKind.QUARANTINED: (),
        EventKind.DSN_SENT: ("action",),
    }
)
_OUTCOME_DETAIL = ("status", "relay", "diagnostic", "next_attempt", "final_recipient", "by")
_HIDDEN_DETAIL = ("status", "next_attempt", "by")  # RFC 3886 §4.2: no next hop or address
_INTERNAL_ERROR = "internal error"  # a hold after a failed queue run: the log says more
_MAX_EVENT_VALUE = 300  # characters of one quoted value on the wire
_MIN_EVENT_VALUE = 16  # a value that would have less room is left out
_EVENT_NAME = re.compile(r"[A-Za-z0-9_-]+")
_EVENT_PARAM = re.compile(r'\s*;\s*([A-Za-z0-9_-]+)="((?:[^"\\]|\\[ -~])*)"')
_QUOTED_PAIR = re.compile(r"\\([ -~])")


@dataclass(frozen=True, slots=True)
class ReportedEvent:
    """One event as an ``X-Mtrkmta-Event`` field gives it: when (timezone-aware), its
    kind (an ``EventKind`` value, or ``omitted``) and its details (name, value)."""

    time: datetime
    kind: str
    detail: tuple[tuple[str, str], ...] = ()

    def get(self, name: str) -> str | None:
        """The detail value called ``name``, or None."""
        return next((value for key, value in self.detail if key == name), None)


def event_fields(events: Sequence[Event], *, hidden: bool = False) -> tuple[Extension, ...]:
    """``X-Mtrkmta-Event`` fields of ``events`` (one block's, in time order): the first
    :data:`EVENTS_FIRST` and the last :data:`EVENTS_LAST`, with one ``omitted`` line
    counting those in between, so that a message retried for days keeps a bounded
    answer. A ``hidden`` recipient's events say neither its next hop nor a diagnostic
    nor an address (RFC 3886 §4.2)."""
    if len(events) <= EVENTS_FIRST + EVENTS_LAST:
        return tuple(event_field(e, hidden=hidden) for e in events)
    left_out = events[EVENTS_FIRST:-EVENTS_LAST]
    omitted = (
        EVENT_FIELD,
        _event_value(left_out[0].time, OMITTED, (("count", str(len(left_out))),)),
    )
    return (
        *(event_field(e, hidden=hidden) for e in events[:EVENTS_FIRST]),
        omitted,
        *(event_field(e, hidden=hidden) for e in events[-EVENTS_LAST:]),
    )


def event_field(event: Event, *, hidden: bool = False) -> Extension:
    """One event as ``X-Mtrkmta-Event: <RFC 5322 date>; <kind>; name="value"; ...``
    (doc/tracking.rst has the grammar): only the details a tracking client may see;
    ``next_attempt`` as a date; an expansion's addresses as their number."""
    if hidden:
        names: tuple[str, ...] = _HIDDEN_DETAIL
    else:
        names = _WIRE_DETAIL.get(event.kind, _OUTCOME_DETAIL)
    pairs: list[tuple[str, str]] = []
    for name in names:
        value = event.get(name)
        if value is None:
            continue
        if name == "next_attempt":
            if not value.isdigit():
                continue
            value = format_datetime(_timestamp(int(value)))
        elif name == "reason" and value.startswith(_INTERNAL_ERROR):
            value = _INTERNAL_ERROR  # the exception's text is for the log, not the sender
        pairs.append((name, value))
    produced = event.get("produced")
    if produced and event.kind is EventKind.EXPANDED:
        pairs.append(("produced", str(_count_addresses(produced))))
    return EVENT_FIELD, _event_value(event.time, event.kind.value, tuple(pairs))


def _count_addresses(produced: str) -> int:
    """How many addresses mtrkmta.tracking.events wrote as ``a, b (and N more)``."""
    more = re.search(r" \(and (\d+) more\)$", produced)
    shown = produced[: more.start()] if more else produced
    return len(shown.split(", ")) + (int(more.group(1)) if more else 0)


def _event_value(time: float, kind: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """The field's value, never longer than a field line allows (RFC 5322 §2.1.1): each
    value gets at most :data:`_MAX_EVENT_VALUE` characters, fewer when the line is
    nearly full, and a detail that no longer fits is left out."""
    text = f"{format_datetime(_timestamp(time))}; {kind}"
    budget = MAX_LINE - len(EVENT_FIELD) - 2
    for name, value in pairs:
        room = min(_MAX_EVENT_VALUE, budget - len(text) - len(f'; {name}=""'))
        if room < _MIN_EVENT_VALUE:
            break
        text += f'; {name}="{_quoted(value, room)}"'
    return text


def _quoted(value: str, limit: int) -> str:
    """The content of a quoted-string (RFC 5322 §3.2.4), at most ``limit`` characters:
    7bit printable, every other character as ``\\x{HEX}`` (RFC 6533 §3), ``"`` and
    ``\\`` as quoted-pairs; cut between two characters, never inside an escape, and
    then ended with ``...``."""
    tokens = [char if " " <= char <= "~" else escape(char) for char in value]
    tokens = [token.replace("\\", "\\\\").replace('"', '\\"') for token in tokens]
    return join_within(tokens, limit, "...")


def parse_event(value: str) -> ReportedEvent:
    """Read an ``X-Mtrkmta-Event`` value (inverse of :func:`event_field`); raises
    :class:`TrackingStatusError` when it does not follow the grammar."""
    date, semicolon, rest = value.partition(";")
    if not semicolon:
        raise TrackingStatusError(f"no ';' after the date in {value[:80]!r}")
    time = _read_date(date)
    kind, _, params = rest.partition(";")
    kind = kind.strip(" \t")
    if not _EVENT_NAME.fullmatch(kind):
        raise TrackingStatusError(f"bad event kind {kind[:40]!r}")
    detail: list[tuple[str, str]] = []
    params = ";" + params if params else ""
    position = 0
    while position < len(params.rstrip(" \t")):
        match = _EVENT_PARAM.match(params, position)
        if match is None:
            raise TrackingStatusError(f"bad event detail {params[position:][:80]!r}")
        detail.append((match.group(1), _QUOTED_PAIR.sub(r"\1", match.group(2))))
        position = match.end()
    return ReportedEvent(time, kind.lower(), tuple(detail))


def reported_events(extensions: Iterable[Extension]) -> tuple[ReportedEvent, ...]:
    """The events among a block's extension fields, in order; a malformed one is left
    out (another MTA's extension of the same name must not break tracking)."""
    found: list[ReportedEvent] = []
    for name, value in extensions:
        if name.lower() != EVENT_FIELD.lower():
            continue
        try:
            found.append(parse_event(value))
        except TrackingStatusError:
            continue
    return tuple(found)


# --- rendering ---------------------------------------------------------------------------


def render_status(report: TrackingReport) -> bytes:
    """The message/tracking-status body: fields in ABNF order, CRLF, 7bit (RFC 3886 §3-§3.3).

    Raises :class:`TrackingStatusError` for a report that breaks RFC 3886: no
    recipient, a bad status code, an unknown Action, 2.1.9 without ``relayed``,
    Remote-MTA / Last-Attempt-Date / Will-Retry-Until where 3886 §3.3.5-3.3.7
    forbids them, naive dates, or a value that is not 7bit single-line text or
    would read back differently.
    """
    if not report.recipients:
        raise TrackingStatusError("an MTSN needs at least one recipient block")
    lines = [
        _field(_ORIGINAL_ENVELOPE_ID, _plain(report.original_envelope_id, "envelope id", True)),
        _field(_REPORTING_MTA, _typed(report.reporting_mta, mta=True)),
        _field(_ARRIVAL_DATE, _date(report.arrival_date)),
        *_extension_lines(report.extensions),
    ]
    for recipient in report.recipients:
        lines.append("")
        lines.extend(_recipient_lines(recipient))
    return "".join(line + "\r\n" for line in lines).encode("ascii")


def _recipient_lines(recipient: RecipientStatus) -> list[str]:
    action = recipient.action.lower()
    if action not in ACTIONS:
        raise TrackingStatusError(f"unknown Action {recipient.action!r}")
    if not _STATUS_STRICT.fullmatch(recipient.status):
        raise TrackingStatusError(f"malformed status code {recipient.status!r}")
    if recipient.status == RELAYED_STATUS and action != "relayed":
        raise TrackingStatusError("status 2.1.9 goes only with Action relayed")
    if action == "opaque" and (
        recipient.remote_mta or recipient.last_attempt_date or recipient.will_retry_until
    ):
        raise TrackingStatusError("an opaque recipient has no Remote-MTA or dates")
    if recipient.remote_mta is not None and recipient.last_attempt_date is None:
        raise TrackingStatusError("Remote-MTA without Last-Attempt-Date")
    if recipient.will_retry_until is not None and action != "delayed":
        raise TrackingStatusError("Will-Retry-Until only for a recipient still queued")
    lines = [
        _field(_ORIGINAL_RECIPIENT, _typed(recipient.original_recipient, mta=False)),
        _field(_FINAL_RECIPIENT, _typed(recipient.final_recipient, mta=False)),
        _field(_ACTION, action),
        _field(_STATUS, recipient.status),
    ]
    if recipient.remote_mta is not None:
        lines.append(_field(_REMOTE_MTA, _typed(recipient.remote_mta, mta=True)))
    if recipient.last_attempt_date is not None:
        lines.append(_field(_LAST_ATTEMPT_DATE, _date(recipient.last_attempt_date)))
    if recipient.will_retry_until is not None:
        lines.append(_field(_WILL_RETRY_UNTIL, _date(recipient.will_retry_until)))
    lines.extend(_extension_lines(recipient.extensions))
    return lines


def _field(name: str, body: str) -> str:
    line = f"{name}: {body}" if body else f"{name}:"
    if len(line) > MAX_LINE:
        raise TrackingStatusError(f"{name} field longer than {MAX_LINE} characters")
    return line


def _plain(value: str, what: str, empty_ok: bool) -> str:
    if not isinstance(value, str) or not _clean_text(value):
        raise TrackingStatusError(f"{what} is not single-line 7bit text: {value!r}")
    if not value and not empty_ok:
        raise TrackingStatusError(f"{what} is empty")
    return value


def _typed(value: TypedValue, *, mta: bool) -> str:
    if not _ATOM.fullmatch(value.kind):
        raise TrackingStatusError(f"type {value.kind!r} is not an atom")
    _plain(value.value, "address or MTA name", True)
    if mta and _uncomment_or_none(value.value) != value.value:
        raise TrackingStatusError(f"MTA name would read back differently: {value.value!r}")
    return str(value)


def _date(value: datetime) -> str:
    offset = value.utcoffset() if isinstance(value, datetime) else None
    if offset is None:
        raise TrackingStatusError(f"date without time zone: {value!r}")
    if offset % timedelta(minutes=1):
        raise TrackingStatusError("time zone offset is not whole minutes")
    if value.year < 1900:
        raise TrackingStatusError("year before 1900")
    return format_datetime(value.replace(microsecond=0))


def _extension_lines(extensions: Iterable[Extension]) -> list[str]:
    lines: list[str] = []
    for name, value in extensions:
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise TrackingStatusError(f"bad extension field name {name!r}")
        if name.lower() in _KNOWN_FIELDS:
            raise TrackingStatusError(f"{name} is not an extension field")
        lines.append(_field(name, _plain(value, name, True)))
    return lines


def render_related(reports: Sequence[TrackingReport], boundary: str | None = None) -> bytes:
    """The MTQP answer entity: multipart/related of message/tracking-status parts (RFC 3886 §3).

    One part per report, in order (several when answers were chained, 3886 §3).
    Without ``boundary`` one is derived from the content; a given boundary must be
    a legal RFC 2046 boundary that no part contains.
    """
    if not reports:
        raise TrackingStatusError("a tracking answer needs at least one report")
    bodies = [render_status(report) for report in reports]
    if boundary is None:
        boundary = "mtsn-" + hashlib.sha1(b"".join(bodies)).hexdigest()
    if not _BOUNDARY.fullmatch(boundary):
        raise TrackingStatusError(f"illegal MIME boundary {boundary!r}")
    delimiter = b"--" + boundary.encode("ascii")
    for body in bodies:
        if any(line.startswith(delimiter) for line in body.split(b"\r\n")):
            raise TrackingStatusError("the boundary occurs inside a part")
    out = [
        b'Content-Type: multipart/related; type="message/tracking-status";\r\n'
        b' boundary="' + boundary.encode("ascii") + b'"\r\n',
        b"\r\n",
    ]
    for body in bodies:
        out.append(delimiter + b"\r\n")
        out.append(b"Content-Type: message/tracking-status\r\n\r\n")
        out.append(body)
        out.append(b"\r\n")  # the blank line before the boundary (3886 §3.1)
    out.append(delimiter + b"--\r\n")
    return b"".join(out)


# --- parsing -----------------------------------------------------------------------------


def parse_status(body: bytes | str) -> TrackingReport:
    """Read a message/tracking-status body (RFC 3886 §3.1; any field order:
    project decision, doc/conformance.rst 3886-P1).

    Fields may come in any order within their block; names are case-insensitive;
    folded lines are unfolded; CRLF or LF line ends. Comments are dropped from the
    Action, Status, date, ``*-type`` and MTA-name values; the envelope id,
    addresses and extension values are kept as written (3464 §2.2.1, §2.3.2 ask
    for them verbatim). Unknown fields become extensions. Raises
    :class:`TrackingStatusError` on a missing or repeated field, a line without a
    colon, a bad status code, Action or date.
    """
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    blocks = _blocks(_CRLF.split(text))
    if not blocks:
        raise TrackingStatusError("empty message/tracking-status body")
    message_fields, message_ext = _sort_block(blocks[0], _MESSAGE_FIELDS, "per-message")
    recipients = []
    for block in blocks[1:]:
        fields, extensions = _sort_block(block, _RECIPIENT_FIELDS, "per-recipient")
        recipients.append(_read_recipient(fields, extensions))
    if not recipients:
        raise TrackingStatusError("no per-recipient block")
    envid = _required(message_fields, _ORIGINAL_ENVELOPE_ID)
    return TrackingReport(
        original_envelope_id=envid.strip(" \t"),
        reporting_mta=_read_typed(_required(message_fields, _REPORTING_MTA), mta=True),
        arrival_date=_read_date(_required(message_fields, _ARRIVAL_DATE)),
        recipients=tuple(recipients),
        extensions=message_ext,
    )


def _blocks(lines: list[str]) -> list[list[tuple[str, str]]]:
    """Group lines into blank-line separated blocks of unfolded (name, raw body) fields."""
    blocks: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for line in lines:
        if not line.strip(" \t"):
            if current:
                blocks.append(current)
                current = []
            continue
        if line[0] in " \t":
            if not current:
                raise TrackingStatusError("continuation line without a field")
            name, value = current[-1]
            current[-1] = (name, value + line)
            continue
        name, colon, value = line.partition(":")
        name = name.rstrip(" \t")
        if not colon or not _FIELD_NAME.fullmatch(name):
            raise TrackingStatusError(f"not a field: {line[:80]!r}")
        current.append((name, value))
    if current:
        blocks.append(current)
    return blocks


def _sort_block(
    block: list[tuple[str, str]], known: frozenset[str], what: str
) -> tuple[dict[str, str], tuple[Extension, ...]]:
    fields: dict[str, str] = {}
    extensions: list[Extension] = []
    for name, value in block:
        key = name.lower()
        if key in known:
            if key in fields:
                raise TrackingStatusError(f"{name} repeated in a {what} block")
            fields[key] = value
        elif key in _KNOWN_FIELDS:
            raise TrackingStatusError(f"{name} does not belong in a {what} block")
        else:
            extensions.append((name, value.strip(" \t")))
    return fields, tuple(extensions)


def _required(fields: Mapping[str, str], name: str) -> str:
    try:
        return fields[name.lower()]
    except KeyError:
        raise TrackingStatusError(f"required field {name} missing") from None


def _read_recipient(
    fields: Mapping[str, str], extensions: tuple[Extension, ...]
) -> RecipientStatus:
    action = _uncomment(_required(fields, _ACTION)).strip(" \t").lower()
    if action not in ACTIONS:
        raise TrackingStatusError(f"unknown Action {action!r}")
    status = _uncomment(_required(fields, _STATUS)).strip(" \t")
    if not _STATUS_LAX.fullmatch(status):
        raise TrackingStatusError(f"malformed status code {status!r}")
    remote = fields.get(_REMOTE_MTA.lower())
    last = fields.get(_LAST_ATTEMPT_DATE.lower())
    retry = fields.get(_WILL_RETRY_UNTIL.lower())
    return RecipientStatus(
        original_recipient=_read_typed(_required(fields, _ORIGINAL_RECIPIENT), mta=False),
        final_recipient=_read_typed(_required(fields, _FINAL_RECIPIENT), mta=False),
        action=action,
        status=status,
        remote_mta=None if remote is None else _read_typed(remote, mta=True),
        last_attempt_date=None if last is None else _read_date(last),
        will_retry_until=None if retry is None else _read_date(retry),
        extensions=extensions,
    )


def _read_typed(raw: str, *, mta: bool) -> TypedValue:
    index = _top_level_semicolon(raw)
    if index < 0:
        raise TrackingStatusError(f"no ';' after the type in {raw.strip()[:80]!r}")
    kind = _uncomment(raw[:index]).strip(" \t")
    if not _ATOM.fullmatch(kind):
        raise TrackingStatusError(f"type {kind!r} is not an atom")
    value = raw[index + 1 :]
    if mta:
        value = _uncomment(value)
    return TypedValue(kind, value.strip(" \t"))


def _top_level_semicolon(text: str) -> int:
    depth = 0
    escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif depth and char == "\\":
            escaped = True
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif char == ";" and not depth:
            return index
    return -1


def parse_date(raw: str) -> datetime:
    """An RFC 5322 date-time as the fields carry it (comments allowed), timezone-aware;
    raises :class:`TrackingStatusError`."""
    return _read_date(raw)


def _read_date(raw: str) -> datetime:
    text = " ".join(_uncomment(raw).split())
    try:
        value = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        raise TrackingStatusError(f"malformed date {text[:80]!r}") from None
    if value.tzinfo is None:  # "-0000": UTC, local zone unknown (RFC 5322 §3.3)
        value = value.replace(tzinfo=timezone.utc)
    return value


def _uncomment(text: str) -> str:
    """``text`` with RFC 5322 comments replaced by a space; quoted strings are kept."""
    out: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for char in text:
        if escaped:
            escaped = False
            if not depth:
                out.append(char)
        elif char == "\\" and (depth or quoted):
            escaped = True
            if not depth:
                out.append(char)
        elif depth:
            if char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
                if not depth:
                    out.append(" ")
        elif quoted:
            out.append(char)
            quoted = char != '"'
        elif char == "(":
            depth = 1
        else:
            out.append(char)
            quoted = char == '"'
    if depth:
        raise TrackingStatusError(f"unterminated comment in {text.strip()[:80]!r}")
    return "".join(out)


def _uncomment_or_none(text: str) -> str | None:
    try:
        return _uncomment(text)
    except TrackingStatusError:
        return None


def parse_related(entity: bytes) -> list[TrackingReport]:
    """Read an MTQP answer entity: multipart/related of message/tracking-status parts.

    Needs a ``multipart/related`` Content-Type with a boundary (its ``type``
    parameter is not checked, for older servers); every part must be
    message/tracking-status in 7bit, 8bit or binary (3886 §3). Preamble and
    epilogue are ignored. Raises :class:`TrackingStatusError`.
    """
    text = entity.decode("utf-8", errors="replace")
    lines = _CRLF.split(text)
    headers, start = _read_headers(lines, 0)
    media, params = _content_type(headers.get("content-type", ""))
    if media != "multipart/related":
        raise TrackingStatusError(f"not multipart/related but {media or 'nothing'}")
    boundary = params.get("boundary")
    if not boundary:
        raise TrackingStatusError("multipart/related without a boundary")
    delimiter = "--" + boundary
    parts: list[list[str]] = []
    current: list[str] | None = None
    closed = False
    for line in lines[start:]:
        stripped = line.rstrip(" \t")
        if stripped == delimiter + "--":
            if current is not None:
                parts.append(current)
            closed = True
            break
        if stripped == delimiter:
            if current is not None:
                parts.append(current)
            current = []
        elif current is not None:
            current.append(line)
    if not closed:
        raise TrackingStatusError("multipart/related without its closing boundary")
    if not parts:
        raise TrackingStatusError("multipart/related without parts")
    return [_read_part(part) for part in parts]


def _read_part(lines: list[str]) -> TrackingReport:
    headers, start = _read_headers(lines, 0)
    media, _params = _content_type(headers.get("content-type", "text/plain"))
    if media != MEDIA_TYPE:
        raise TrackingStatusError(f"part is {media}, not {MEDIA_TYPE}")
    encoding = _uncomment(headers.get("content-transfer-encoding", "7bit")).strip().lower()
    if encoding not in ("7bit", "8bit", "binary"):
        raise TrackingStatusError(f"message/tracking-status in {encoding} encoding")
    return parse_status("\r\n".join(lines[start:]))


def _read_headers(lines: list[str], start: int) -> tuple[dict[str, str], int]:
    """Unfolded header fields from ``start`` to the first blank line; and the body's index."""
    headers: dict[str, str] = {}
    last: str | None = None
    index = start
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line:
            return headers, index
        if line[0] in " \t" and last is not None:
            headers[last] += line
            continue
        name, colon, value = line.partition(":")
        if not colon or not _FIELD_NAME.fullmatch(name.rstrip(" \t")):
            raise TrackingStatusError(f"malformed MIME header line {line[:80]!r}")
        last = name.rstrip(" \t").lower()
        headers[last] = value
    raise TrackingStatusError("MIME header without the blank line that ends it")


def _content_type(raw: str) -> tuple[str, dict[str, str]]:
    """Media type (lower-cased) and parameters of a Content-Type value (RFC 2045 §5.1)."""
    pieces = _split_params(_uncomment(raw))
    media = "".join(pieces[0].split()).lower() if pieces else ""
    params: dict[str, str] = {}
    for piece in pieces[1:]:
        name, equals, value = piece.partition("=")
        name = name.strip().lower()
        value = value.strip()
        if not equals or not name:
            continue
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[name] = value
    return media, params


def _split_params(text: str) -> list[str]:
    pieces: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ";" and not quoted:
            pieces.append("".join(current))
            current = []
            continue
        current.append(char)
    pieces.append("".join(current))
    return [piece for piece in pieces if piece.strip()]
