"""A worker process of ``server.workers`` (see :mod:`mtrkmta.workers`): reads its
configuration from the master on standard input, runs one node, stops when the
master's end of the pipe closes. Started by the master as ``python -m mtrkmta.cli.worker``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import abstract
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.main import CONNECTION_DONE
from twisted.logger import Logger, globalLogBeginner
from twisted.python.failure import Failure

log = Logger()


class _MasterWatch(abstract.FileDescriptor):
    """Standard input of a worker: its end (the master is gone) stops the worker."""

    def __init__(self, reactor: Any, gone: Callable[[], object]) -> None:
        super().__init__(reactor)
        self._gone = gone

    def fileno(self) -> int:
        return 0

    def doRead(self) -> Any:
        if not os.read(0, 4096):
            return CONNECTION_DONE
        return None

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._gone()


def main() -> int:
    """A worker process: ``python -m mtrkmta.cli.worker``, started by a master only."""
    # The master passes SIGHUP on (a reload). One that comes while this process is still
    # starting must neither kill it nor be lost: it is kept, and the node reloads once up.
    # So the node's modules are imported only after this (they take a second or so).
    early: list[int] = []
    signal.signal(signal.SIGHUP, lambda number, _: early.append(number))
    from twisted.internet import reactor

    from mtrkmta.affinity import pin_process
    from mtrkmta.collector import tune_collector
    from mtrkmta.logfile import configured_observer
    from mtrkmta.service import MTAService
    from mtrkmta.workers import decode

    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(0, 65536)
        if not chunk:
            print("mtrkmta worker: no configuration on standard input", file=sys.stderr)
            return 2
        line += chunk
    config, role, origin = decode(line)
    if config.cpu_affinity:  # before any thread starts: they inherit the CPU
        pin_process(role.index, role.cpus)
    globalLogBeginner.beginLoggingTo(
        [configured_observer(config.logging, f"worker {role.index}", reactor=reactor)],
        redirectStandardIO=False,
    )
    # The origin lets a reload read the configuration again; a worker starts no workers.
    service = MTAService(config, reactor, worker=role, origin=origin)
    # The master passes SIGHUP on: reload as it does. Only the master notifies systemd.
    threads = IReactorFromThreads(reactor)
    signal.signal(signal.SIGHUP, lambda *_: threads.callFromThread(service.reload))
    if early:
        reactor.callWhenRunning(service.reload)  # runs once the node has started
    status = []

    def failed(failure: Failure) -> None:
        log.failure("mtrkmta worker {index} could not start", failure, index=role.index)
        status.append(1)
        reactor.stop()

    def stop() -> None:
        if reactor.running:
            reactor.stop()

    tune_collector(service.ready)  # first: a failed start must freeze nothing
    service.ready.addErrback(failed)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    watch = _MasterWatch(reactor, stop)
    reactor.callWhenRunning(watch.startReading)
    reactor.run()
    return status[0] if status else 0


if __name__ == "__main__":
    raise SystemExit(main())
