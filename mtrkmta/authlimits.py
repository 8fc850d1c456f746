"""Limits on SMTP AUTH failures: per connection, per client address, and growing delays."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

log = Logger()

MAX_EXPONENT = 62  # failure_delay * 2**62 is past any max_failure_delay


@dataclass(frozen=True, slots=True)
class AuthLimits:
    """How many AUTH failures are allowed, and how long the reply to each is held.

    ``max_failures`` failures end a connection; a client address with more than
    ``max_address_failures`` failures within the failure store's window is refused
    at its next AUTH. The reply to the n-th failure waits ``delay(n)`` seconds.
    """

    max_failures: int = 3
    max_address_failures: int = 10
    failure_delay: float = 1.0
    max_failure_delay: float = 30.0

    def delay(self, failures: int) -> float:
        """min(failure_delay * 2**(failures - 1), max_failure_delay) seconds."""
        exponent = min(max(failures - 1, 0), MAX_EXPONENT)
        return min(self.failure_delay * 2.0**exponent, self.max_failure_delay)


def window_start(now: float, window: float) -> int:
    """The last whole second before ``window``: a failure counts while its second is later.

    Failures are kept in whole POSIX seconds (like every time in the tracking
    database); a failure at second ``at`` counts at ``now`` iff ``at > window_start``.
    """
    return math.floor(math.floor(now) - window)


class IAuthFailures(Interface):
    """Recent AUTH failures per client address.

    One store may be shared by several processes (the worker processes of a
    node, or several nodes on one database): they all see each other's failures.
    Times are POSIX seconds, counted in whole seconds (see ``window_start``).
    """

    window = Attribute("seconds a failure counts for")

    def record(address: str, now: float) -> Deferred[int]:
        """Note a failure of ``address`` at ``now``; fire with the failures of ``address``
        within the window ending at ``now``, this one included. Older failures of every
        address may be forgotten on the way."""

    def count(address: str, now: float) -> Deferred[int]:
        """Fire with the failures of ``address`` within the window ending at ``now``."""

    def purge(now: float) -> Deferred[int]:
        """Forget every failure outside the window ending at ``now``; fire with how many."""

    def close() -> Deferred[None]:
        """Release the store's resources; it is not used afterwards."""


@implementer(IAuthFailures)
class MemoryAuthFailures:
    """IAuthFailures in this process's memory (unit tests; a node without a database)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._seconds: dict[str, list[int]] = {}

    def record(self, address: str, now: float) -> Deferred[int]:
        self._forget(window_start(now, self.window))
        self._seconds.setdefault(address, []).append(math.floor(now))
        return self.count(address, now)

    def count(self, address: str, now: float) -> Deferred[int]:
        start = window_start(now, self.window)
        return succeed(sum(1 for at in self._seconds.get(address, ()) if at > start))

    def purge(self, now: float) -> Deferred[int]:
        return succeed(self._forget(window_start(now, self.window)))

    def close(self) -> Deferred[None]:
        self._seconds.clear()
        return succeed(None)

    def _forget(self, start: int) -> int:
        forgotten = 0
        for address in list(self._seconds):
            kept = [at for at in self._seconds[address] if at > start]
            forgotten += len(self._seconds[address]) - len(kept)
            if kept:
                self._seconds[address] = kept
            else:
                del self._seconds[address]
        return forgotten


@implementer(ICredentialsChecker)
class AuthGuard:
    """A credentials checker with the limits on failures around it: what SMTP AUTH uses.

    ``failures`` counts per client address (None: no per-address limit). The
    server holds the reply to a failure with ``pause``; ``stop`` (service stop)
    ends every pause at once, so that no session keeps the service waiting.
    """

    def __init__(
        self,
        checker: Any,
        limits: AuthLimits | None = None,
        failures: IAuthFailures | None = None,
    ) -> None:
        self.checker = checker
        self.limits = limits if limits is not None else AuthLimits()
        self.failures = failures
        self._pauses: dict[Deferred[None], IDelayedCall] = {}
        self._stopped = False

    @property
    def credentialInterfaces(self) -> tuple[Any, ...]:
        return tuple(getattr(self.checker, "credentialInterfaces", (IUsernamePassword,)))

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[bytes | tuple[()]]:
        result: Deferred[bytes | tuple[()]] = self.checker.requestAvatarId(credentials)
        return result

    def refused(self, address: str, now: float) -> Deferred[bool]:
        """Whether ``address`` has had more than ``max_address_failures`` failures lately.

        A store that cannot answer does not lock anybody out (it is logged).
        """
        if self.failures is None:
            return succeed(False)
        limit = self.limits.max_address_failures
        d = self.failures.count(address, now)
        d.addErrback(self._store_failed, "count")
        return d.addCallback(lambda count: count > limit)

    def failed(self, address: str, now: float, on_connection: int) -> Deferred[float]:
        """Record a failure of ``address``, the ``on_connection``-th of its connection;
        fire with how long to hold its reply: the delay of the n-th failure, n being the
        larger of the connection's and the address's count."""
        if self.failures is None:
            d: Deferred[int] = succeed(0)
        else:
            d = self.failures.record(address, now)
            d.addErrback(self._store_failed, "record")
        return d.addCallback(lambda count: self.limits.delay(max(count, on_connection)))

    def pause(self, clock: IReactorTime, seconds: float) -> Deferred[None]:
        """A Deferred that fires after ``seconds`` on ``clock``, or at ``stop``."""
        if seconds <= 0 or self._stopped:
            return succeed(None)
        d: Deferred[None] = Deferred()

        def fire() -> None:
            del self._pauses[d]
            d.callback(None)

        self._pauses[d] = clock.callLater(seconds, fire)
        return d

    def stop(self) -> None:
        """End every pause now, and pause no more."""
        self._stopped = True
        pauses, self._pauses = self._pauses, {}
        for d, call in pauses.items():
            call.cancel()
            d.callback(None)

    @staticmethod
    def _store_failed(failure: Failure, what: str) -> int:
        log.failure("AUTH failure store: {what} failed", failure, what=what)
        return 0


def guard_of(checker: Any) -> AuthGuard:
    """``checker`` itself when it is an AuthGuard; else the default limits around it."""
    return checker if isinstance(checker, AuthGuard) else AuthGuard(checker)
