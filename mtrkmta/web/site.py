"""The HTTP service's root: a resource tree with JSON errors, security headers and bounds."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import ErrorPage, IResource, Resource
from twisted.web.server import Request, Site, UnsupportedMethod

from mtrkmta.config.schema import Http
from mtrkmta.sessions import SessionTable

log = Logger()

# On every response; a resource may replace one (a page that may be cached, say).
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    # Only this site's own files; no framing; forms post back here (the tracking page).
    (b"Content-Security-Policy", b"default-src 'self'; frame-ancestors 'none'; form-action 'self'"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"X-Frame-Options", b"DENY"),
    (b"Cache-Control", b"no-store"),
)
JSON_TYPE = b"application/json; charset=utf-8"
LOGGED_PATH = 200  # characters of a path the log keeps


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The bounds every connection and request meets (the ``[http]`` keys)."""

    max_body: int = 64 * 1024
    max_headers: int = 100
    header_size: int = 16 * 1024
    idle_timeout: float = 60.0
    request_time: float = 30.0
    max_connections: int = 100

    @classmethod
    def from_config(cls, config: Http) -> HttpLimits:
        return cls(
            max_body=config.max_body,
            max_headers=config.max_headers,
            header_size=config.header_size,
            idle_timeout=config.idle_timeout,
            request_time=config.request_time,
            max_connections=config.max_connections,
        )


def json_bytes(document: object) -> bytes:
    """``document`` as the JSON a response carries (UTF-8, one line ending)."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def json_response(request: Any, status: int, document: object) -> bytes:
    """Set ``status`` and the JSON content type on ``request``; the body to return."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON_TYPE)
    return json_bytes(document)


def error_document(code: str, message: str) -> dict[str, Any]:
    """The body of every error: ``{"error": {"code": stable code, "message": text}}``."""
    return {"error": {"code": code, "message": message}}


def json_error(request: Any, status: int, code: str, message: str) -> bytes:
    """An error answer with a stable ``code`` that clients can test."""
    return json_response(request, status, error_document(code, message))


