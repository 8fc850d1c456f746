"""The HTTP service of a whole node in-process: health, readiness, admin API and its bounds,
asked by twisted.web's Agent (and by a raw socket for what no polite client sends)."""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import urllib.request
from pathlib import Path
from typing import Any

import pytest_twisted
from servprocess import ServeProcess
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers

from mtrkmta.service import MTAService
from mtrkmta.testing import database_url, node_config, start_node, stop_node

TOKEN = "s3cret-admin-token-0123456789abcdef"
WRONG = "s3cret-admin-token-0123456789abcdeX"
TIMEOUT = 30.0


async def get(node: MTAService, path: str, token: str | None = None) -> tuple[int, Any, Headers]:
    """One GET by twisted.web's Agent: status, JSON body, headers."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    headers = Headers({} if token is None else {"Authorization": [f"Bearer {token}"]})
    url = f"http://127.0.0.1:{node.port('http')}{path}".encode()
    response = await Agent(reactor, pool=pool).request(b"GET", url, headers)
    body = Body()
    response.deliverBody(body)
    return response.code, json.loads(await body.done), response.headers


class Body(Protocol):
    """A response body, whole once the response ends."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        if reason.check(ResponseDone):
            self.done.callback(self.data)
        else:
            self.done.errback(reason)


class Raw(Protocol):
    """A client that writes what it is told and collects the answer until the close."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:
        self.closed.callback(self.received)


async def raw(node: MTAService, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; everything the server sent before it closed."""
    client = Raw()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", node.port("http")), client)
    client.transport.write(data)
    return await client.closed.addTimeout(TIMEOUT, reactor)


