"""The spool's small asynchronous API (ISpool) and the errors every backend raises."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from mtrkmta.envelope import Envelope


class SpoolError(Exception):
    """Base class of spool failures (also raised for use after close())."""


class SpoolCorruption(SpoolError):
    """A stored message is truncated or damaged; no partial data is ever returned."""


class MessageNotFound(SpoolError, LookupError):
    """No committed message has this queue id."""


class DuplicateQueueId(SpoolError):
    """A message with this queue id is already stored or being stored."""


@dataclass(frozen=True, slots=True)
class QuarantinedFile:
    """One message moved out of the queue into quarantine: its queue id, its size in
    octets and when it was last changed (POSIX time)."""

    queue_id: str
    size: int
    changed: float


class IIncoming(Interface):
    """A message being received: its content arrives in pieces, then it is committed
    (exactly like ``ISpool.store``) or discarded.

    Memory stays bounded whatever the size of the message: content beyond a small
    buffer goes to disk as it arrives, and ``write`` says when the writer must wait.
    """

    queue_id = Attribute("the queue id the message will be committed under")
    size = Attribute("octets of content written so far")

    def write(data: bytes) -> Deferred[None] | None:
        """Append content. None: go on; a Deferred: send nothing more until it fires.

        A failure to write is not raised here: later data is dropped and ``commit``
        fails, so the client hears a 4xx at the end of its message.
        """

    def commit(envelope: Envelope) -> Deferred[bytes | None]:
        """Durably store the message under ``envelope.queue_id`` (see ``ISpool.store``);
        fire with the content when it was small enough to be held in memory, else None."""

    def discard() -> None:
        """Forget the message (refused, or the client went away); its partial file goes."""


class ISpool(Interface):
    """Where accepted messages live between the 250 reply and their final removal.

    Every method returns a Deferred and never blocks the reactor. A message is
    committed, and may be acknowledged, exactly when the Deferred of ``store`` fires
    with None; until then a crash leaves nothing that ``queue_ids`` reports.
    """

    def store(envelope: Envelope, content: bytes) -> Deferred[None]:
        """Durably store one message under ``envelope.queue_id`` (content with CRLF ends)."""

    def incoming(queue_id: str) -> IIncoming:
        """Start receiving a message's content as a stream (``IIncoming``)."""

    def load(queue_id: str) -> Deferred[tuple[Envelope, bytes]]:
        """Read a committed message back; fails with MessageNotFound or SpoolCorruption."""

    def remove(queue_ids: Iterable[str]) -> Deferred[None]:
        """Delete messages; ids that are already gone are ignored.

        The deletion need not survive a crash: a removed message may come back, and
        whoever removes must cope with that (the node does, at start-up).
        """

    def quarantine(queue_ids: Iterable[str]) -> Deferred[Path]:
        """Move committed messages aside (out of the queue), keeping them; fire with where."""

    def quarantined() -> Deferred[list[QuarantinedFile]]:
        """What was moved to quarantine, by queue id."""

    def unquarantine(queue_id: str) -> Deferred[tuple[Envelope, bytes]]:
        """Move a quarantined message back into the queue if it now reads whole; fire
        with it. SpoolCorruption (it stays in quarantine) or MessageNotFound otherwise."""

    def drop_quarantined(queue_id: str) -> Deferred[bool]:
        """Delete a quarantined message; fire with False when there is none."""

    def queue_ids() -> Deferred[list[str]]:
        """Every committed queue id, sorted."""

    def recover() -> Deferred[int]:
        """At start-up, before anything else: discard uncommitted leftovers; return their count."""

    def free_space() -> Deferred[int]:
        """Bytes available to this process on the spool's filesystem."""

    def probe() -> Deferred[None]:
        """Prove that a new message could be stored now (``/readyz``): fire with None, or
        fail with SpoolError or OSError naming what stops it (read-only, gone, closed)."""

    def close() -> Deferred[None]:
        """Refuse new work and fire once every operation in flight has finished."""
