"""Scheduler on a Clock alone: due times, the limit on runs in progress, forced runs,
a message asked for during its own run, and no spinning when full."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mtrkmta.queue.scheduler import Scheduler


class Runs:
    """The start function: records each run and keeps it open until ended."""

    def __init__(self) -> None:
        self.started: list[tuple[str, bool]] = []
        self.open: dict[str, Deferred[None]] = {}

    def __call__(self, queue_id: str, forced: bool) -> Deferred[None]:
        self.started.append((queue_id, forced))
        d: Deferred[None] = Deferred()
        self.open[queue_id] = d
        return d

    def end(self, queue_id: str) -> None:
        self.open.pop(queue_id).callback(None)


def scheduler(max_active: int = 10) -> tuple[Clock, Runs, Scheduler]:
    clock = Clock()
    runs = Runs()
    return clock, runs, Scheduler(clock, runs, max_active)


def test_runs_start_when_due_in_order():
    clock, runs, s = scheduler()
    s.run()
    s.schedule("b", 20)
    s.schedule("a", 10)
    s.schedule("b", 30)  # later than already due: ignored
    clock.advance(9)
    assert runs.started == []
    clock.advance(1)
    assert runs.started == [("a", False)]
    clock.advance(10)
    assert runs.started == [("a", False), ("b", False)]
    assert s.active == 2


def test_nothing_starts_before_run_or_after_stop():
    clock, runs, s = scheduler()
    s.schedule("a", 0)
    clock.advance(1)
    assert runs.started == []
    s.run()
    clock.advance(0)
    assert runs.started == [("a", False)]
    s.schedule("b", 5)
    assert s.stop() == [runs.open["a"]]
    clock.advance(10)
    assert runs.started == [("a", False)]
    assert clock.getDelayedCalls() == []


def test_the_limit_waits_for_a_finishing_run_without_a_timer():
    clock, runs, s = scheduler(max_active=2)
    s.run()
    for name in "abcd":
        s.schedule(name, 0)
    clock.advance(0)
    assert [q for q, _ in runs.started] == ["a", "b"]
    assert clock.getDelayedCalls() == []  # full: no timer that would fire and re-arm
    runs.end("a")
    clock.advance(0)
    assert [q for q, _ in runs.started] == ["a", "b", "c"]
    runs.end("b")
    runs.end("c")
    clock.advance(0)
    assert [q for q, _ in runs.started] == ["a", "b", "c", "d"]
    assert s.active == 1


def test_a_forced_run_says_so_once():
    clock, runs, s = scheduler()
    s.run()
    s.schedule("a", 0, force=True)
    clock.advance(0)
    runs.end("a")
    s.schedule("a", 1)
    clock.advance(1)
    assert runs.started == [("a", True), ("a", False)]


def test_asked_for_during_its_run_it_runs_again_after_it():
    clock, runs, s = scheduler()
    s.run()
    s.schedule("a", 0)
    clock.advance(0)
    assert s.in_progress("a") is runs.open["a"]
    s.schedule("a", 100)  # e.g. the run set its own retry time
    runs.end("a")
    assert s.in_progress("a") is None
    assert runs.started == [("a", False)]  # not at once: at its time
    clock.advance(100)
    assert runs.started == [("a", False), ("a", False)]


def test_a_forgotten_message_does_not_run():
    clock, runs, s = scheduler()
    s.run()
    s.schedule("a", 5)
    s.forget("a")
    clock.advance(10)
    assert runs.started == []