def send(port: int) -> str:
    """One message to alice@localhost over SMTP; its queue id (blocking)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as smtp:
        smtp.ehlo("client.example")
        smtp.mail("a@b.example")
        smtp.rcpt("alice@localhost")
        _, reply = smtp.data(b"Subject: x\r\n\r\nhi\r\n")
    return reply.split()[-1].decode()


def http_node(tmp_path: Path, *options: tuple[str, object]) -> Any:
    return node_config(tmp_path / "data", listeners=("smtp", "http"), options=tuple(options))


@pytest_twisted.ensureDeferred
async def test_healthz_and_readyz_of_a_running_node(tmp_path):
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        node = await start_node(http_node(tmp_path))
    finally:
        globalLogPublisher.removeObserver(events.append)
    try:
        assert f"http listening on 127.0.0.1:{node.port('http')}" in [
            formatEvent(e) for e in events
        ]
        status, body, headers = await get(node, "/healthz")
        assert (status, body) == (200, {"status": "ok"})
        assert headers.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]
        assert headers.getRawHeaders(b"x-content-type-options") == [b"nosniff"]
        assert headers.getRawHeaders(b"cache-control") == [b"no-store"]
        status, body, _ = await get(node, "/readyz")
        assert status == 200
        assert body["status"] == "ready" and body["failed"] == []
        assert set(body["checks"]) == {"listeners", "store", "spool"}
    finally:
        await stop_node(node)


@pytest_twisted.ensureDeferred
async def test_readyz_turns_503_when_the_spool_cannot_be_written(tmp_path):
    node = await start_node(http_node(tmp_path))
    incoming = tmp_path / "data" / "spool" / "incoming"
    aside = tmp_path / "incoming.aside"
    try:
        # As root a mode does not stop a write: a file where the directory was does.
        shutil.move(incoming, aside)
        incoming.write_bytes(b"")
        status, body, _ = await get(node, "/readyz")
        assert status == 503
        assert body["status"] == "not ready" and body["failed"] == ["spool"]
        assert body["checks"]["store"] == {"ok": True}
        assert "NotADirectoryError" in body["checks"]["spool"]["problem"]
        incoming.unlink()
        shutil.move(aside, incoming)
        status, body, _ = await get(node, "/readyz")
        assert (status, body["status"]) == (200, "ready")
    finally:
        if not incoming.is_dir():
            incoming.unlink()
            shutil.move(aside, incoming)
        await stop_node(node)


@pytest_twisted.ensureDeferred
async def test_no_admin_api_without_a_token_file(tmp_path):
    node = await start_node(http_node(tmp_path))
    try:
        status, body, _ = await get(node, "/api/v1/queue", token=TOKEN)
        assert status == 404 and body["error"]["code"] == "not_found"
    finally:
        await stop_node(node)


@pytest_twisted.ensureDeferred
async def test_admin_api_needs_the_token(tmp_path):
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    node = await start_node(
        http_node(tmp_path, ("http.admin_token_file", str(token_file))), deliver=False
    )
    try:
        status, body, headers = await get(node, "/api/v1/queue")
        assert status == 401 and body["error"]["code"] == "unauthorized"
        assert headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="mtrkmta"']
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            status, body, _ = await get(node, f"/api/v1/queue?token={TOKEN}", token=WRONG)
        finally:
            globalLogPublisher.removeObserver(events.append)
        assert status == 401 and body["error"]["code"] == "invalid_token"
        assert "http 401 GET /api/v1/queue from 127.0.0.1" in [formatEvent(e) for e in events]
        assert not [e for e in events if TOKEN in repr(e) or WRONG in repr(e)]
        status, body, _ = await get(node, "/api/v1/queue", token=TOKEN)
        assert (status, body) == (200, [])
        queue_id = await threads.deferToThread(send, node.port("smtp"))
        status, body, _ = await get(node, "/api/v1/queue", token=TOKEN)
        assert status == 200
        assert [(m["queue_id"], m["sender"]) for m in body] == [(queue_id, "a@b.example")]
        assert [r["address"] for r in body[0]["recipients"]] == ["alice@localhost"]
        status, shown, _ = await get(node, f"/api/v1/queue/{queue_id}", token=TOKEN)
        assert status == 200 and shown["queue_id"] == queue_id
        assert [e["kind"] for e in shown["events"]][:1] == ["arrived"]
        status, body, _ = await get(node, "/api/v1/queue/NOSUCHID", token=TOKEN)
        assert status == 404 and body["error"]["code"] == "unknown_queue_id"
    finally:
        await stop_node(node)


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_cap_is_refused_before_it_is_read(tmp_path):
    node = await start_node(http_node(tmp_path, ("http.max_body", "2KiB")))
    try:
        # Content-Length says 10 MB and no body follows: the answer comes anyway.
        answer = await raw(
            node,
            b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert b'"code":"body_too_large"' in answer
        # A chunked body has no length up front: refused once it grows past the cap.
        chunk = b"800\r\n" + b"x" * 0x800 + b"\r\n"
        answer = await raw(
            node,
            b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2,
        )
        assert answer.startswith(b"HTTP/1.1 413 ")
    finally:
        await stop_node(node)


@pytest_twisted.ensureDeferred
async def test_a_request_that_never_ends_is_closed_after_request_time(tmp_path):
    # Idle for less than http.idle_timeout, yet never finishing its headers (a slow loris):
    # closed with 408 once http.request_time has passed since its first byte.
    node = await start_node(
        http_node(tmp_path, ("http.request_time", "1s"), ("http.idle_timeout", "1h"))
    )
    try:
        start = reactor.seconds()
        answer = await raw(node, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b'"code":"request_timeout"' in answer
        assert reactor.seconds() - start < TIMEOUT
    finally:
        await stop_node(node)


def test_with_worker_processes_the_master_alone_serves_http(tmp_path):
    data = tmp_path / "data"
    server = ServeProcess(
        [
            "--data-dir", str(data), "--database", database_url(data),
            "--smtp", "tcp:0:interface=127.0.0.1", "--lmtp", "none", "--mtqp", "none",
            "--http", "tcp:0:interface=127.0.0.1", "--hostname", "mx.example.test",
            "--workers", "2",
        ],
        cwd=tmp_path,
    )  # fmt: skip
    try:
        port = int(server.wait_for(r"\] http listening on 127\.0\.0\.1:(\d+)").group(1))
        server.wait_for("worker 1: smtp accepting on")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=TIMEOUT) as r:
            assert (r.status, json.loads(r.read())["status"]) == (200, "ready")
        http_lines = [line for line in server.seen if "http" in line]
        assert len(http_lines) == 1 and "[worker" not in http_lines[0]
    finally:
        server.stop()
