"""A followed trace (mtrkmta.mtqp.client.Trace) as data: the events across hops in time
order, and what `mtrkmta track --json` prints and the HTTP tracking API returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from mtrkmta.mtqp.client import Hop, Trace
from mtrkmta.smtp.statuscodes import meaning
from mtrkmta.tracking.interfaces import EventKind
from mtrkmta.tracking.status import (
    OMITTED,
    RecipientStatus,
    ReportedEvent,
    TrackingReport,
    TrackingStatusError,
    parse_date,
    reported_events,
)

# The kind of event an RFC 3886 Action stands for, for a hop that sends no events.
_ACTION_KINDS = {
    "delayed": EventKind.DEFERRED,
    "delivered": EventKind.DELIVERED,
    "expanded": EventKind.EXPANDED,
    "relayed": EventKind.RELAYED,
    "transferred": EventKind.TRANSFERRED,
    "failed": EventKind.FAILED,
}
_BY_ADMINISTRATOR = frozenset({EventKind.BOUNCED.value, EventKind.DELETED.value, "released"})


@dataclass(frozen=True, slots=True)
class Entry:
    """One event of the timeline: when, at which hop (1-based) and MTA, about which
    recipient (its original address; None for the whole message), what happened.

    ``kind`` is an ``EventKind`` value, or ``omitted`` for events a server left out
    (``count`` says how many). ``retry_until`` is a delayed recipient's
    Will-Retry-Until, for a hop that sends no events (its entries are ``inferred``).
    """

    time: datetime
    hop: int
    reporting_mta: str
    recipient: str | None
    kind: str
    status: str | None = None
    diagnostic: str | None = None
    relay: str | None = None
    next_attempt: datetime | None = None
    retry_until: datetime | None = None
    by_administrator: bool = False
    count: int | None = None
    detail: tuple[tuple[str, str], ...] = ()
    inferred: bool = False  # made from RFC 3886 fields: the hop sent no events

    def get(self, name: str) -> str | None:
        """The event's detail called ``name``, or None."""
        return next((value for key, value in self.detail if key == name), None)


def diagnostic_of(status: RecipientStatus) -> str | None:
    """The block's Diagnostic-Code extension (as this MTA writes it), or None."""
    found = (value for name, value in status.extensions if name.lower() == "diagnostic-code")
    return next(found, None)


def timeline(trace: Trace) -> tuple[Entry, ...]:
    """Every event of every hop's reports, in time order (then by hop, then as sent);
    a hop's events never before the transfer of the hop that referred to it.

    A report with ``X-Mtrkmta-Event`` fields gives those; one without (another
    MTA's) gives what its RFC 3886 fields say: the arrival, each recipient's last
    attempt with its Action and Status, and a delayed one's Will-Retry-Until.
    """
    entries: list[Entry] = []
    not_before: dict[int, datetime] = {}
    for number, hop in enumerate(trace.hops, start=1):
        transfers = [
            entry.time
            for entry in entries
            if entry.kind == EventKind.TRANSFERRED.value
            and hop.referred_by is not None
            and entry.reporting_mta.lower() == hop.referred_by.lower()
        ]
        if transfers:
            not_before[number] = min(transfers)
        for report in hop.reports:
            entries.extend(_report_entries(number, report))

    def order(entry: Entry) -> tuple[datetime, int]:
        # Causality first: a hop's events come after the transfer that brought the
        # message to it, even when its clock (or the whole second) puts them earlier.
        floor = not_before.get(entry.hop)
        return (entry.time if floor is None else max(entry.time, floor), entry.hop)

    return tuple(sorted(entries, key=order))


def _report_entries(hop: int, report: TrackingReport) -> list[Entry]:
    mta = report.reporting_mta.value
    found = [_entry(hop, mta, None, event) for event in reported_events(report.extensions)]
    for block in report.recipients:
        original = block.original_recipient.value
        found += [_entry(hop, mta, original, e) for e in reported_events(block.extensions)]
    if found:
        return found
    return _fields_entries(hop, report)


