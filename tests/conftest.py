"""Shared test fixtures: the Twisted reactor under pytest-twisted and the leak guard."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


def _reactor_sockets(reactor: object) -> set[object]:
    """The reactor's selectables, less its own wakers (they appear once it runs)."""
    readers = set(getattr(reactor, "getReaders", list)())
    writers = set(getattr(reactor, "getWriters", list)())
    internal = set(getattr(reactor, "_internalReaders", ()))
    return (readers | writers) - internal


@pytest.fixture(autouse=True)
def no_leaked_reactor_state(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves DelayedCalls pending or sockets open in the global reactor.

    Pure unit tests never touch the global reactor, so for them this costs nothing;
    integration tests must stop their listeners, close their connections and cancel
    their timers before they end.
    """
    from twisted.internet import reactor

    before_sockets = _reactor_sockets(reactor)
    before_calls = {id(c) for c in reactor.getDelayedCalls()}
    yield
    leaked_calls = [
        c for c in reactor.getDelayedCalls() if c.active() and id(c) not in before_calls
    ]
    leaked_sockets = _reactor_sockets(reactor) - before_sockets
    for call in leaked_calls:
        call.cancel()
    for selectable in leaked_sockets:
        reactor.removeReader(selectable)
        reactor.removeWriter(selectable)
        lose = getattr(selectable, "loseConnection", None) or getattr(
            selectable, "stopListening", None
        )
        if lose is not None:
            lose()
    problems = [f"pending DelayedCall {c}" for c in leaked_calls]
    problems += [f"open socket {s!r}" for s in leaked_sockets]
    if problems:
        pytest.fail("test left reactor state behind:\n  " + "\n  ".join(problems), pytrace=False)
