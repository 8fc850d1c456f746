"""Micro-benchmarks behind doc/performance.rst's "not kept" levers (CPU of one process).

usage: python bench/microbench.py parse     # framing + command + reply parsing of one message
       python bench/microbench.py handoff   # a commit-thread round trip: Twisted's pool
                                            # against a thread fed by queue.SimpleQueue
Run ``parse`` once with the pure-Python modules and once with PYTHONPATH pointing at a
copy where ``mypyc`` compiled mtrkmta/smtp/{framing,reply,command,params,xtext}.py.
"""

from __future__ import annotations

import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

LINES = (
    b"MAIL FROM:<sender@example.test> SIZE=1000 BODY=8BITMIME\r\n"
    b"RCPT TO:<rcpt@example.test> NOTIFY=SUCCESS ORCPT=rfc822;rcpt@example.test\r\n"
    b"DATA\r\n"
)
REPLIES = (
    b"250-mx.example.test\r\n", b"250-PIPELINING\r\n", b"250-SIZE 10240000\r\n",
    b"250 8BITMIME\r\n", b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n", b"354 End data\r\n",
    b"250 2.0.0 Ok: queued as X\r\n",
)  # fmt: skip


def parse(repeat: int = 20000) -> None:
    """CPU per message of the parsing a relayed message needs, median of five runs."""
    from mtrkmta.smtp import command, framing, reply

    def once() -> float:
        started = time.process_time()
        for _ in range(repeat):
            framer = framing.LineFramer(1000)
            framer.push(LINES)
            while (line := framer.next_line()) is not None:
                assert isinstance(line, bytes)
                parsed = command.parse_command(line)
                if parsed.verb == "MAIL":
                    command.parse_mail(parsed.argument)
            reader = reply.ReplyReader()
            for text in REPLIES:
                reader.feed(text)
        return time.process_time() - started

    runs = [once() for _ in range(5)]
    where = framing.__file__.rsplit("/", 1)[-1]
    print(f"parse ({where}): {statistics.median(runs) * 1e6 / repeat:.1f} us per message")


class SimpleQueueThread:
    """One thread fed by queue.SimpleQueue, with ThreadPool's callInThreadWithCallback."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            on_result, function, args = job
            try:
                result, ok = function(*args), True
            except BaseException as error:
                result, ok = error, False
            on_result(ok, result)

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, object], None], function: Callable[..., object], *args: Any
    ) -> None:
        self._jobs.put((on_result, function, args))


def handoff(repeat: int = 20000) -> None:
    """Reactor -> thread -> reactor round trips, one at a time, both kinds alternating."""
    from twisted.internet import reactor
    from twisted.internet.defer import inlineCallbacks
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool

    @inlineCallbacks
    def run() -> Generator[Any, Any, None]:
        for kind in ("twisted", "simplequeue") * 3:
            pool: Any = ThreadPool(1, 1) if kind == "twisted" else SimpleQueueThread()
            pool.start()
            started, cpu = time.perf_counter(), time.process_time()
            for i in range(repeat):
                yield deferToThreadPool(reactor, pool, int, i)
            wall = (time.perf_counter() - started) * 1e6 / repeat
            used = (time.process_time() - cpu) * 1e6 / repeat
            print(f"handoff ({kind}): {wall:.1f} us wall, {used:.1f} us CPU per round trip")
            pool.stop()
        reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()


if __name__ == "__main__":
    {"parse": parse, "handoff": handoff}[sys.argv[1] if len(sys.argv) > 1 else "parse"]()
