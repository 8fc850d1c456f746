"""The HTTP service's root (mtrkmta.web.site) over StringTransport, driven by a clock: JSON
errors, security headers, the request log, and every bound."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource

from mtrkmta.web.site import BoundedChannel, HttpLimits, build_site

SECRET = "hunter2-very-secret"
LIMITS = HttpLimits(
    max_body=1024,
    max_headers=10,
    header_size=1024,
    idle_timeout=60.0,
    request_time=5.0,
    max_connections=2,
)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        return b"hello"

    def render_POST(self, request: Any) -> bytes:
        return b"got %d" % len(request.content.read())


class Broken(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        raise RuntimeError("boom")


class Client:
    """One connection to a site: bytes in, bytes out."""

    def __init__(self, site: Any, port: int = 40000) -> None:
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        if self.channel is not None:
            self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.channel.dataReceived(data)
        return self.transport.value()

    def close(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.channel.connectionLost(Failure(ConnectionDone()))


def make_site(limits: HttpLimits = LIMITS) -> tuple[Any, MemoryReactorClock]:
    clock = MemoryReactorClock()
    site = build_site(
        {b"hello": Hello(), b"api/v1/broken": Broken(), b"api/v1/hello": Hello()}, limits, clock
    )
    return site, clock


def split(response: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        headers[name.lower()] = value
    return status, headers, body


def test_a_known_path_answers_with_the_security_headers():
    site, _ = make_site()
    status, headers, body = split(Client(site).send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert (status, body) == (200, b"hello")
    csp = b"default-src 'self'; frame-ancestors 'none'; form-action 'self'"
    assert headers[b"content-security-policy"] == csp
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert headers[b"referrer-policy"] == b"no-referrer"
    assert headers[b"x-frame-options"] == b"DENY"
    assert headers[b"cache-control"] == b"no-store"


@pytest.mark.parametrize("path", [b"/", b"/nothing", b"/api", b"/api/v1", b"/api/v1/nothing"])
def test_an_unknown_path_is_404_in_json(path):
    site, _ = make_site()
    response = Client(site).send(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = split(response)
    assert status == 404
    assert headers[b"content-type"] == b"application/json; charset=utf-8"
    assert headers[b"x-frame-options"] == b"DENY"
    assert json.loads(body)["error"]["code"] == "not_found"


def test_a_path_of_several_segments_is_mounted_under_shared_inner_nodes():
    site, _ = make_site()
    response = Client(site).send(b"GET /api/v1/hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert split(response)[::2] == (200, b"hello")


def test_a_method_the_resource_lacks_is_405_with_allow():
    site, _ = make_site()
    response = Client(site).send(b"DELETE /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = split(response)
    assert status == 405
    assert headers[b"allow"] == b"GET, HEAD, POST"
    assert json.loads(body)["error"]["code"] == "method_not_allowed"


def test_head_is_answered_like_get_without_the_body():
    site, _ = make_site()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        client = Client(site)
        response = client.send(b"HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = split(response)
        assert (status, headers[b"content-length"], body) == (200, b"5", b"")
        client.transport.clear()
        status, headers, body = split(client.send(b"HEAD /nothing HTTP/1.1\r\nHost: x\r\n\r\n"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert (status, body) == (404, b"")
    assert int(headers[b"content-length"]) > 0  # the JSON error's length
    assert [formatEvent(e) for e in events] == ["http 404 HEAD /nothing from 127.0.0.1"]


def test_a_failing_resource_is_500_in_json_without_a_traceback():
    site, _ = make_site()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        response = Client(site).send(b"GET /api/v1/broken HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
    status, _, body = split(response)
    assert status == 500
    assert json.loads(body)["error"]["code"] == "internal_error"
    assert b"boom" not in body and b"Traceback" not in body
    assert any(e.get("log_failure") is not None for e in events)


def test_a_body_within_the_bound_is_read():
    site, _ = make_site()
    response = Client(site).send(
        b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1024
    )
    assert split(response)[::2] == (200, b"got 1024")


def test_a_content_length_over_the_bound_is_refused_before_the_body():
    site, _ = make_site()
    client = Client(site)
    response = client.send(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 1025\r\n\r\n")
    status, headers, body = split(response)
    assert status == 413
    assert headers[b"connection"] == b"close"
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert json.loads(body)["error"]["code"] == "body_too_large"
    assert client.transport.disconnecting


def test_a_chunked_body_is_refused_once_it_grows_past_the_bound():
    site, _ = make_site()
    client = Client(site)
    client.send(b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    first = client.send(b"400\r\n" + b"x" * 0x400 + b"\r\n")
    assert first == b""  # 1024 bytes: still within the bound
    status, _, body = split(client.send(b"1\r\nx\r\n"))
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    assert client.transport.disconnecting


def test_too_many_header_lines_are_refused():
    site, _ = make_site()
    client = Client(site)
    headers = b"".join(b"X-%d: y\r\n" % i for i in range(11))
    response = client.send(b"GET /hello HTTP/1.1\r\n" + headers + b"\r\n")
    assert response.startswith(b"HTTP/1.1 400 ")
    assert client.transport.disconnecting


def test_header_lines_over_the_size_bound_are_refused():
    site, _ = make_site()
    client = Client(site)
    response = client.send(b"GET /hello HTTP/1.1\r\nX-Big: " + b"y" * 1100 + b"\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400 ")
    assert client.transport.disconnecting
    client = Client(site)  # a line of more than twice the bound: cut off at once
    assert client.send(b"GET /hello HTTP/1.1\r\nX-Big: " + b"y" * 2100) == b""
    assert client.transport.disconnecting


def test_a_request_that_trickles_in_is_closed_when_request_time_runs_out():
    site, clock = make_site()
    client = Client(site)
    client.send(b"GET /hello HTTP/1.1\r\n")
    for _ in range(4):  # a byte a second keeps the idle timeout away
        clock.advance(1.0)
        client.send(b"X")
    assert not client.transport.disconnecting
    clock.advance(1.0)
    status, _, body = split(client.transport.value())
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert client.transport.disconnecting


def test_the_request_time_starts_again_with_the_next_request():
    site, clock = make_site()
    client = Client(site)
    client.send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(30.0)  # no request under way: no deadline
    assert not client.transport.disconnecting
    client.transport.clear()
    client.send(b"GET /hello HTTP/1.1\r\n")
    clock.advance(5.0)
    assert client.transport.value().startswith(b"HTTP/1.1 408 ")


def test_an_idle_connection_is_closed():
    site, clock = make_site()
    client = Client(site)
    clock.advance(59.0)
    assert not client.transport.disconnecting
    clock.advance(1.0)
    assert client.transport.disconnecting


def test_connections_beyond_the_bound_are_closed_unread():
    site, _ = make_site()
    first, second = Client(site, 1), Client(site, 2)
    assert isinstance(first.channel, BoundedChannel) and second.channel is not None
    assert Client(site, 3).channel is None  # the listening port closes it
    first.close()
    assert Client(site, 4).channel is not None


def test_the_log_names_refused_requests_without_query_header_or_body():
    site, _ = make_site()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        Client(site).send(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        Client(site).send(
            f"POST /nothing?secret={SECRET} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {SECRET}\r\nContent-Length: {len(SECRET)}\r\n\r\n"
            f"{SECRET}".encode()
        )
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [formatEvent(e) for e in events]
    assert "http 404 POST /nothing from 127.0.0.1" in lines
    assert not [line for line in lines if "/hello" in line]  # a success is not logged
    assert not [e for e in events if SECRET in repr(e)]


def test_the_listener_is_on_loopback_by_default_and_serve_http_sets_it():
    from mtrkmta.cli.options import ServeOptions
    from mtrkmta.config import ConfigError

    def config(*args: str) -> Any:
        options = ServeOptions()
        options.parseOptions(["--data-dir", "/nonexistent/data", *args])
        return options.load_config(fqdn=lambda: "mx.example.test")

    assert config().listeners.http == "tcp:8025:interface=127.0.0.1"
    assert config("--http", "none").listeners.http is None
    assert config("--http", "tcp:8080").listeners.http == "tcp:8080"
    with pytest.raises(ConfigError) as caught:
        config("--http", "tcp:2525:interface=127.0.0.1")
    assert "same endpoint as listeners.smtp" in str(caught.value)
