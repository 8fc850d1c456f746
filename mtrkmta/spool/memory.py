"""MemorySpool: the spool in a dict, for tests driven by a clock alone.

It answers as ``FileSpool`` does (the contract tests in
``tests/integration/test_spool_contract.py`` run against both), keeps nothing
across a restart of the process, and fires every Deferred before returning.
``damage`` makes a stored message unreadable, as a broken disk makes a file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import PurePath
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mtrkmta.envelope import Envelope
from mtrkmta.spool import interfaces
from mtrkmta.spool.filespool import check_queue_id
from mtrkmta.spool.interfaces import IIncoming, ISpool, QuarantinedFile

QUARANTINE = PurePath("memory:", "quarantine")
R = TypeVar("R")


@implementer(IIncoming)
class _MemoryIncoming:
    """A message arriving into a MemorySpool: content gathered, then stored."""

    def __init__(self, spool: MemorySpool, queue_id: str) -> None:
        self.queue_id = queue_id
        self.size = 0
        self._spool = spool
        self._parts: list[bytes] = []
        self._closed = False

    def write(self, data: bytes) -> Deferred[None] | None:
        if self._closed:
            raise interfaces.SpoolError(f"{self.queue_id}: content written after commit or discard")
        self._parts.append(bytes(data))
        self.size += len(data)
        return None

    def commit(self, envelope: Envelope) -> Deferred[bytes | None]:
        if self._closed:
            return fail(interfaces.SpoolError(f"{self.queue_id}: already committed or discarded"))
        if envelope.queue_id != self.queue_id:
            return fail(ValueError(f"envelope of {envelope.queue_id} for {self.queue_id}"))
        self._closed = True
        self._spool._arriving.discard(self.queue_id)
        content = b"".join(self._parts)
        return self._spool.store(envelope, content).addCallback(lambda _: content)

    def discard(self) -> None:
        self._closed = True
        self._spool._arriving.discard(self.queue_id)


@implementer(ISpool)
class MemorySpool:
    """``ISpool`` in memory; ``free`` is what ``free_space`` reports."""

    def __init__(self, *, free: int = 1 << 40) -> None:
        self.free = free
        self.unwritable: str | None = None  # set: ``probe`` fails with this problem
        self._queue: dict[str, tuple[Envelope, bytes]] = {}
        self._quarantine: dict[str, tuple[Envelope, bytes]] = {}
        self._damaged: dict[str, str] = {}
        self._arriving: set[str] = set()
        self._closed = False

    def damage(self, queue_id: str, problem: str = "checksum mismatch") -> None:
        """Make the stored message unreadable (interfaces.SpoolCorruption) until ``repair``."""
        self._damaged[queue_id] = problem

    def repair(self, queue_id: str) -> None:
        self._damaged.pop(queue_id, None)

    # -- ISpool ------------------------------------------------------------------

    def store(self, envelope: Envelope, content: bytes) -> Deferred[None]:
        def stored() -> None:
            queue_id = self._usable(envelope.queue_id)
            if queue_id in self._queue:
                raise interfaces.DuplicateQueueId(f"{queue_id}: already stored")
            self._queue[queue_id] = (envelope, bytes(content))

        return self._answer(stored)

    def incoming(self, queue_id: str) -> IIncoming:
        check_queue_id(queue_id)
        if queue_id in self._arriving:
            raise interfaces.DuplicateQueueId(f"{queue_id}: already being stored")
        self._arriving.add(queue_id)
        return _MemoryIncoming(self, queue_id)

    def load(self, queue_id: str) -> Deferred[tuple[Envelope, bytes]]:
        return self._answer(lambda: self._whole(queue_id, self._queue))

    def remove(self, queue_ids: Iterable[str]) -> Deferred[None]:
        def removed() -> None:
            for queue_id in [self._usable(q) for q in queue_ids]:
                self._queue.pop(queue_id, None)

        return self._answer(removed)

    def quarantine(self, queue_ids: Iterable[str]) -> Deferred[Any]:
        def moved() -> PurePath:
            for queue_id in [self._usable(q) for q in queue_ids]:
                if queue_id in self._queue:
                    self._quarantine[queue_id] = self._queue.pop(queue_id)
            return QUARANTINE

        return self._answer(moved)

    def quarantined(self) -> Deferred[list[QuarantinedFile]]:
        return succeed(
            [
                QuarantinedFile(queue_id, len(content), 0.0)
                for queue_id, (_, content) in sorted(self._quarantine.items())
            ]
        )

    def unquarantine(self, queue_id: str) -> Deferred[tuple[Envelope, bytes]]:
        def moved_back() -> tuple[Envelope, bytes]:
            message = self._whole(queue_id, self._quarantine)
            if queue_id in self._queue:
                raise interfaces.DuplicateQueueId(queue_id)
            self._queue[queue_id] = self._quarantine.pop(queue_id)
            return message

        return self._answer(moved_back)

    def drop_quarantined(self, queue_id: str) -> Deferred[bool]:
        def dropped() -> bool:
            return self._quarantine.pop(self._usable(queue_id), None) is not None

        return self._answer(dropped)

    def queue_ids(self) -> Deferred[list[str]]:
        return succeed(sorted(self._queue))

    def recover(self) -> Deferred[int]:
        leftovers = len(self._arriving)
        self._arriving.clear()
        return succeed(leftovers)

    def free_space(self) -> Deferred[int]:
        return succeed(self.free)

    def probe(self) -> Deferred[None]:
        return self._answer(self._probe)

    def close(self) -> Deferred[None]:
        self._closed = True
        return succeed(None)

    # -- internals ------------------------------------------------------------

    @staticmethod
    def _answer(work: Callable[[], R]) -> Deferred[R]:
        """Do ``work`` now; what it raises fails the Deferred, as a thread's would."""
        try:
            return succeed(work())
        except (interfaces.SpoolError, ValueError) as error:
            return fail(error)

    def _whole(
        self, queue_id: str, where: dict[str, tuple[Envelope, bytes]]
    ) -> tuple[Envelope, bytes]:
        """The message as stored in ``where``, unless it is missing or damaged."""
        self._usable(queue_id)
        if queue_id not in where:
            raise interfaces.MessageNotFound(queue_id)
        if queue_id in self._damaged:
            raise interfaces.SpoolCorruption(f"{queue_id}: {self._damaged[queue_id]}")
        return where[queue_id]

    def _probe(self) -> None:
        if self._closed:
            raise interfaces.SpoolError("spool is closed")
        if self.unwritable is not None:
            raise interfaces.SpoolError(self.unwritable)

    def _usable(self, queue_id: str) -> str:
        if self._closed:
            raise interfaces.SpoolError("spool is closed")
        return check_queue_id(queue_id)
