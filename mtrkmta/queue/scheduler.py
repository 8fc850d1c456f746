"""Scheduler: when each message's next queue run is due, and which runs may start now.

The queue's clockwork, apart from what a run does (OpenSMTPD keeps its scheduler
apart from its queue the same way): a heap of due times with one timer for the
earliest, forced runs, and a limit on the runs in progress. It needs only a clock
and the function that starts a run.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Scheduler:
    """Starts ``start(queue_id, forced)`` for each message when it is due, at most
    ``max_active`` at a time; the Deferred ``start`` returns must not fail, and the
    message counts as active until it fires.

    A message asked for while its run is in progress is remembered and scheduled
    when that run ends (a retry time the run set itself must not become an
    immediate new run). A full scheduler arms no timer: a finishing run starts the
    next due message, so a full queue never spins the reactor.
    """

    def __init__(
        self,
        clock: IReactorTime,
        start: Callable[[str, bool], Deferred[None]],
        max_active: int = 200,
    ) -> None:
        self.clock = clock
        self.max_active = max_active
        self._start_run = start
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}
        self._sequence = itertools.count()
        self._timer: IDelayedCall | None = None
        self._active: dict[str, Deferred[None]] = {}
        self._forced: set[str] = set()
        self._again: dict[str, float] = {}  # asked for while its run was in progress: when
        self._running = False

    @property
    def waiting(self) -> int:
        """How many messages are scheduled for a later run."""
        return len(self._due)

    @property
    def running(self) -> bool:
        return self._running

    def run(self) -> None:
        """Start runs as they come due."""
        self._running = True
        self._arm()

    def stop(self) -> list[Deferred[None]]:
        """Start nothing more; return the runs still in progress."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return list(self._active.values())

    def schedule(self, queue_id: str, when: float, *, force: bool = False) -> None:
        """Run ``queue_id`` at ``when`` (or earlier if it is already due earlier);
        ``force``: the run ignores retry times."""
        if force:
            self._forced.add(queue_id)
        if queue_id in self._active:
            self._again[queue_id] = min(when, self._again.get(queue_id, when))
            return
        current = self._due.get(queue_id)
        if current is not None and current <= when:
            return
        self._due[queue_id] = when
        heapq.heappush(self._heap, (when, next(self._sequence), queue_id))
        self._arm()

    def forget(self, queue_id: str) -> None:
        """The message is gone: drop its due time."""
        self._due.pop(queue_id, None)

    def in_progress(self, queue_id: str) -> Deferred[None] | None:
        """The run of ``queue_id`` in progress, if any."""
        return self._active.get(queue_id)

    @property
    def active(self) -> int:
        """How many runs are in progress."""
        return len(self._active)

    def _arm(self) -> None:
        if not self._running or len(self._active) >= self.max_active:
            # Full: a finishing run re-arms (_finished). A timer now would find
            # nothing to start and re-arm itself at once, spinning the reactor.
            return
        while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # stale entry: rescheduled or already taken
        if not self._heap:
            return
        delay = max(0.0, self._heap[0][0] - self.clock.seconds())
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        while self._heap and len(self._active) < self.max_active:
            when, _, queue_id = self._heap[0]
            if self._due.get(queue_id) != when:
                heapq.heappop(self._heap)
                continue
            if when > now:
                break
            heapq.heappop(self._heap)
            del self._due[queue_id]
            self._start(queue_id)
        self._arm()

    def _start(self, queue_id: str) -> None:
        force = queue_id in self._forced
        self._forced.discard(queue_id)
        d = self._start_run(queue_id, force)
        self._active[queue_id] = d
        d.addBoth(self._finished, queue_id)

    def _finished(self, _: object, queue_id: str) -> None:
        del self._active[queue_id]
        again = self._again.pop(queue_id, None)
        if again is not None and self._running:
            self.schedule(queue_id, again)
        self._arm()
        if self._heap and self._timer is None:
            self._wake()
