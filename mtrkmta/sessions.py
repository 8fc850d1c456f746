"""The open sessions of one listener: connection limits, and draining them at shutdown."""

from __future__ import annotations

from typing import Any, Literal

from twisted.internet.defer import Deferred, succeed

Refusal = Literal["total", "address"]


class SessionTable:
    """Counts a listener's sessions, in all and per client address.

    ``admit`` registers a session or says which limit it hit; ``release`` forgets
    it; ``drain`` asks every session to ``shutdown()`` and fires once the last one
    is released (connections gone).
    """

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.sessions: set[Any] = set()
        self._per_address: dict[str, int] = {}
        self._drained: list[Deferred[None]] = []

    def admit(self, session: Any, address: str) -> Refusal | None:
        if len(self.sessions) >= self.max_total:
            return "total"
        if self._per_address.get(address, 0) >= self.max_per_address:
            return "address"
        self.sessions.add(session)
        self._per_address[address] = self._per_address.get(address, 0) + 1
        return None

    def release(self, session: Any, address: str) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            left = self._per_address.get(address, 1) - 1
            if left:
                self._per_address[address] = left
            else:
                self._per_address.pop(address, None)
        if not self.sessions:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def drain(self) -> Deferred[None]:
        """Shut every session down; fires once all their connections are gone."""
        if not self.sessions:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        for session in list(self.sessions):
            session.shutdown()
        return d
