"""`mtrkmta serve` under a service manager: sd_notify datagrams on NOTIFY_SOCKET, from a real
process (its main process only, not its workers), READY only once mail is accepted."""

from __future__ import annotations

import signal
import socket
import struct
from pathlib import Path

from servprocess import TIMEOUT, ServeProcess

from mtrkmta.testing import database_url

HOSTNAME = "mx.example.test"
CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid


def datagram(sock: socket.socket, process: ServeProcess) -> list[str]:
    """The next notification; it must come from the main process (systemd's NotifyAccess=main)."""
    try:
        data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(CREDENTIALS.size))
    except TimeoutError:
        raise AssertionError(f"no notification:\n{process.output()}") from None
    (level, kind, credentials) = ancillary[0]
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
    pid, _, _ = CREDENTIALS.unpack(credentials)
    assert pid == process.proc.pid, (pid, data)
    return data.decode().splitlines()


def test_ready_once_smtp_accepts_then_reloading_and_stopping(tmp_path: Path) -> None:
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the sender's pid, as systemd
    manager.settimeout(TIMEOUT)
    with socket.socket() as probe:  # a port for the node, known before it starts
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = tmp_path / "data"
    process = ServeProcess(
        [
            "--data-dir", str(data), "--database", database_url(data),
            "--smtp", f"tcp:{port}:interface=127.0.0.1", "--lmtp", "none", "--mtqp", "none",
            "--hostname", HOSTNAME, "--workers", "2",
        ],
        cwd=tmp_path,
        env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "600000000"},
    )  # fmt: skip
    try:
        first = datagram(manager, process)
        assert first == ["WATCHDOG=1"]  # the watchdog is fed from the start
        assert datagram(manager, process) == ["READY=1", "STATUS=accepting mail"]
        # READY came after the listener was bound: the port greets at once.
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
            assert client.recv(512).startswith(b"220 ")
        process.reload()
        reloading = datagram(manager, process)
        assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
        assert int(reloading[1].partition("=")[2]) > 0
        assert datagram(manager, process) == ["READY=1", "STATUS=accepting mail"]
        process.proc.send_signal(signal.SIGTERM)
        assert datagram(manager, process) == ["STOPPING=1", "STATUS=stopping"]
        process.proc.wait(timeout=TIMEOUT)
    finally:
        process.stop()
        manager.close()
