"""Worker processes: more nodes on one machine, sharing the master's SMTP ports and database.

With ``server.workers = N`` the process twistd runs (the master, worker 0) starts
N - 1 worker processes once its own listeners are open. Each worker is a whole
node (receiver, spool, queue, transports) with its own directory
``<data_dir>/workers/<k>`` (spool, control socket) and its own node id
``<node_id>.w<k>``, on the master's tracking database, so each queue delivers
only what its own process accepted and every crash-safety rule of one node
holds per worker. Workers accept on the master's SMTP and submission sockets,
inherited as file descriptors: the kernel hands each new connection to one of
the processes waiting on it. LMTP and MTQP stay with the master; the
master passes SIGHUP (reload) on to every worker. Local mail goes to the master's Maildirs.

A worker that exits is started again (after 1 s, doubling to at most 60 s while
it keeps failing). A worker notices the master's end by the end of its standard
input (a pipe the master keeps open) and stops. A worker directory beyond the
configured count whose spool still holds mail gets a worker without listeners,
so that mail is delivered.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from mtrkmta.config import Config, Override, load_config
from mtrkmta.metrics import METRICS_FILE

log = Logger()

WORKERS_DIR = "workers"
SHARED_LISTENERS = ("smtp", "submission")
FIRST_FD = 3  # the inherited listening sockets start here in a worker
MAX_RESTART_DELAY = 60.0


@dataclass(frozen=True)
class WorkerRole:
    """What makes a node a worker: its number, its inherited listening sockets, and the
    CPUs its master could run on when it started (``server.cpu_affinity``)."""

    index: int
    listen_fds: Mapping[str, tuple[int, int]]  # listener -> (fd, address family)
    cpus: tuple[int, ...] = ()

    def node_config(self, config: Config) -> Config:
        """The worker's own view of the master's configuration."""
        return replace(
            config,
            data_dir=worker_dir(config.data_dir, self.index),
            node_id=f"{config.node_id}.w{self.index}",
        )


@dataclass(frozen=True)
class ConfigOrigin:
    """Where the master's configuration came from, so a worker can load the same one."""

    path: Path | None
    overrides: tuple[Override, ...]

    def encode(
        self, index: int, listen_fds: Mapping[str, tuple[int, int]], cpus: Sequence[int] = ()
    ) -> bytes:
        document = {
            "path": None if self.path is None else str(self.path),
            "overrides": [[o.source, o.key, _plain(o.value)] for o in self.overrides],
            "index": index,
            "listen_fds": {name: list(fd) for name, fd in listen_fds.items()},
            "cpus": list(cpus),
        }
        return json.dumps(document).encode() + b"\n"


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def decode(line: bytes) -> tuple[Config, WorkerRole, ConfigOrigin]:
    """The configuration and role a master sent, and where the configuration comes from (a
    reload loads it again). Blocking: loads the config file."""
    document = json.loads(line)
    overrides = tuple(
        Override(source, key, tuple(value) if isinstance(value, list) else value)
        for source, key, value in document["overrides"]
    )
    path = None if document["path"] is None else Path(document["path"])
    config = load_config(path, overrides)
    fds = {name: (int(fd), int(family)) for name, (fd, family) in document["listen_fds"].items()}
    cpus = tuple(int(cpu) for cpu in document.get("cpus", ()))
    role = WorkerRole(int(document["index"]), fds, cpus)
    return config, role, ConfigOrigin(path, overrides)


def worker_dir(data_dir: Path, index: int) -> Path:
    return data_dir / WORKERS_DIR / str(index)


def has_queued_mail(directory: Path) -> bool:
    """Whether a worker directory's spool still holds a message file (blocking)."""
    queue = directory / "spool" / "queue"
    try:
        return any(any(bucket.iterdir()) for bucket in queue.iterdir() if bucket.is_dir())
    except FileNotFoundError:
        return False


def metrics_files(data_dir: Path) -> list[Path]:
    """The metrics file each worker writes in its directory, of those there (blocking)."""
    return sorted((data_dir / WORKERS_DIR).glob(f"*/{METRICS_FILE}"))


def draining_workers(data_dir: Path, count: int) -> list[int]:
    """Worker numbers from ``count`` up whose directory still holds mail (blocking)."""
    try:
        names = [p.name for p in (data_dir / WORKERS_DIR).iterdir()]
    except FileNotFoundError:
        return []
    numbers = sorted(int(n) for n in names if n.isdigit() and int(n) >= count)
    return [n for n in numbers if has_queued_mail(worker_dir(data_dir, n))]


def shared_sockets(ports: Mapping[str, IListeningPort]) -> dict[str, tuple[int, int]]:
    """The master's listening TCP sockets that workers share: listener -> (fd, family).

    A listener with TLS from the first byte (an ``ssl:`` endpoint) stays with the
    master: a worker adopts plain TCP sockets only.
    """
    shared = {}
    for name in SHARED_LISTENERS:
        port = ports.get(name)
        sock = getattr(port, "socket", None)
        if isinstance(getattr(port, "factory", None), TLSMemoryBIOFactory):
            continue
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            shared[name] = (sock.fileno(), int(sock.family))
    return shared


