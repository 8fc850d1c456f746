"""A minimal Chrome DevTools Protocol client for the browser tests: a WebSocket client
(RFC 6455) on a Twisted TCP connection, and JSON commands and events over it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
TEXT, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x8, 0x9, 0xA, 0x0
TIMEOUT = 30.0


class WebSocketError(Exception):
    """The server broke RFC 6455 (handshake or framing)."""


def accept_value(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame (RFC 6455 §5.2, §5.3: a client masks every frame)."""
    head = bytes([0x80 | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    mask = os.urandom(4)
    masked = bytes(octet ^ mask[index % 4] for index, octet in enumerate(payload))
    return head + mask + masked


class WebSocketClient(Protocol):
    """Opens ``path`` on ``host``; hands every text message to ``on_message``."""

    def __init__(self, host: str, path: str, on_message: Callable[[str], None]) -> None:
        self.host = host
        self.path = path
        self.on_message = on_message
        self.key = base64.b64encode(os.urandom(16))
        self.opened: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self._buffer = b""
        self._open = False
        self._fragments: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n".encode("ascii")
            + b"Sec-WebSocket-Key: "
            + self.key
            + b"\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        try:
            if not self._open:
                self._handshake()
            if self._open:
                self._read_frames()
        except WebSocketError as error:
            self.transport.loseConnection()
            if not self.opened.called:
                self.opened.errback(error)

    def _handshake(self) -> None:
        head, separator, rest = self._buffer.partition(b"\r\n\r\n")
        if not separator:
            return
        lines = head.decode("latin-1").split("\r\n")
        if lines[0].split()[1:2] != ["101"]:
            raise WebSocketError(f"no upgrade: {lines[0]!r}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        if headers.get("sec-websocket-accept", "").encode() != accept_value(self.key):
            raise WebSocketError("wrong Sec-WebSocket-Accept")
        self._buffer = rest
        self._open = True
        self.opened.callback(None)

    def _read_frames(self) -> None:
        while len(self._buffer) >= 2:
            first, second = self._buffer[0], self._buffer[1]
            if second & 0x80:
                raise WebSocketError("a server frame is masked (RFC 6455 §5.1)")
            length, offset = second & 0x7F, 2
            if length == 126:
                if len(self._buffer) < 4:
                    return
                length, offset = struct.unpack("!H", self._buffer[2:4])[0], 4
            elif length == 127:
                if len(self._buffer) < 10:
                    return
                length, offset = struct.unpack("!Q", self._buffer[2:10])[0], 10
            if len(self._buffer) < offset + length:
                return
            payload = self._buffer[offset : offset + length]
            self._buffer = self._buffer[offset + length :]
            self._frame(bool(first & 0x80), first & 0x0F, payload)

    def _frame(self, final: bool, opcode: int, payload: bytes) -> None:
        if opcode == PING:
            self.transport.write(frame(PONG, payload))
        elif opcode == CLOSE:
            self.transport.write(frame(CLOSE, payload[:2]))
            self.transport.loseConnection()
        elif opcode in (TEXT, CONTINUATION):
            self._fragments.append(payload)
            if final:
                message = b"".join(self._fragments)
                self._fragments = []
                self.on_message(message.decode("utf-8"))

    def send(self, text: str) -> None:
        self.transport.write(frame(TEXT, text.encode("utf-8")))

    def close(self) -> Deferred[None]:
        """Send a close frame (1000) and wait for the connection to end."""
        if self.transport is not None and self._open:
            self.transport.write(frame(CLOSE, struct.pack("!H", 1000)))
            self.transport.loseConnection()
        return self.closed

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.opened.called:
            self.opened.errback(WebSocketError("connection lost before the upgrade"))
        self.closed.callback(None)


class CDPError(Exception):
    """A DevTools command answered an error."""


class DevTools:
    """Commands (``call``) and events (``event``) of the DevTools protocol, flat sessions."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.socket: WebSocketClient | None = None
        self._next = 0
        self._pending: dict[int, Deferred[dict[str, Any]]] = {}
        self._waiting: list[tuple[str, str | None, Deferred[dict[str, Any]]]] = []

    async def connect(self, url: str) -> None:
        """Open the browser's ``ws://127.0.0.1:PORT/devtools/browser/ID``."""
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        endpoint = TCP4ClientEndpoint(self.reactor, parts.hostname, parts.port, timeout=10)
        self.socket = WebSocketClient(parts.netloc, parts.path, self._message)
        await connectProtocol(endpoint, self.socket)
        await self.socket.opened.addTimeout(TIMEOUT, self.reactor)

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> Deferred[dict[str, Any]]:
        assert self.socket is not None
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        answer: Deferred[dict[str, Any]] = Deferred()
        self._pending[self._next] = answer
        self.socket.send(json.dumps(message))
        return answer.addTimeout(TIMEOUT, self.reactor)

    def event(self, method: str, session: str | None = None) -> Deferred[dict[str, Any]]:
        """The parameters of the next ``method`` event (ask before causing it)."""
        found: Deferred[dict[str, Any]] = Deferred()
        self._waiting.append((method, session, found))
        return found.addTimeout(TIMEOUT, self.reactor)

    async def evaluate(self, expression: str, session: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able)."""
        reply = await self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
        )
        if "exceptionDetails" in reply:
            raise CDPError(f"{expression!r}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def _message(self, text: str) -> None:
        message = json.loads(text)
        if "id" in message:
            answer = self._pending.pop(message["id"], None)
            if answer is None or answer.called:
                return
            if "error" in message:
                answer.errback(CDPError(str(message["error"])))
            else:
                answer.callback(message.get("result", {}))
            return
        method, session = message.get("method"), message.get("sessionId")
        for waiting in list(self._waiting):
            wanted, wanted_session, found = waiting
            if wanted == method and wanted_session in (None, session):
                self._waiting.remove(waiting)
                if not found.called:
                    found.callback(message.get("params", {}))
                break

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
