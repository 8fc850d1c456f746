"""GET /metrics: the node's metrics in the Prometheus text format (prometheus_client)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

log = Logger()

Exposition = Callable[[], "Deferred[bytes] | bytes"]


class MetricsResource(Resource):
    """Renders what ``exposition`` returns: the text of the node's registry, with the
    worker processes' counts summed in (``MTAService.exposition``: it reads their files in a
    pool thread, never on the reactor thread)."""

    isLeaf = True

    def __init__(self, exposition: Exposition) -> None:
        super().__init__()
        self.exposition = exposition

    def render_GET(self, request: Request) -> int:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def send(text: bytes) -> None:
            if gone:
                return
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.setHeader(b"Cache-Control", b"no-store")
            request.write(text)
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("cannot render the metrics", failure)
            if gone:
                return
            request.setResponseCode(500)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.write(b"metrics unavailable; see the node's log\n")
            request.finish()

        maybeDeferred(self.exposition).addCallbacks(send, failed)
        return NOT_DONE_YET


def metrics_resource(exposition: Exposition) -> MetricsResource:
    """The ``/metrics`` child of the site: ``children[b"metrics"] =
    metrics_resource(service.exposition)``."""
    return MetricsResource(exposition)
