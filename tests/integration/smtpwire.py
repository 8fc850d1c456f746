"""A blocking raw-socket SMTP/LMTP client for the receive-path integration tests.

It sends exactly the bytes it is given (so tests can pipeline, inject and send
malformed input) and reads complete replies, multi-line ones included. Every
read is bounded by a socket timeout. The blocking conversation runs in a thread
(``await in_thread(fn)``) while the node under test runs in the reactor.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import threads

from mtrkmta.testing import node_config, start_node, stop_node

HOST = "127.0.0.1"
TIMEOUT = 5.0
SERVER_NAME = "mx.example.test"
_QUEUED_AS = re.compile(r"queued as (\S+)$")
_MAX_BUFFER = 1 << 20


class WireError(AssertionError):
    """The server broke the conversation: closed early, malformed reply, no reply in time."""


@dataclass(frozen=True)
class WireReply:
    """One complete reply as received: raw lines without CRLF (``250-SIZE 1024``)."""

    code: int
    lines: tuple[str, ...]
    arrived: float  # time.monotonic() when its last line was read

    @property
    def line(self) -> str:
        """The whole of a single-line reply, e.g. ``501 5.5.4 Invalid MTRK parameter``."""
        if len(self.lines) != 1:
            raise WireError(f"expected a single-line reply, got {self.lines!r}")
        return self.lines[0]

    @property
    def texts(self) -> tuple[str, ...]:
        """The text of every line, after ``NNN-`` / ``NNN ``."""
        return tuple(line[4:] for line in self.lines)

    @property
    def keywords(self) -> list[str]:
        """EHLO/LHLO keyword lines: every text but the first (the server's name)."""
        return list(self.texts[1:])

    def __str__(self) -> str:
        return " | ".join(self.lines)


def client_tls_context(
    *, maximum: ssl.TLSVersion | None = None, minimum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """A TLS client context that does not verify the (self-signed) server certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    return context


class Wire:
    """One client connection. Use as a context manager so the socket is always closed."""

    def __init__(
        self,
        port: int,
        *,
        greeting: bool = True,
        timeout: float = TIMEOUT,
        source: str | None = None,
    ) -> None:
        """Connect to 127.0.0.1:``port`` (from loopback address ``source`` if given)."""
        address = (source, 0) if source is not None else None
        self.sock: socket.socket = socket.create_connection(
            (HOST, port), timeout=timeout, source_address=address
        )
        self._buffer = b""
        self.greeting: WireReply | None = None
        if greeting:
            self.greeting = self.reply()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- sending -------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Send ``data`` as given, in one sendall (one packet on loopback for small data)."""
        self.sock.sendall(data)

    def command(self, line: str | bytes) -> WireReply:
        """Send one command line (CRLF appended) and read its reply."""
        self.send(_bytes(line) + b"\r\n")
        return self.reply()

    def pipeline(self, *lines: str | bytes) -> list[WireReply]:
        """Send several command lines in ONE write, then read one reply per line."""
        self.send(b"".join(_bytes(line) + b"\r\n" for line in lines))
        return self.replies(len(lines))

    def ehlo(self, name: str = "client.example.test", verb: str = "EHLO") -> WireReply:
        return self.command(f"{verb} {name}")

    def data(self, content: bytes) -> WireReply:
        """DATA, 354, then dot-stuffed ``content`` and the terminator; the final reply."""
        go = self.command("DATA")
        if go.code != 354:
            raise WireError(f"DATA refused: {go}")
        self.send(data_block(content))
        return self.reply()

    # -- receiving -----------------------------------------------------------

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError as exc:  # socket.timeout is an alias on 3.10+
            raise WireError(f"no reply in time; buffered {self._buffer[:200]!r}") from exc
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return False
        if not chunk:
            return False
        self._buffer += chunk
        if len(self._buffer) > _MAX_BUFFER:
            raise WireError("server sent more than 1 MiB without CRLF")
        return True

    def read_line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            if not self._fill():
                raise WireError(f"connection closed by the server; unparsed {self._buffer!r}")
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line

    def reply(self) -> WireReply:
        """Read one complete reply (all lines of a multi-line reply)."""
        lines: list[str] = []
        while True:
            raw = self.read_line()
            text = raw.decode("utf-8")
            if (
                len(text) < 3
                or not text[:3].isdigit()
                or text[3:4] not in ("", " ", "-")
                or (text[3:4] == "" and len(text) != 3)
            ):
                raise WireError(f"malformed reply line {raw!r}")
            if lines and text[:3] != lines[0][:3]:
                raise WireError(f"reply code changed mid-reply: {lines!r} then {text!r}")
            lines.append(text)
            if text[3:4] != "-":
                return WireReply(int(text[:3]), tuple(lines), time.monotonic())

    def replies(self, count: int) -> list[WireReply]:
        return [self.reply() for _ in range(count)]

    def expect_silence(self, wait: float = 0.3) -> None:
        """Fail if the server sends anything (or closes) within ``wait`` seconds."""
        if self._buffer:
            raise WireError(f"unexpected bytes from the server: {self._buffer!r}")
        old = self.sock.gettimeout()
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return
        finally:
            self.sock.settimeout(old)
        raise WireError(f"unexpected bytes from the server: {chunk!r}")

    def expect_closed(self) -> bytes:
        """Wait (bounded by the socket timeout) until the server closes; return what came."""
        while self._fill():
            pass
        rest, self._buffer = self._buffer, b""
        return rest

    # -- TLS -------------------------------------------------------------------

    def starttls(
        self, context: ssl.SSLContext | None = None, server_hostname: str = SERVER_NAME
    ) -> None:
        """Do the TLS handshake on this connection (after a 220 to STARTTLS)."""
        if self._buffer:
            raise WireError(f"bytes received in clear after STARTTLS: {self._buffer!r}")
        context = context or client_tls_context()
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    @property
    def tls_version(self) -> str | None:
        version = getattr(self.sock, "version", None)
        return version() if version is not None else None


def _bytes(line: str | bytes) -> bytes:
    return line.encode("utf-8") if isinstance(line, str) else line


def data_block(content: bytes) -> bytes:
    """``content`` (CRLF line ends) dot-stuffed and followed by the ``.`` terminator."""
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    stuffed = b"".join(
        (b"." + line if line.startswith(b".") else line)
        for line in content.splitlines(keepends=True)
    )
    return stuffed + b".\r\n"


def message(subject: str = "test", body: str = "hello", headers: Iterable[str] = ()) -> bytes:
    """A small RFC 5322 message with CRLF line ends."""
    lines = [*headers, "From: a@sender.example", "To: b@localhost", f"Subject: {subject}", ""]
    lines.append(body)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def queue_id_of(reply: WireReply) -> str:
    """The queue id from ``250 2.0.0 Ok: queued as ID`` (LMTP: ``... <rcpt> Ok: queued as ID``)."""
    match = _QUEUED_AS.search(reply.lines[-1])
    if reply.code != 250 or match is None:
        raise WireError(f"not a 'queued as' reply: {reply}")
    return match.group(1)


class RefusingPort:
    """A loopback TCP port held bound but not listening: every connection is refused.

    A next hop that is down. Finding a free port and closing it is not enough: the
    next ``bind(("127.0.0.1", 0))`` (a node's own listener started after it, or a
    connection's source port) may get the same port, and the "down" hop answers.
    Holding the bound socket keeps the port out of the kernel's hands until
    ``release()`` (before a test starts a server on it) or the end of the ``with``.
    """

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind((HOST, 0))
        self.port = int(self._sock.getsockname()[1])

    def release(self) -> int:
        self._sock.close()
        return self.port

    def __enter__(self) -> RefusingPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking client conversation in a thread; a Deferred of its result."""
    return threads.deferToThread(fn, *args)


async def queued_everywhere(node: Any, queue_id: str) -> Any:
    """Assert ``queue_id`` is both in the spool and in the tracking store; the stored message.

    RFC 3885 §3.1: every accepted message has its tracking record, written before 250.
    """
    assert queue_id in await node.spool.queue_ids()
    stored = await node.tracking.message(queue_id)
    assert stored is not None, f"{queue_id} missing from the tracking store"
    assert stored.queue_id == queue_id
    return stored


async def nothing_queued(node: Any) -> None:
    """Assert that the node holds no message at all: empty spool, nothing tracked as queued."""
    assert await node.spool.queue_ids() == []
    assert await node.tracking.queued_messages(node.config.node_id) == []


@contextlib.asynccontextmanager
async def running_node(tmp_path: Path, **kwargs: Any) -> AsyncIterator[Any]:
    """A node from ``node_config(tmp_path / "data", **kwargs)``, always stopped afterwards.

    Its queue does not deliver: these tests look at what the receive path stored.
    """
    node = await start_node(node_config(tmp_path / "data", **kwargs), deliver=False)
    try:
        yield node
    finally:
        await stop_node(node)


async def until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll ``predicate`` (sync or async) until it is truthy; fail after ``timeout`` s."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)


async def queue_emptied(node: Any, timeout: float = 10.0) -> None:
    """Wait until the node's spool is empty (every message and every DSN delivered)."""

    async def empty() -> bool:
        return not await node.spool.queue_ids()

    await until(empty, "the queue to empty", timeout)
