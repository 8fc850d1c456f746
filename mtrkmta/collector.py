"""The garbage collector's settings for a server process: fewer young collections, start-up frozen.

CPython's cyclic collector runs a young collection every 700 new container objects and,
now and then, a full one that walks every object in the process. A node holds about
80,000 objects once started (modules, SQLAlchemy's compiled statements, the reactor),
nearly all of them for its whole life, so each full collection took about 30 ms, during
which no session is served (doc/performance.rst, "What each lever of issue #20 gave").

:func:`tune_collector` raises the young threshold to ``YOUNG_THRESHOLD`` at once and,
once the node has started, collects once and freezes what survived: later collections
walk only what was made since. Only the process's entry points call it (``twistd
mtrkmta`` and a worker), never the service itself, so that tests running many nodes in
one process keep the collector's defaults.
"""

from __future__ import annotations

import gc
from typing import Protocol, TypeVar

from twisted.internet.defer import Deferred

YOUNG_THRESHOLD = 5000
"""Young collections every this many new container objects (CPython's default: 700)."""

T = TypeVar("T")


class Collector(Protocol):
    """The parts of the :mod:`gc` module used here."""

    def get_threshold(self) -> tuple[int, int, int]: ...

    def set_threshold(self, threshold0: int, threshold1: int, threshold2: int, /) -> None: ...

    def collect(self, generation: int = 2) -> int: ...

    def freeze(self) -> None: ...


def tune_collector(ready: Deferred[T], collector: Collector = gc) -> None:
    """Raise the young threshold now; freeze the heap once ``ready`` fires with the node
    started. ``ready``'s result passes on unchanged; call this before adding a handler
    that recovers from a failed start, so that a start that fails freezes nothing."""
    _, middle, old = collector.get_threshold()
    collector.set_threshold(YOUNG_THRESHOLD, middle, old)

    def started(node: T) -> T:
        collector.collect()
        collector.freeze()
        return node

    ready.addCallback(started)
