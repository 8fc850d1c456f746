"""The service manager's notification socket (systemd's sd_notify protocol), without libsystemd.

systemd starts a ``Type=notify`` service with ``NOTIFY_SOCKET`` set to a Unix
datagram socket (a path, or an abstract name written with a leading ``@``);
each datagram is newline-separated ``KEY=VALUE`` assignments (sd_notify(3)):
``READY=1`` once start-up is done, ``RELOADING=1`` with ``MONOTONIC_USEC=``
while a reload runs, ``STOPPING=1`` at shutdown, ``WATCHDOG=1`` at least every
``WATCHDOG_USEC`` microseconds when the unit has ``WatchdogSec=``. Without
``NOTIFY_SOCKET`` nothing is sent.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Interface, implementer

log = Logger()


class IServiceNotifier(Interface):
    """Tells the service manager how the node is doing."""

    def ready(status: str) -> None:
        """Start-up (or a reload) has finished; ``status`` is a short human-readable line."""

    def reloading() -> None:
        """A reload begins."""

    def stopping() -> None:
        """Shutdown begins."""

    def watchdog() -> None:
        """The node is alive (the watchdog keep-alive)."""

    def watchdog_interval() -> float | None:
        """Seconds between keep-alives (half the manager's timeout), or None: no watchdog."""


def socket_address(value: str) -> str | bytes:
    """The address ``NOTIFY_SOCKET`` names: a path, or an abstract name for ``@name``."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, when it is set for this process (``WATCHDOG_PID``
    absent or ``pid``); else None."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    return int(usec) / 2 / 1_000_000


@implementer(IServiceNotifier)
class SystemdNotifier:
    """Sends sd_notify datagrams to ``address`` (see :func:`socket_address`).

    A datagram that cannot be sent is logged once and otherwise ignored, as
    sd_notify(3) does: the node keeps running without its service manager.
    ``monotonic`` gives ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, which systemd compares).
    """

    def __init__(
        self,
        address: str | bytes,
        *,
        interval: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address = address
        self._interval = interval
        self._monotonic = monotonic
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.setblocking(False)
        self._failed = False

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str], pid: int | None = None
    ) -> SystemdNotifier | None:
        """The notifier ``NOTIFY_SOCKET`` asks for, or None when it is unset."""
        value = environ.get("NOTIFY_SOCKET", "")
        if not value:
            return None
        pid = os.getpid() if pid is None else pid
        return cls(socket_address(value), interval=watchdog_interval(environ, pid))

    def send(self, *assignments: str) -> None:
        """One datagram of ``KEY=VALUE`` lines."""
        data = "\n".join(assignments).encode() + b"\n"
        try:
            self._socket.sendto(data, self.address)
        except OSError as error:
            if not self._failed:
                self._failed = True
                log.warn(
                    "cannot notify the service manager at NOTIFY_SOCKET: {error}",
                    error=error.strerror or error,
                )

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        usec = int(self._monotonic() * 1_000_000)
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        return self._interval

    def close(self) -> None:
        self._socket.close()


def keep_alive(notifier: IServiceNotifier, clock: IReactorTime) -> LoopingCall | None:
    """Send ``WATCHDOG=1`` now and every :meth:`IServiceNotifier.watchdog_interval` seconds on
    ``clock``; None (nothing sent) when there is no watchdog. Stop the call at shutdown."""
    interval = notifier.watchdog_interval()
    if interval is None:
        return None
    call = LoopingCall(notifier.watchdog)
    call.clock = clock
    call.start(interval, now=True)
    return call
