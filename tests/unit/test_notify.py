"""sd_notify (mtrkmta.notify): datagrams on a real Unix socket, the watchdog on a Clock."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from mtrkmta.notify import SystemdNotifier, keep_alive, socket_address, watchdog_interval


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A socket in the service manager's place, and its NOTIFY_SOCKET value."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().splitlines()


def pending(sock: socket.socket) -> bytes | None:
    sock.setblocking(False)
    try:
        return sock.recv(4096)
    except BlockingIOError:
        return None
    finally:
        sock.settimeout(5)


def test_nothing_without_notify_socket() -> None:
    assert SystemdNotifier.from_environment({}, pid=1) is None
    assert SystemdNotifier.from_environment({"NOTIFY_SOCKET": ""}, pid=1) is None


def test_ready_reloading_stopping_reach_the_socket(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": path}, pid=os.getpid())
    assert notifier is not None
    notifier.ready("accepting mail")
    assert received(sock) == ["READY=1", "STATUS=accepting mail"]
    notifier = SystemdNotifier(path, monotonic=lambda: 12.5)
    notifier.reloading()
    assert received(sock) == ["RELOADING=1", "MONOTONIC_USEC=12500000", "STATUS=reloading"]
    notifier.stopping()
    assert received(sock) == ["STOPPING=1", "STATUS=stopping"]
    notifier.close()


def test_abstract_socket_names() -> None:
    name = f"mtrkmta-test-{os.getpid()}"
    assert socket_address("@" + name) == b"\0" + name.encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": "@" + name}, pid=1)
        assert notifier is not None
        notifier.ready("up")
        assert received(sock) == ["READY=1", "STATUS=up"]
        notifier.close()
    finally:
        sock.close()


def test_watchdog_every_half_timeout_on_the_clock(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}
    notifier = SystemdNotifier.from_environment(environ, pid=4242)
    assert notifier is not None and notifier.watchdog_interval() == 15.0
    clock = Clock()
    call = keep_alive(notifier, clock)
    assert call is not None
    assert received(sock) == ["WATCHDOG=1"]  # at once
    clock.advance(14.9)
    assert pending(sock) is None
    clock.advance(0.1)
    assert received(sock) == ["WATCHDOG=1"]
    clock.advance(15)
    assert received(sock) == ["WATCHDOG=1"]
    call.stop()
    notifier.close()


def test_no_watchdog_for_another_pid_or_without_usec(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "7"}, pid=8) is None
    assert watchdog_interval({"WATCHDOG_USEC": "1000000"}, pid=8) == 0.5
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid=8) is None
    assert watchdog_interval({}, pid=8) is None
    environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "7"}
    notifier = SystemdNotifier.from_environment(environ, pid=8)
    assert notifier is not None
    clock = Clock()
    assert keep_alive(notifier, clock) is None
    clock.advance(10)
    assert pending(sock) is None
    notifier.close()


def test_a_vanished_manager_socket_is_not_an_error(tmp_path: Path) -> None:
    notifier = SystemdNotifier(str(tmp_path / "gone"))
    notifier.ready("up")  # logged once, no exception: the node runs on
    notifier.watchdog()
    notifier.close()