class NotFound(Resource):
    """Any path the tree does not have, whatever the method: 404 ``not_found``."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        return json_error(request, http.NOT_FOUND, "not_found", "no such resource")


class Directory(Resource):
    """An inner node of the tree: itself and any child it lacks answer 404."""

    def getChild(self, path: bytes, request: Any) -> IResource:
        return NotFound()

    def render(self, request: Any) -> bytes:
        return NotFound().render(request)


class Root(Directory):
    """The tree's root. ``children`` maps paths to the service's parts: one segment
    (``b"healthz"``) or several (``b"api/v1/queue"``), whose inner nodes are made as
    :class:`Directory` resources and shared."""

    def __init__(self, children: Mapping[bytes, IResource]) -> None:
        super().__init__()
        for path, child in children.items():
            self.mount(path, child)

    def mount(self, path: bytes, child: IResource) -> None:
        *parents, last = path.strip(b"/").split(b"/")
        node: Resource = self
        for name in parents:
            inner = node.children.get(name)
            if not isinstance(inner, Resource):
                inner = Directory()
                node.putChild(name, inner)
            node = inner
        node.putChild(last, child)


class _JSONMethods(Resource):
    """Renders a resource; a method it lacks gets 405 ``method_not_allowed`` with Allow."""

    isLeaf = True

    def __init__(self, inner: IResource) -> None:
        super().__init__()
        self.inner = inner

    def render(self, request: Any) -> Any:
        body = self._render(request)
        if request.method == b"HEAD" and isinstance(body, bytes):
            # GET's answer without its body (RFC 9110 §9.3.2); written later (NOT_DONE_YET),
            # twisted.web drops the body of a HEAD request itself.
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return b""
        return body

    def _render(self, request: Any) -> Any:
        try:
            return self.inner.render(request)
        except UnsupportedMethod as error:
            allowed: list[bytes] = sorted(error.allowedMethods)
            render_get = getattr(self.inner, "render_GET", None)
            if request.method == b"HEAD" and render_get is not None:
                return render_get(request)
            request.setHeader(b"Allow", b", ".join(allowed))
            return json_error(
                request,
                http.NOT_ALLOWED,
                "method_not_allowed",
                f"allowed: {', '.join(m.decode('ascii', 'replace') for m in allowed)}",
            )


class BoundedRequest(Request):
    """A request with the security headers, JSON errors and the body bound."""

    _body_seen = 0

    def process(self) -> None:
        for name, value in SECURITY_HEADERS:
            self.setHeader(name, value)
        super().process()

    def render(self, resrc: IResource) -> None:
        if isinstance(resrc, ErrorPage):  # twisted.web's own NoResource and the like
            resrc = _ErrorAsJSON(resrc.code, resrc.brief)
        super().render(_JSONMethods(resrc))

    def handleContentChunk(self, data: bytes) -> None:
        self._body_seen += len(data)
        channel = self.channel
        if isinstance(channel, BoundedChannel) and self._body_seen > channel.limits.max_body:
            channel.refuse_body()
            return
        super().handleContentChunk(data)

    def processingFailed(self, reason: Failure) -> Failure:
        log.failure(
            "http: {method} {path} failed",
            reason,
            method=_text(self.method),
            path=_text(self.path)[:LOGGED_PATH],
        )
        if self.startedWriting:  # too late for an error answer: end the connection
            if self.channel is not None:
                self.channel.loseConnection()
            return reason
        body = json_error(
            self, http.INTERNAL_SERVER_ERROR, "internal_error", "the server failed; see its log"
        )
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()
        return reason


class _ErrorAsJSON(Resource):
    isLeaf = True

    def __init__(self, status: int, brief: str) -> None:
        super().__init__()
        self.status = status
        self.brief = brief

    def render(self, request: Any) -> bytes:
        code = "not_found" if self.status == http.NOT_FOUND else "error"
        return json_error(request, self.status, code, self.brief.lower())


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("ascii", "backslashreplace")


def _raw_response(status: int, document: object) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for refusals made before a
    request object could answer (body too large, request too slow)."""
    body = json_bytes(document)
    reason = http.RESPONSES.get(status, b"Error")
    head = [b"HTTP/1.1 %d %s" % (status, reason)]
    head += [name + b": " + value for name, value in SECURITY_HEADERS]
    head += [
        b"Content-Type: " + JSON_TYPE,
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class BoundedChannel(http.HTTPChannel):
    """One HTTP connection with the service's bounds: headers (count and bytes, set by
    the site), the body (refused 413 from Content-Length or once it grows past the
    bound), and the whole request's time from its first byte (408 and closed)."""

    limits: HttpLimits = HttpLimits()
    table: SessionTable | None = None
    peer: str = ""
    _deadline: IDelayedCall | None = None
    _refused = False

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._deadline is None and not self._handlingRequest and data:
            self._deadline = self.callLater(self.limits.request_time, self._too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > self.limits.max_body:
            self.refuse_body()  # before a byte of the body is read
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()

    def refuse_body(self) -> None:
        self._refuse(
            http.REQUEST_ENTITY_TOO_LARGE,
            "body_too_large",
            f"the request body is larger than {self.limits.max_body} bytes (http.max_body)",
        )

    def _too_slow(self) -> None:
        self._deadline = None
        log.info(
            "http: request from {peer} not complete after {seconds:g}s (http.request_time): closed",
            peer=self.peer,
            seconds=self.limits.request_time,
        )
        self._refuse(
            http.REQUEST_TIMEOUT,
            "request_timeout",
            f"the request took longer than {self.limits.request_time:g}s to arrive",
        )

    def _refuse(self, status: int, code: str, message: str) -> None:
        if self._refused or self.transport is None:
            return
        self._refused = True
        self._cancel_deadline()
        self.transport.write(_raw_response(status, error_document(code, message)))
        self.loseConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def shutdown(self) -> None:
        """Close the connection (the node is stopping); SessionTable.drain calls it."""
        if self.transport is not None:
            self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)
        if self.table is not None:
            self.table.release(self, self.peer)


class BoundedSite(Site):
    """The HTTP service's factory: the root, the bounds, one line per refused request."""

    protocol = BoundedChannel  # type: ignore[assignment]  # HTTP/1.1 only, no HTTP/2 switch
    requestFactory = BoundedRequest
    noisy = False  # no "Starting factory" line in the log

    def __init__(self, root: IResource, limits: HttpLimits, reactor: Any) -> None:
        super().__init__(root, timeout=limits.idle_timeout, reactor=reactor)
        self.limits = limits
        self.connections = SessionTable(limits.max_connections, limits.max_connections)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        peer = _peer(addr)
        channel = super().buildProtocol(addr)
        if self.connections.admit(channel, peer) is not None:
            log.info(
                "http: connection from {peer} refused: {n} open (http.max_connections)",
                peer=peer,
                n=self.limits.max_connections,
            )
            return None  # the connection is closed before anything is read
        channel.limits = self.limits
        channel.table = self.connections
        channel.peer = peer
        channel.maxHeaders = self.limits.max_headers
        channel.totalHeadersSize = self.limits.header_size
        # A longer line is cut off without an answer; up to it, the 400 above says why.
        channel.MAX_LENGTH = 2 * self.limits.header_size
        return channel

    def log(self, request: Any) -> None:
        """One line for a request answered with an error (status 400 and above): method,
        path without its query string, status and client. Never a header, a query
        string or a body (they may carry secrets); successful requests (orchestrators'
        probes every few seconds) are not logged."""
        if request.code < 400:
            return
        log.info(
            "http {status} {method} {path} from {peer}",
            status=request.code,
            method=_text(request.method)[:16],
            path=_text(request.path)[:LOGGED_PATH],
            peer=_peer(request.getClientAddress()),
        )


def _peer(address: object) -> str:
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else str(address)


def build_site(
    children: Mapping[bytes, IResource], limits: HttpLimits, reactor: Any
) -> BoundedSite:
    """The HTTP service: ``children`` mounted under the root (``{b"healthz": ...,
    b"api/v1/queue": ...}``, see :class:`Root`); every other path answers 404 in JSON."""
    return BoundedSite(Root(children), limits, reactor)
