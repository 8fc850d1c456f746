"""/healthz and /readyz (mtrkmta.web.health) over memory stores and a clock: each check, its
timeout, and the 503 that names what failed."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from test_web_site import LIMITS, Client, split
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher

from mtrkmta.spool.memory import MemorySpool
from mtrkmta.tracking.memory import MemoryTrackingStore
from mtrkmta.web.health import Health, Ready
from mtrkmta.web.site import build_site


class HangingStore(MemoryTrackingStore):
    """A store whose database never answers (a network partition, a locked table)."""

    def ping(self) -> Deferred[None]:
        return Deferred()


class Node:
    def __init__(self, store_class: type[MemoryTrackingStore] = MemoryTrackingStore) -> None:
        self.clock = MemoryReactorClock()
        self.store = store_class(self.clock)
        self.spool = MemorySpool()
        self.unbound: list[str] = []
        self.site = build_site(
            {
                b"healthz": Health(),
                b"readyz": Ready(
                    unbound=lambda: self.unbound,
                    store=self.store,
                    spool=self.spool,
                    clock=self.clock,
                    timeout=5.0,
                ),
            },
            LIMITS,
            self.clock,
        )

    def get(self, path: bytes) -> tuple[int, Any]:
        client = Client(self.site)
        status, _, body = split(client.send(b"GET " + path + b" HTTP/1.1\r\n\r\n"))
        client.close()
        return status, json.loads(body)


def test_healthz_is_ok_while_the_process_answers():
    node = Node()
    node.unbound = ["smtp"]  # not ready, yet alive
    assert node.get(b"/healthz") == (200, {"status": "ok"})


def test_readyz_is_200_when_every_check_passes():
    assert Node().get(b"/readyz") == (
        200,
        {
            "status": "ready",
            "failed": [],
            "checks": {"listeners": {"ok": True}, "store": {"ok": True}, "spool": {"ok": True}},
        },
    )


def test_readyz_names_an_unwritable_spool():
    node = Node()
    node.spool.unwritable = "incoming: read-only file system"
    status, body = node.get(b"/readyz")
    assert (status, body["status"], body["failed"]) == (503, "not ready", ["spool"])
    assert body["checks"]["spool"] == {
        "ok": False,
        "problem": "SpoolError: incoming: read-only file system",
    }


@pytest_twisted.ensureDeferred
async def test_readyz_names_a_store_that_fails():
    node = Node()
    await node.store.close()
    status, body = node.get(b"/readyz")
    assert (status, body["failed"]) == (503, ["store"])
    assert body["checks"]["store"]["problem"] == "StoreClosedError: tracking store is closed"


def test_readyz_names_the_listeners_not_bound():
    node = Node()
    node.unbound = ["smtp", "mtqp"]
    status, body = node.get(b"/readyz")
    assert (status, body["failed"]) == (503, ["listeners"])
    assert body["checks"]["listeners"]["problem"] == "not bound: smtp, mtqp"


def test_a_store_that_does_not_answer_fails_readyz_after_the_timeout():
    node = Node(HangingStore)
    client = Client(node.site)
    assert client.send(b"GET /readyz HTTP/1.1\r\n\r\n") == b""  # still waiting
    node.clock.advance(4.9)
    assert client.transport.value() == b""
    node.clock.advance(0.1)
    status, _, body = split(client.transport.value())
    assert (status, json.loads(body)["failed"]) == (503, ["store"])
    assert json.loads(body)["checks"]["store"]["problem"] == "TimeoutError: no answer in 5s"


def test_head_readyz_has_the_status_and_length_of_get_without_the_body():
    node = Node()
    node.spool.unwritable = "gone"
    _, _, get_body = split(Client(node.site).send(b"GET /readyz HTTP/1.1\r\n\r\n"))
    response = Client(node.site).send(b"HEAD /readyz HTTP/1.1\r\n\r\n")
    status, headers, body = split(response)
    assert (status, body) == (503, b"")
    assert headers[b"content-length"] == b"%d" % len(get_body)


def test_a_change_of_readiness_is_logged_once():
    node = Node()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        node.get(b"/readyz")
        node.spool.unwritable = "gone"
        node.get(b"/readyz")
        node.get(b"/readyz")
        node.spool.unwritable = None
        node.get(b"/readyz")
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [formatEvent(e) for e in events if formatEvent(e).startswith("http: /readyz")]
    assert lines == [
        "http: /readyz: not ready: spool: SpoolError: gone",
        "http: /readyz: ready again",
    ]