def _entry(hop: int, mta: str, recipient: str | None, event: ReportedEvent) -> Entry:
    next_attempt: datetime | None = None
    text = event.get("next_attempt")
    if text:
        try:
            next_attempt = parse_date(text)
        except TrackingStatusError:
            next_attempt = None
    count = event.get("count") if event.kind == OMITTED else event.get("produced")
    by = event.get("by") == "the administrator"
    if event.kind == EventKind.HELD.value:
        by = "administrator" in (event.get("reason") or "")
    return Entry(
        time=event.time,
        hop=hop,
        reporting_mta=mta,
        recipient=recipient,
        kind=event.kind,
        status=event.get("status"),
        diagnostic=event.get("diagnostic"),
        relay=event.get("relay"),
        next_attempt=next_attempt,
        by_administrator=by or event.kind in _BY_ADMINISTRATOR,
        count=int(count) if count and count.isdigit() else None,
        detail=event.detail,
    )


def _fields_entries(hop: int, report: TrackingReport) -> list[Entry]:
    mta = report.reporting_mta.value
    entries = [Entry(report.arrival_date, hop, mta, None, EventKind.ARRIVED.value, inferred=True)]
    for block in report.recipients:
        kind = _ACTION_KINDS.get(block.action.lower())
        if kind is None:  # opaque: nothing to say
            continue
        if kind is EventKind.DEFERRED and block.last_attempt_date is None:
            kind = EventKind.QUEUED  # not tried yet
        entries.append(
            Entry(
                time=block.last_attempt_date or report.arrival_date,
                hop=hop,
                reporting_mta=mta,
                recipient=block.original_recipient.value,
                kind=kind.value,
                status=block.status,
                diagnostic=diagnostic_of(block),
                relay=None if block.remote_mta is None else block.remote_mta.value,
                retry_until=block.will_retry_until,
                inferred=True,
            )
        )
    return entries


# -- text -----------------------------------------------------------------------------------


def _code(status: str | None) -> str | None:
    if not status:
        return None
    found = meaning(status)
    return status if found is None else f"{status} {found[0].upper()}{found[1:]}"


def _reply(diagnostic: str | None) -> str | None:
    """A diagnostic without its ``type;`` (``smtp; 421 busy`` -> ``421 busy``)."""
    if not diagnostic:
        return None
    kind, semicolon, rest = diagnostic.partition(";")
    if semicolon and kind.strip() and " " not in kind.strip():
        return rest.strip() or None
    return diagnostic


def entry_text(entry: Entry, when: Callable[[datetime, datetime], str]) -> str:
    """One plain line saying what happened; ``when(time, reference)`` writes a time
    (``reference``: the event's own, so that a same-day time may be shorter)."""
    code = _code(entry.status)
    reply = _reply(entry.diagnostic)
    relay = entry.relay
    kind = entry.kind
    if kind == OMITTED:
        return f"{entry.count if entry.count is not None else 'some'} more events left out"
    if kind == EventKind.ARRIVED.value:
        protocol = entry.get("protocol")
        return f"accepted by {entry.reporting_mta}" + (f" over {protocol}" if protocol else "")
    if kind == EventKind.QUEUED.value:
        # From RFC 3886 fields: delayed, never tried. An event: back from quarantine.
        text = "waiting for its first attempt" if entry.inferred else "put back in the queue"
        return text + _until(entry, when)
    if kind == EventKind.DEFERRED.value:
        text = "attempt failed" + (f": {code}" if code else "") + (f" ({reply})" if reply else "")
        if entry.next_attempt is not None:
            return f"{text}; next attempt {when(entry.next_attempt, entry.time)}"
        return text + _until(entry, when)
    if kind == EventKind.DELIVERED.value:
        where = (" locally" if relay == "local" else f" by {relay}") if relay else ""
        return f"delivered{where}" + (f": {code}" if code else "")
    if kind == EventKind.TRANSFERRED.value:
        return f"transferred to {relay or 'the next hop'}, which tracks it on" + (
            f" ({code})" if code else ""
        )
    if kind == EventKind.RELAYED.value:
        return f"relayed to {relay or 'the next hop'}, which does not track it"
    if kind == EventKind.EXPANDED.value:
        if entry.count is not None:
            return f"expanded into {entry.count} address{'es' if entry.count != 1 else ''}"
        return "expanded (an alias or a mailing list)"
    if kind == EventKind.FAILED.value:
        return "failed" + (f": {code}" if code else "") + (f" ({reply})" if reply else "")
    if kind == EventKind.BOUNCED.value:
        text = "bounced by the administrator" + (f": {code}" if code else "")
        if reply and "administrator" not in reply:  # a bounce keeps the last attempt's
            text += f"; the last attempt said: {reply}"
        return text
    if kind == EventKind.DELETED.value:
        return "deleted by the administrator"
    if kind == EventKind.HELD.value:
        reason = entry.get("reason")
        if entry.by_administrator:
            return "held by the administrator"
        return "held" + (f": {reason}" if reason else "")
    if kind == EventKind.RELEASED.value:
        source = entry.get("source")
        return "released by the administrator" + (f" from {source}" if source else "")
    if kind == EventKind.QUARANTINED.value:
        return "quarantined: its queue file is damaged"
    if kind == EventKind.DSN_SENT.value:
        action = entry.get("action")
        return "delivery status notification sent to the sender" + (
            f" ({action})" if action else ""
        )
    return kind + (f": {code}" if code else "")


