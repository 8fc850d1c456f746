"""Which CPU each process of a node runs on (``server.cpu_affinity``).

With ``server.workers`` equal to the number of CPUs, two processes pinned to a CPU each
relayed 19 % (scenario a) and 28 % (e) more mail in bench/, at 8 to 10 % less CPU per
message (doc/performance.rst, "What each lever of issue #20 gave"). The master reads
the CPUs it may run on once, before it pins itself, and hands that list to every worker
it starts, because a started process inherits the master's own, pinned, set. Process
``k`` (the master is 0) takes the ``k``-th CPU of the list, round-robin. Linux only;
elsewhere :func:`allowed_cpus` is empty and nothing is pinned.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

from twisted.logger import Logger

log = Logger()

SetAffinity = Callable[[int, Iterable[int]], None]


def allowed_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on, in order (empty where the OS cannot tell)."""
    get = getattr(os, "sched_getaffinity", None)
    return tuple(sorted(get(0))) if get is not None else ()


def cpu_for(index: int, cpus: Sequence[int]) -> int | None:
    """The CPU of process ``index`` (the master is 0), or None with no CPU to choose."""
    return cpus[index % len(cpus)] if cpus else None


def pin(index: int, cpus: Sequence[int], set_affinity: SetAffinity | None = None) -> int | None:
    """Pin the calling thread, and so every thread it starts later, to the CPU of process
    ``index``; return that CPU, or None when there is none to pin to. Call it before the
    process starts any thread."""
    cpu = cpu_for(index, cpus)
    if set_affinity is None:
        set_affinity = getattr(os, "sched_setaffinity", None)
    if cpu is None or set_affinity is None:
        return None
    set_affinity(0, (cpu,))
    return cpu


def pin_process(
    index: int, cpus: Sequence[int], set_affinity: SetAffinity | None = None
) -> int | None:
    """:func:`pin`, and one log line saying where process ``index`` runs. A CPU that
    cannot be taken (the set it may run on changed since the master read it) is logged,
    never raised: the process then runs unpinned."""
    try:
        cpu = pin(index, cpus, set_affinity)
    except OSError as error:
        log.warn(
            "server.cpu_affinity: process {index} not pinned: {error}", index=index, error=error
        )
        return None
    if cpu is None:
        log.warn(
            "server.cpu_affinity: process {index} not pinned: this system does not say"
            " which CPUs it may run on",
            index=index,
        )
    else:
        log.info("process {index} pinned to CPU {cpu} (server.cpu_affinity)", index=index, cpu=cpu)
    return cpu
