"""The log lines of one reactor turn in one write (mtrkmta.logfile.BatchedOutput)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.python import threadable
from zope.interface import implementer

from mtrkmta.config import Logging
from mtrkmta.logfile import ATOMIC_WRITE, BatchedOutput, configured_observer


class Recorded:
    """A text stream that keeps each write and counts the flushes."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        self.flushes += 1


@pytest.fixture(autouse=True)
def reactor_thread() -> Iterator[None]:
    """This thread is the reactor's (as it is when a reactor runs here)."""
    saved = threadable.ioThread
    threadable.ioThread = threadable.getThreadID()
    yield
    threadable.ioThread = saved


@implementer(IReactorFromThreads)
class Reactor(MemoryReactorClock):
    """A running reactor that also takes calls from other threads."""

    def __init__(self) -> None:
        super().__init__()
        self.running = True
        self.from_threads: list[Callable[[], Any]] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.from_threads.append(lambda: f(*args, **kwargs))


def _logger(reactor: Reactor, out: Recorded) -> Logger:
    observer = configured_observer(Logging(), out=out, reactor=reactor)  # type: ignore[arg-type]
    return Logger(namespace="mtrkmta.test", observer=observer)


def test_the_lines_of_one_turn_go_out_in_one_write_at_its_end():
    reactor, out = Reactor(), Recorded()
    log = _logger(reactor, out)
    for n in range(5):
        log.info("line {n}", n=n)
    assert out.writes == []
    reactor.advance(0)  # the end of the turn
    (written,) = out.writes
    assert [line.split("] ", 1)[1] for line in written.splitlines()] == [
        f"line {n}" for n in range(5)
    ]
    assert out.flushes == 1
    log.info("next turn")
    reactor.advance(0)
    assert len(out.writes) == 2 and out.writes[1].endswith("] next turn\n")


def test_a_warning_goes_out_at_once_with_the_lines_before_it():
    reactor, out = Reactor(), Recorded()
    log = _logger(reactor, out)
    log.info("before")
    log.warn("something is wrong")
    assert len(out.writes) == 1
    assert out.writes[0].count("\n") == 2 and "something is wrong" in out.writes[0]


def test_without_a_running_reactor_every_line_goes_out_at_once():
    reactor, out = Reactor(), Recorded()
    reactor.running = False  # start-up, or after the reactor stopped
    log = _logger(reactor, out)
    log.info("one")
    log.info("two")
    assert len(out.writes) == 2


def test_lines_waiting_when_the_reactor_stops_are_written_after_shutdown():
    reactor, out = Reactor(), Recorded()
    log = _logger(reactor, out)
    log.info("last words")
    ((written_at_shutdown, args, kwargs),) = reactor.triggers["after"]["shutdown"]
    written_at_shutdown(*args, **kwargs)
    assert len(out.writes) == 1 and out.writes[0].endswith("] last words\n")


def test_a_full_batch_is_written_at_once():
    reactor, out = Reactor(), Recorded()
    stream = BatchedOutput(out, reactor, limit=100, in_reactor_thread=lambda: True)  # type: ignore[arg-type]
    stream.write("x" * 60 + "\n")
    assert out.writes == []
    stream.write("y" * 60 + "\n")
    assert out.writes == ["x" * 60 + "\n" + "y" * 60 + "\n"]


def test_one_write_never_holds_more_than_pipe_buf_and_never_splits_a_line():
    # The workers share the master's standard output: a write of at most PIPE_BUF
    # octets to a pipe is never interleaved with another process's.
    reactor, out = Reactor(), Recorded()
    stream = BatchedOutput(out, reactor, in_reactor_thread=lambda: True)  # type: ignore[arg-type]
    lines = [f"{n:04d} " + "é" * 300 + "\n" for n in range(40)]  # 606 octets each
    long_line = "z" * (ATOMIC_WRITE + 10) + "\n"
    for line in [*lines[:20], long_line, *lines[20:]]:
        stream.write(line)
    reactor.advance(0)
    assert "".join(out.writes) == "".join([*lines[:20], long_line, *lines[20:]])
    assert long_line in out.writes
    for written in out.writes:
        assert written.endswith("\n")
        assert written == long_line or len(written.encode("utf-8")) <= ATOMIC_WRITE
    assert len(out.writes) == 1 + 2 * 4  # 6 lines per write, 20 lines on each side


def test_a_line_from_another_thread_is_written_by_the_reactor_thread():
    reactor, out = Reactor(), Recorded()
    stream = BatchedOutput(out, reactor, in_reactor_thread=lambda: False)  # type: ignore[arg-type]
    stream.write("from a pool thread\n")
    stream.write("and another\n")
    assert out.writes == [] and len(reactor.from_threads) == 1
    reactor.from_threads[0]()
    assert out.writes == ["from a pool thread\nand another\n"]


def test_a_line_logged_while_a_write_is_under_way_waits_for_nothing():
    # Twisted's SIGTERM handler logs from a signal handler, which may run in the middle
    # of a write of this very stream: that line must neither deadlock nor be lost.
    reactor = Reactor()
    stream: BatchedOutput

    class Interrupted(Recorded):
        def write(self, text: str) -> int:
            if not self.writes:
                stream.write("Received SIGTERM, shutting down.\n")
                stream.write_pending()  # as at_once would, with the reactor stopping
            return super().write(text)

    out = Interrupted()
    stream = BatchedOutput(out, reactor, in_reactor_thread=lambda: True)  # type: ignore[arg-type]
    stream.write("first\n")
    stream.write_pending()
    assert out.writes == ["first\n", "Received SIGTERM, shutting down.\n"]