def _until(entry: Entry, when: Callable[[datetime, datetime], str]) -> str:
    if entry.retry_until is None:
        return ""
    return f"; will retry until {when(entry.retry_until, entry.time)}"


def utc_when(value: datetime, reference: datetime) -> str:
    """A time in the JSON's texts: always in full, in UTC."""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- JSON -----------------------------------------------------------------------------------


def _date_json(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _utc_json(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(timezone.utc).isoformat()


def _status_json(status: RecipientStatus) -> dict[str, Any]:
    return {
        "original_recipient": str(status.original_recipient),
        "final_recipient": str(status.final_recipient),
        "action": status.action.lower(),
        "status": status.status,
        "meaning": meaning(status.status),
        "remote_mta": None if status.remote_mta is None else str(status.remote_mta),
        "last_attempt_date": _date_json(status.last_attempt_date),
        "will_retry_until": _date_json(status.will_retry_until),
        "extensions": [list(extension) for extension in status.extensions],
    }


def _hop_json(hop: Hop) -> dict[str, Any]:
    outcome = "answered" if hop.reports else ("refused" if hop.refused else "error")
    return {
        "host": hop.host,
        "referred_by": hop.referred_by,
        "server": None
        if hop.server is None
        else {"address": hop.server.address, "port": hop.server.port, "name": hop.server.name},
        "tls": hop.tls,
        "outcome": outcome,
        "reply": None if hop.response is None else hop.response.status_line().decode("ascii"),
        "error": hop.error,
        "reports": [
            {
                "original_envelope_id": report.original_envelope_id,
                "reporting_mta": str(report.reporting_mta),
                "arrival_date": _date_json(report.arrival_date),
                "recipients": [_status_json(status) for status in report.recipients],
            }
            for report in hop.reports
        ],
    }


def _event_json(entry: Entry, first: datetime) -> dict[str, Any]:
    return {
        "time": _utc_json(entry.time),
        "elapsed": int((entry.time - first).total_seconds()),
        "hop": entry.hop,
        "reporting_mta": entry.reporting_mta,
        "recipient": entry.recipient,
        "kind": entry.kind,
        "status": entry.status,
        "meaning": None if entry.status is None else meaning(entry.status),
        "diagnostic": entry.diagnostic,
        "relay": entry.relay,
        "next_attempt": _utc_json(entry.next_attempt),
        "by_administrator": entry.by_administrator,
        "text": entry_text(entry, utc_when),
    }


def trace_json(trace: Trace) -> dict[str, Any]:
    """The trace as JSON-able data: hops with their reports, each recipient's path, and
    the events across hops in time order (``events_omitted``: how many the servers left
    out of long histories)."""
    entries = timeline(trace)
    events = [entry for entry in entries if entry.kind != OMITTED]
    first = events[0].time if events else None
    return {
        "envid": trace.envid,
        "complete": trace.complete,
        "hops": [_hop_json(hop) for hop in trace.hops],
        "events": [_event_json(entry, first) for entry in events if first is not None],
        "events_omitted": sum(e.count or 0 for e in entries if e.kind == OMITTED),
        "recipients": [
            {
                "original_recipient": path.original_recipient,
                "outcome": path.outcome,
                "final": path.final,
                "reason": path.reason,
                "diagnostic": None if path.last is None else diagnostic_of(path.last.status),
                "path": [
                    {
                        "hop": step.hop + 1,
                        "reporting_mta": step.reporting_mta,
                        "action": step.status.action.lower(),
                        "status": step.status.status,
                        "meaning": meaning(step.status.status),
                    }
                    for step in path.steps
                ],
            }
            for path in trace.recipients
        ],
    }
