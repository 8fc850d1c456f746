"""The webhook outbox: which hooks an event goes to, and the JSON body each will be sent."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mtrkmta.config import Webhook
from mtrkmta.envelope import Envelope
from mtrkmta.tracking.events import bounded
from mtrkmta.tracking.interfaces import Event, OutboxEntry, StoredMessage


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """What a webhook body says of the message an event belongs to: its envelope
    sender, its ENVID, and each recipient's original address (ORCPT, else as received)."""

    queue_id: str
    sender: str
    envid: str | None
    recipients: Mapping[int, str]

    @classmethod
    def of(cls, message: StoredMessage) -> MessageFacts:
        """The facts of a stored message."""
        return cls(
            queue_id=message.queue_id,
            sender=message.sender,
            envid=message.envid,
            recipients={r.index: r.original.address for r in message.recipients},
        )


def iso_time(posix: int) -> str:
    """A whole POSIX second as ISO 8601 in UTC, e.g. ``2026-12-04T16:40:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(posix))


def event_body(event_id: str, event: Event, facts: MessageFacts) -> str:
    """The JSON object a hook receives for ``event``: every string bounded and
    escaped as the event's details are (mtrkmta.tracking.events), keys in a fixed order."""
    next_attempt = event.get("next_attempt")
    recipient = None if event.recipient is None else facts.recipients.get(event.recipient)
    body = {
        "id": event_id,
        "kind": event.kind.value,
        "time": iso_time(event.time),
        "queue_id": bounded(event.queue_id),
        "envid": None if facts.envid is None else bounded(facts.envid),
        "sender": bounded(facts.sender),
        "recipient": None if recipient is None else bounded(recipient),
        "status": event.get("status"),
        "diagnostic": event.get("diagnostic"),
        "relay": event.get("relay"),
        "next_attempt": None if next_attempt is None else iso_time(int(next_attempt)),
        "detail": dict(event.detail),
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def new_event_id() -> str:
    """A fresh event id: random, so that ids from several nodes never collide."""
    return uuid.uuid4().hex


def wanted_by(hooks: Sequence[Webhook], events: Iterable[Event]) -> bool:
    """Whether some hook may want one of ``events`` (by kind alone: the sender is not
    known yet)."""
    return any(event.kind.value in hook.events for hook in hooks for event in events)


def outbox_rows(
    events: Iterable[Event],
    facts: MessageFacts,
    hooks: Sequence[Webhook],
    *,
    new_id: Callable[[], str] = new_event_id,
) -> list[dict[str, object]]:
    """The ``webhook_outbox`` rows (without ``id``) of ``events`` of one message: one
    per event and hook that wants it, due at once. An event sent to several hooks has
    one id for all of them."""
    rows: list[dict[str, object]] = []
    for event in events:
        wanting = [hook for hook in hooks if hook.wants(event.kind.value, facts.sender)]
        if not wanting:
            continue
        event_id = new_id()
        body = event_body(event_id, event, facts)
        rows.extend(
            {
                "hook": hook.name,
                "event_id": event_id,
                "queue_id": event.queue_id,
                "body": body,
                "created": math.floor(event.time),
                "due": math.floor(event.time),
                "attempts": 0,
                "lease_owner": None,
                "lease_until": None,
            }
            for hook in wanting
        )
    return rows


def entry_of(row: Mapping[Any, Any]) -> OutboxEntry:
    """The OutboxEntry of an outbox row (with its ``id``)."""
    return OutboxEntry(
        id=row["id"],
        hook=row["hook"],
        event_id=row["event_id"],
        queue_id=row["queue_id"],
        body=row["body"],
        created=row["created"],
        due=row["due"],
        attempts=row["attempts"],
    )


def facts_of_envelope(envelope: Envelope) -> MessageFacts:
    """The facts of a message that is being recorded (``record_arrival``)."""
    return MessageFacts(
        queue_id=envelope.queue_id,
        sender=envelope.sender,
        envid=envelope.params.envid,
        recipients={index: rcpt.original.address for index, rcpt in enumerate(envelope.recipients)},
    )
