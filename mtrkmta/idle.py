"""Idle timeouts of server sessions: Twisted's TimeoutMixin on the factory's injected clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.protocols.policies import TimeoutMixin


class IdleTimeout(TimeoutMixin):
    """A session that closes after ``settings.idle_timeout`` seconds without input.

    The protocol provides ``factory.clock`` (an IReactorTime), ``settings`` and a
    ``_closing`` flag, and overrides ``timeoutConnection`` to say goodbye.
    """

    factory: Any
    settings: Any
    _closing: bool

    def callLater(self, period: float, func: Callable[[], object]) -> Any:
        """TimeoutMixin's timer, on the factory's clock (tests use a fake one)."""
        return self.factory.clock.callLater(period, func)

    def _reset_timeout(self) -> None:
        """Start or restart the idle timer (not while closing)."""
        if not self._closing:
            self.setTimeout(self.settings.idle_timeout)

    def _cancel_timeout(self) -> None:
        self.setTimeout(None)
