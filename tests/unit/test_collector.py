"""The garbage collector's settings of a server process (mtrkmta.collector)."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mtrkmta.collector import YOUNG_THRESHOLD, tune_collector


class FakeCollector:
    """Records what was asked of it, in order."""

    def __init__(self) -> None:
        self.threshold = (700, 10, 10)
        self.calls: list[str] = []

    def get_threshold(self) -> tuple[int, int, int]:
        return self.threshold

    def set_threshold(self, threshold0: int, threshold1: int, threshold2: int, /) -> None:
        self.threshold = (threshold0, threshold1, threshold2)
        self.calls.append("set_threshold")

    def collect(self, generation: int = 2) -> int:
        self.calls.append(f"collect({generation})")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")


def test_the_young_threshold_rises_at_once_and_the_older_ones_stay():
    collector = FakeCollector()
    tune_collector(Deferred(), collector)
    assert collector.threshold == (YOUNG_THRESHOLD, 10, 10)
    assert collector.calls == ["set_threshold"]


def test_the_heap_is_collected_then_frozen_once_the_node_has_started():
    collector = FakeCollector()
    ready: Deferred[str] = Deferred()
    tune_collector(ready, collector)
    ready.callback("node")
    assert collector.calls == ["set_threshold", "collect(2)", "freeze"]
    results: list[str] = []
    ready.addCallback(results.append)
    assert results == ["node"]  # the node passes on to later callbacks


def test_a_start_that_fails_freezes_nothing_and_still_fails():
    collector = FakeCollector()
    ready: Deferred[str] = Deferred()
    tune_collector(ready, collector)
    ready.errback(Failure(RuntimeError("port in use")))
    assert collector.calls == ["set_threshold"]
    failures: list[Failure] = []
    ready.addErrback(failures.append)
    assert failures[0].check(RuntimeError)


def test_the_real_gc_module_fits_the_protocol():
    import gc

    before = gc.get_threshold()
    tune_collector(Deferred(), gc)  # the Deferred never fires: nothing frozen
    try:
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:])
    finally:
        gc.set_threshold(*before)
