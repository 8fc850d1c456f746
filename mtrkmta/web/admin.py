"""The read-only admin API, ``/api/v1/queue``: the queue as ``mtrkmta queue`` shows it, behind a
bearer token."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from mtrkmta.queue.control import ControlError, queue_list, queue_show
from mtrkmta.queue.service import QueueService
from mtrkmta.web.site import NotFound, json_error, json_response

log = Logger()

MOUNT = b"api/v1/queue"  # where build_site mounts it
REALM = b'Bearer realm="mtrkmta"'  # RFC 6750 §3
MAX_QUEUE_ID = 64  # longer path segments cannot be queue ids: 404 without a look-up


class TokenFileError(Exception):
    """The admin token file cannot be used; ``str()`` is the one line that says why."""


def read_token(path: Path) -> bytes:
    """The bearer token in ``path`` (its content without surrounding white space).
    Blocking; raises TokenFileError."""
    try:
        token = path.read_bytes().strip()
    except OSError as error:
        raise TokenFileError(
            f"cannot read the admin token file {path} (http.admin_token_file): {error.strerror}"
        ) from None
    if not token:
        raise TokenFileError(
            f"the admin token file {path} (http.admin_token_file) is empty; "
            "write a long random token into it (e.g. openssl rand -hex 32)"
        )
    if any(b <= 0x20 or b >= 0x7F for b in token):
        raise TokenFileError(
            f"the admin token in {path} (http.admin_token_file) must be one word of "
            "printable ASCII characters"
        )
    return token


def bearer_token(request: Any) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750 §2.1), or None."""
    value = request.getHeader(b"Authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return bytes(token.strip())


class _Guarded(Resource):
    """A resource answered only for the right bearer token; 401 otherwise."""

    def __init__(self, token: bytes, queue: Callable[[], QueueService | None]) -> None:
        super().__init__()
        self.token = token
        self.queue = queue

    def refusal(self, request: Any) -> bytes | None:
        """The 401 answer for a request without the right token, or None to go on."""
        given = bearer_token(request)
        if given is None:
            request.setHeader(b"WWW-Authenticate", REALM)
            return json_error(
                request,
                http.UNAUTHORIZED,
                "unauthorized",
                "an Authorization: Bearer token is needed",
            )
        if not hmac.compare_digest(given, self.token):
            request.setHeader(b"WWW-Authenticate", REALM + b', error="invalid_token"')
            return json_error(request, http.UNAUTHORIZED, "invalid_token", "wrong token")
        return None

    def answer(
        self, request: Any, work: Callable[[QueueService], Coroutine[Any, Any, object]]
    ) -> object:
        refused = self.refusal(request)
        if refused is not None:
            return refused
        queue = self.queue()
        if queue is None:
            return json_error(
                request, http.SERVICE_UNAVAILABLE, "not_ready", "the queue is not running yet"
            )
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def done(document: object) -> None:
            if not gone:
                finish(request, json_response(request, http.OK, document))

        def failed(failure: Failure) -> None:
            if failure.check(ControlError):
                body = json_error(request, http.NOT_FOUND, "unknown_queue_id", str(failure.value))
            else:
                log.failure("http: admin request failed", failure)
                body = json_error(
                    request, http.INTERNAL_SERVER_ERROR, "internal_error", "see the server's log"
                )
            if not gone:
                finish(request, body)

        ensureDeferred(work(queue)).addCallbacks(done, failed)
        return NOT_DONE_YET


def finish(request: Any, body: bytes) -> None:
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


class QueueListing(_Guarded):
    """``GET /api/v1/queue``: what ``mtrkmta queue list --json`` prints for this node."""

    def getChild(self, path: bytes, request: Any) -> IResource:
        if not path or len(path) > MAX_QUEUE_ID or request.postpath:
            return NotFound()
        return QueueMessage(self.token, self.queue, path.decode("ascii", "replace"))

    def render_GET(self, request: Any) -> object:
        return self.answer(request, queue_list)


class QueueMessage(_Guarded):
    """``GET /api/v1/queue/<queue id>``: what ``mtrkmta queue show --json`` prints."""

    isLeaf = True

    def __init__(
        self, token: bytes, queue: Callable[[], QueueService | None], queue_id: str
    ) -> None:
        super().__init__(token, queue)
        self.queue_id = queue_id

    def render_GET(self, request: Any) -> object:
        return self.answer(request, lambda queue: queue_show(queue, self.queue_id))


def admin_api(token: bytes, queue: Callable[[], QueueService | None]) -> IResource:
    """The resource to mount at :data:`MOUNT` (only when a token is configured)."""
    return QueueListing(token, queue)
