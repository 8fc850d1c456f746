"""write_now on real loopback TCP connections: at once when it may, in order always."""

from __future__ import annotations

import socket
from collections.abc import Callable, Generator
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.tcp import Connection

from mtrkmta.eagerwrite import write_now


class _Held(Protocol):
    """Keeps the server side of the connection for the test to write on."""

    def connectionMade(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.factory.made.callback(self)

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


def _pending(peer: socket.socket) -> bytes:
    """What the peer can read now, without waiting and without a reactor turn."""
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""


def _turn() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(0, d.callback, None)
    return d


def _received(peer: socket.socket, expected: bytes) -> Generator[Deferred[None], None, bytes]:
    """Turn the reactor until ``expected`` arrived (at most 200 turns); what arrived."""
    got = b""
    for _ in range(200):
        got += _pending(peer)
        if len(got) >= len(expected):
            break
        yield _turn()
    return got


def _on_connection(test: Callable[[Any, socket.socket], Generator[Any, Any, None]]) -> Any:
    """Run ``test(server_protocol, peer_socket)`` on a fresh loopback connection."""

    @pytest_twisted.inlineCallbacks
    def run() -> Generator[Any, Any, None]:
        factory = Factory.forProtocol(_Held)
        factory.made = Deferred()  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        peer = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        peer.setblocking(False)
        server = yield factory.made  # type: ignore[attr-defined]
        try:
            yield from test(server, peer)
        finally:
            peer.close()
            server.transport.loseConnection()
            yield server.lost
            yield port.stopListening()

    run.__name__ = test.__name__
    return run


@_on_connection
def test_bytes_reach_the_socket_without_a_reactor_turn(server, peer):
    transport = server.transport
    assert isinstance(transport, Connection)
    write_now(transport, b"250 2.0.0 Ok\r\n")
    assert _pending(peer) == b"250 2.0.0 Ok\r\n"
    transport.write(b"buffered\r\n")  # Twisted's own write waits for the reactor
    assert _pending(peer) == b""
    assert (yield from _received(peer, b"buffered\r\n")) == b"buffered\r\n"


@_on_connection
def test_bytes_never_overtake_what_is_buffered(server, peer):
    server.transport.write(b"first\r\n")
    write_now(server.transport, b"second\r\n")
    assert _pending(peer) == b""
    assert (yield from _received(peer, b"first\r\nsecond\r\n")) == b"first\r\nsecond\r\n"


@_on_connection
def test_a_pull_producer_keeps_the_buffer(server, peer):
    # A pull producer is asked for more only when the buffer drains (doWrite): bytes
    # that bypassed the buffer would leave it waiting for ever.
    transport = server.transport
    asked: list[int] = []

    class Pull:
        def resumeProducing(self) -> None:
            asked.append(1)
            if len(asked) == 1:
                write_now(transport, b"piece\r\n")
            else:
                transport.unregisterProducer()

        def stopProducing(self) -> None:
            pass

    transport.registerProducer(Pull(), False)
    assert _pending(peer) == b""
    assert (yield from _received(peer, b"piece\r\n")) == b"piece\r\n"
    for _ in range(200):
        if len(asked) == 2:
            break
        yield _turn()
    assert len(asked) == 2


@_on_connection
def test_a_closing_connection_keeps_its_order(server, peer):
    server.transport.loseConnection()
    write_now(server.transport, b"late\r\n")
    assert _pending(peer) == b""
    assert (yield from _received(peer, b"late\r\n")) == b"late\r\n"
