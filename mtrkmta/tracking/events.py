"""The events of a message's timeline as the stores record them: made, bounded, escaped, encoded."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from mtrkmta.reportfields import safe_human
from mtrkmta.tracking.interfaces import Event, EventKind, RecipientUpdate

MAX_VALUE = 512
"""Characters of one detail value kept before escaping (a longer one is cut, with "...")."""
MAX_ADDRESSES = 20
"""Addresses an expansion event names; beyond, it says how many more there were."""

Detail = tuple[tuple[str, str], ...]


def bounded(value: object) -> str:
    """A detail value: at most :data:`MAX_VALUE` characters of it, then every control
    character, line break and other unprintable character as ``\\x{HH}`` (as a DSN's
    human-readable part has it, mtrkmta.reportfields), so that a string from the wire
    can neither grow the record without bound nor forge a line where it is shown."""
    text = str(value)
    if len(text) > MAX_VALUE:
        text = text[:MAX_VALUE] + "..."
    return safe_human(text)


def detail(**values: object) -> Detail:
    """(name, value) pairs in the order given, each value :func:`bounded`; None and
    empty values are left out."""
    return tuple(
        (name, bounded(value)) for name, value in values.items() if value not in (None, "")
    )


def encode_detail(pairs: Detail) -> str:
    """The detail as the database keeps it: a JSON object (its keys in order)."""
    return json.dumps(dict(pairs), ensure_ascii=False, separators=(",", ":"))


def decode_detail(text: str | None) -> Detail:
    """Inverse of :func:`encode_detail`; what is not a JSON object of strings is kept
    as one bounded ``detail`` value, never an error."""
    if not text:
        return ()
    try:
        value = json.loads(text)
    except ValueError:
        return detail(detail=text)
    if not isinstance(value, dict):
        return detail(detail=text)
    return tuple((bounded(k), bounded(v)) for k, v in value.items())


def arrival_event(message_row: Mapping[str, object], recipients: int, now: float) -> Event:
    """The message-level event of an arrival, from its messages row (store.arrival_rows):
    the client and the transaction that brought it."""
    client = f"{message_row['client_helo']} [{message_row['client_address']}]"
    if message_row["client_port"]:
        client += f":{message_row['client_port']}"
    return Event(
        queue_id=str(message_row["queue_id"]),
        recipient=None,
        time=math.floor(now),
        kind=EventKind.ARRIVED,
        detail=detail(
            listener=message_row["client_listener"],
            client=client,
            protocol=message_row["client_protocol"],
            authenticated_as=message_row["client_authenticated_as"],
            sender=f"<{message_row['sender']}>",
            envid=message_row["envid"],
            recipients=recipients,
            size=message_row["size"],
        ),
    )


def _addresses(addresses: tuple[str, ...]) -> str | None:
    if not addresses:
        return None
    shown = ", ".join(addresses[:MAX_ADDRESSES])
    more = len(addresses) - MAX_ADDRESSES
    return shown if more <= 0 else f"{shown} (and {more} more)"


def outcome_event(queue_id: str, update: RecipientUpdate, now: float) -> Event:
    """The event that records one recipient's outcome: an attempt's (its next hop, the
    status and reply, the next attempt of a deferral, what an expansion produced), or
    the administrator's bounce, or a quarantine's."""
    kind = update.event or EventKind.of_state(update.state)
    return Event(
        queue_id=queue_id,
        recipient=update.index,
        time=math.floor(now),
        kind=kind,
        detail=detail(
            status=update.status,
            relay=update.relay or update.remote_mta,
            diagnostic=update.diagnostic,
            next_attempt=None if update.next_attempt is None else math.floor(update.next_attempt),
            final_recipient=update.final_recipient,
            produced=_addresses(update.produced),
            by="the administrator" if kind in (EventKind.BOUNCED, EventKind.DELETED) else None,
        ),
    )


def message_event(queue_id: str, kind: EventKind, now: float, **values: object) -> Event:
    """A message-level event (held, released, quarantined, deleted)."""
    return Event(queue_id, None, math.floor(now), kind, detail(**values))


def dsn_event(queue_id: str, index: int, action: str | None, now: float) -> Event:
    """The DSN owed for recipient ``index`` was queued (``action``: which one)."""
    return Event(queue_id, index, math.floor(now), EventKind.DSN_SENT, detail(action=action))


def event_row(event: Event) -> dict[str, object]:
    """The events row of ``event`` (schema.py)."""
    return {
        "queue_id": event.queue_id,
        "rcpt_index": event.recipient,
        "at": event.time,
        "kind": event.kind.value,
        "detail": encode_detail(event.detail),
    }


def row_event(row: Mapping[Any, Any]) -> Event:
    """Inverse of :func:`event_row`."""
    return Event(
        queue_id=row["queue_id"],
        recipient=row["rcpt_index"],
        time=row["at"],
        kind=EventKind(row["kind"]),
        detail=decode_detail(row["detail"]),
    )
