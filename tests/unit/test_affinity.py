"""Which CPU each process of a node runs on (mtrkmta.affinity, server.cpu_affinity)."""

from __future__ import annotations

from collections.abc import Iterable

from mtrkmta.affinity import cpu_for, pin, pin_process
from mtrkmta.workers import ConfigOrigin, decode


def test_processes_take_the_cpus_in_order_round_robin():
    cpus = (2, 3, 5)
    assert [cpu_for(index, cpus) for index in range(5)] == [2, 3, 5, 2, 3]
    assert cpu_for(0, ()) is None


def test_pin_sets_the_calling_threads_affinity_to_its_one_cpu():
    calls: list[tuple[int, tuple[int, ...]]] = []

    def set_affinity(pid: int, cpus: Iterable[int]) -> None:
        calls.append((pid, tuple(cpus)))

    assert pin(1, (4, 6), set_affinity) == 6
    assert calls == [(0, (6,))]  # 0: the calling thread, whose new threads inherit it


def test_nothing_is_pinned_without_a_cpu_list():
    calls: list[object] = []
    assert pin(0, (), lambda pid, cpus: calls.append(cpus)) is None
    assert calls == []


def test_a_cpu_that_cannot_be_taken_leaves_the_process_unpinned_not_stopped():
    def set_affinity(pid: int, cpus: Iterable[int]) -> None:
        raise OSError(22, "Invalid argument")

    assert pin_process(0, (7,), set_affinity) is None


def test_a_worker_gets_the_masters_cpu_list_with_its_role():
    # A started process inherits its master's pinned set, so the list travels with the role.
    line = ConfigOrigin(None, ()).encode(1, {"smtp": (3, 2)}, (0, 1, 2, 3))
    _, role, _ = decode(line)
    assert (role.index, role.cpus, dict(role.listen_fds)) == (1, (0, 1, 2, 3), {"smtp": (3, 2)})