def take_turns(port: IListeningPort) -> None:
    """Make a listening port that processes share accept one connection per wake-up.

    Twisted's TCP port accepts up to ``numberAccepts`` connections each time its
    socket is readable: 100 at first, then about as many as it found waiting. On a
    socket shared by several processes the first one woken would take a whole
    burst (the 20 sessions a client opens together all land in one process, which
    then does all their work while the others idle). Taking one at a time lets the
    kernel's wake-ups spread them: a busy process comes back to the socket later,
    so an idle one takes the next connection.
    """
    read = port.doRead  # type: ignore[attr-defined]

    def read_one() -> object:
        port.numberAccepts = 1  # type: ignore[attr-defined]
        return read()

    port.doRead = read_one  # type: ignore[attr-defined]


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int, payload: bytes) -> None:
        self.supervisor = supervisor
        self.index = index
        self.payload = payload
        self.started = supervisor.reactor.seconds()
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        # The worker's stdin stays open: its end tells the worker the master is gone.
        self.transport.write(self.payload)  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.supervisor._ended(self, reason)


class WorkerSupervisor:
    """Starts, restarts and stops the worker processes of one master."""

    def __init__(
        self,
        reactor: Any,
        origin: ConfigOrigin,
        shared: Mapping[str, tuple[int, int]],
        *,
        count: int,
        draining: Sequence[int] = (),
        cpus: Sequence[int] = (),
    ) -> None:
        """``cpus``: the CPUs the master could run on when it started, for each worker
        to pin itself to one of (``server.cpu_affinity``, :mod:`mtrkmta.affinity`)."""
        self.reactor = reactor
        self.cpus = tuple(cpus)
        self.origin = origin
        self.shared = dict(shared)
        self.numbers = [*range(1, count), *draining]
        self.draining = set(draining)
        self._running: dict[int, _WorkerProtocol] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._delay: dict[int, float] = {}
        self._stopping = False

    @property
    def running(self) -> int:
        """How many worker processes are running now."""
        return len(self._running)

    def start(self) -> None:
        for index in self.numbers:
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        shared = {} if index in self.draining else self.shared
        child_fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2}
        listen_fds = {}
        for offset, (name, (fd, family)) in enumerate(sorted(shared.items())):
            child_fds[FIRST_FD + offset] = fd
            listen_fds[name] = (FIRST_FD + offset, family)
        process = _WorkerProtocol(self, index, self.origin.encode(index, listen_fds, self.cpus))
        self.reactor.spawnProcess(
            process,
            sys.executable,
            [sys.executable, "-m", "mtrkmta.cli.worker"],
            env=dict(os.environ),
            childFDs=child_fds,
        )
        self._running[index] = process
        log.info(
            "worker {index} started (pid {pid}){role}",
            index=index,
            pid=process.transport.pid,  # type: ignore[union-attr]
            role=" without listeners, to deliver its queue" if not shared else "",
        )

    def _ended(self, process: _WorkerProtocol, reason: Failure) -> None:
        index = process.index
        self._running.pop(index, None)
        if self._stopping:
            return
        if self.reactor.seconds() - process.started > MAX_RESTART_DELAY:
            self._delay.pop(index, None)  # it ran well for a while: start again soon
        delay = self._delay.get(index, 0.5) * 2
        self._delay[index] = min(delay, MAX_RESTART_DELAY)
        log.error(
            "worker {index} ended ({reason}): starting it again in {delay:g} s",
            index=index,
            reason=reason.getErrorMessage(),
            delay=self._delay[index],
        )
        self._restarts[index] = self.reactor.callLater(self._delay[index], self._spawn, index)

    def signal(self, name: str) -> None:
        """Send signal ``name`` (``"HUP"``: reload) to every running worker."""
        for process in self._running.values():
            process.transport.signalProcess(name)  # type: ignore[union-attr]

    def stop(self, grace: float) -> Deferred[Any]:
        """SIGTERM every worker; SIGKILL those still running after ``grace`` seconds."""
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        running = list(self._running.values())
        for process in running:
            process.transport.signalProcess("TERM")  # type: ignore[union-attr]
        kill = self.reactor.callLater(grace, self._kill)
        done = DeferredList([p.ended for p in running])

        def finished(result: object) -> object:
            if kill.active():
                kill.cancel()
            return result

        return done.addBoth(finished)

    def _kill(self) -> None:
        for index, process in list(self._running.items()):
            log.warn("worker {index} ignored SIGTERM: killed", index=index)
            process.transport.signalProcess("KILL")  # type: ignore[union-attr]
