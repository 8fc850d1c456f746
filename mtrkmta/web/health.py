"""``GET /healthz`` (the process runs) and ``GET /readyz`` (it can take mail) for orchestrators."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from mtrkmta.spool.interfaces import ISpool
from mtrkmta.tracking.interfaces import ITrackingStore
from mtrkmta.web.site import json_response

log = Logger()

READY_TIMEOUT = 5.0  # seconds each readiness check may take before it counts as failed
PROBLEM_LENGTH = 200  # characters of a failed check's reason in the answer


class Health(Resource):
    """``GET /healthz``: 200 ``{"status":"ok"}`` whenever the process answers at all."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return json_response(request, http.OK, {"status": "ok"})


def _problem(failure: Failure) -> str:
    value = failure.value
    text = failure.getErrorMessage().strip().splitlines()
    first = text[0] if text else ""
    name = type(value).__name__ if value is not None else "error"
    return f"{name}: {first}"[:PROBLEM_LENGTH] if first else name


class Ready(Resource):
    """``GET /readyz``: 200 when every check passes, else 503 naming the failed ones.

    The checks, run at once, each within ``timeout`` seconds: ``listeners`` (every
    configured listener is bound: ``unbound()`` names those that are not), ``store``
    (the tracking store answers a query, :meth:`ITrackingStore.ping`) and ``spool``
    (a file can be created, fsync'd and removed in the spool, :meth:`ISpool.probe`).
    A change of the answer is logged, once.
    """

    isLeaf = True

    def __init__(
        self,
        *,
        unbound: Callable[[], Sequence[str]],
        store: ITrackingStore,
        spool: ISpool,
        clock: IReactorTime,
        timeout: float = READY_TIMEOUT,
    ) -> None:
        super().__init__()
        self.unbound = unbound
        self.store = store
        self.spool = spool
        self.clock = clock
        self.timeout = timeout
        self._failed: tuple[str, ...] = ()  # what the last answer named

    def render_GET(self, request: Any) -> object:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(document: dict[str, Any]) -> None:
            if gone:
                return
            ready = document["status"] == "ready"
            body = json_response(request, http.OK if ready else http.SERVICE_UNAVAILABLE, document)
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()

        ensureDeferred(self.check()).addCallback(answer)
        return NOT_DONE_YET

    def _within(self, work: Deferred[None]) -> Deferred[None]:
        """``work``'s outcome, or a TimeoutError after ``timeout`` seconds. ``work`` itself
        is left to finish (a store or spool closing waits for what runs in its threads)."""
        result: Deferred[None] = Deferred()

        def too_late() -> None:
            result.errback(TimeoutError(f"no answer in {self.timeout:g}s"))

        timer = self.clock.callLater(self.timeout, too_late)

        def finished(outcome: object) -> None:
            if result.called:
                return  # timed out already; a late failure is dropped with it
            timer.cancel()
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(None)

        work.addBoth(finished)
        return result

    async def check(self) -> dict[str, Any]:
        """The readiness answer: ``{"status": "ready" | "not ready", "failed": [...],
        "checks": {name: {"ok": bool, "problem": str (when not ok)}}}``."""
        checks: dict[str, dict[str, Any]] = {}
        unbound = list(self.unbound())
        checks["listeners"] = (
            {"ok": True}
            if not unbound
            else {"ok": False, "problem": "not bound: " + ", ".join(unbound)}
        )
        probes: list[tuple[str, Deferred[None]]] = [
            ("store", self._within(self.store.ping())),
            ("spool", self._within(self.spool.probe())),
        ]
        results = await DeferredList([d for _, d in probes], consumeErrors=True)
        for (name, _), (ok, result) in zip(probes, results, strict=True):
            if ok or not isinstance(result, Failure):
                checks[name] = {"ok": True}
            else:
                checks[name] = {"ok": False, "problem": _problem(result)}
        failed = tuple(name for name, check in checks.items() if not check["ok"])
        if failed != self._failed:
            if failed:
                log.warn(
                    "http: /readyz: not ready: {problems}",
                    problems="; ".join(f"{n}: {checks[n]['problem']}" for n in failed),
                )
            else:
                log.info("http: /readyz: ready again")
            self._failed = failed
        return {
            "status": "not ready" if failed else "ready",
            "failed": list(failed),
            "checks": checks,
        }
