"""The spool's small asynchronous API (ISpool) and the errors every backend raises."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from twisted.internet.defer import Deferred
from zope.interface import Interface

from mtrkmta.envelope import Envelope


class SpoolError(Exception):
    """Base class of spool failures (also raised for use after close())."""


class SpoolCorruption(SpoolError):
    """A stored message is truncated or damaged; no partial data is ever returned."""


class MessageNotFound(SpoolError, LookupError):
    """No committed message has this queue id."""


class DuplicateQueueId(SpoolError):
    """A message with this queue id is already stored or being stored."""


class ISpool(Interface):
    """Where accepted messages live between the 250 reply and their final removal.

    Every method returns a Deferred and never blocks the reactor. A message is
    committed, and may be acknowledged, exactly when the Deferred of ``store`` fires
    with None; until then a crash leaves nothing that ``queue_ids`` reports.
    """

    def store(envelope: Envelope, content: bytes) -> Deferred[None]:
        """Durably store one message under ``envelope.queue_id`` (content with CRLF ends)."""

    def load(queue_id: str) -> Deferred[tuple[Envelope, bytes]]:
        """Read a committed message back; fails with MessageNotFound or SpoolCorruption."""

    def remove(queue_ids: Iterable[str]) -> Deferred[None]:
        """Delete messages; ids that are already gone are ignored.

        The deletion need not survive a crash: a removed message may come back, and
        whoever removes must cope with that (the node does, at start-up).
        """

    def quarantine(queue_ids: Iterable[str]) -> Deferred[Path]:
        """Move committed messages aside (out of the queue), keeping them; fire with where."""

    def queue_ids() -> Deferred[list[str]]:
        """Every committed queue id, sorted."""

    def recover() -> Deferred[int]:
        """At start-up, before anything else: discard uncommitted leftovers; return their count."""

    def free_space() -> Deferred[int]:
        """Bytes available to this process on the spool's filesystem."""

    def close() -> Deferred[None]:
        """Refuse new work and fire once every operation in flight has finished."""
