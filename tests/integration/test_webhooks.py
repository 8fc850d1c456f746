"""Webhooks end to end: a node POSTs its tracking events to a local twisted.web receiver
that fails and then recovers, and a real ``mtrkmta serve`` killed with SIGKILL while the
receiver is down sends every event after its restart, with the same event ids."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest_twisted
from certs import write_certificate
from servprocess import ServeProcess
from smtpwire import Wire, in_thread, message, queue_emptied, queue_id_of, until
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mtrkmta.config import Webhook
from mtrkmta.envelope import Envelope, Recipient
from mtrkmta.metrics import WEBHOOK_RESULTS, PrometheusMetrics
from mtrkmta.testing import database_url, node_config, start_node, stop_node
from mtrkmta.tls import server_context
from mtrkmta.tracking.memory import MemoryTrackingStore
from mtrkmta.webhooks import WebhookSender

SECRET = b"webhook test secret, 32 bytes.."
SIGNATURE = re.compile(r"^t=(\d+),v1=([0-9a-f]{64})$")


@dataclass
class Received:
    """One request the receiver got."""

    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def event(self) -> dict[str, object]:
        return json.loads(self.body)


@dataclass
class Receiver(Resource):
    """Answers the first POSTs with ``failures`` (status codes; a 302 redirects to
    /elsewhere), leaves the first ``hold`` of them unanswered, then answers 200;
    ``delivered`` fires once events of every kind in ``expect`` were answered 200."""

    expect: frozenset[str]
    failures: tuple[int, ...] = ()
    hold: int = 0
    requests: list[Received] = field(default_factory=list)
    paths: list[bytes] = field(default_factory=list)
    delivered: Deferred[None] = field(default_factory=Deferred)
    unanswered: set[Request] = field(default_factory=set)
    most_at_once: int = 0
    isLeaf = True

    def __post_init__(self) -> None:
        Resource.__init__(self)

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        self.paths.append(request.path)
        self.most_at_once = max(self.most_at_once, len(self.unanswered) + 1)
        headers = {k.decode(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        body = request.content.read()
        if len(self.requests) < self.hold:
            self.requests.append(Received(headers, body, 0))
            self.unanswered.add(request)
            request.notifyFinish().addBoth(lambda _: self.unanswered.discard(request))
            return NOT_DONE_YET
        n = len(self.requests) - self.hold
        code = self.failures[n] if n < len(self.failures) else 200
        self.requests.append(Received(headers, body, code))
        request.setResponseCode(code)
        if code == 302:
            request.setHeader(b"Location", b"/elsewhere")
        if code == 200 and self.expect <= self.kinds() and not self.delivered.called:
            self.delivered.callback(None)
        return b"ok\n" if code == 200 else b"not now\n"

    def kinds(self) -> set[str]:
        return {str(r.event["kind"]) for r in self.requests if r.answered == 200}


def verified(received: Received) -> bool:
    found = SIGNATURE.match(received.headers["Mtrkmta-Signature"])
    assert found is not None
    signed = found.group(1).encode() + b"." + received.body
    expected = hmac.new(SECRET, signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, found.group(2))


def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook.secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    return path


class CountingSite(Site):
    """A Site that knows its open connections, so that a test can wait for them to close
    (the node's requests say ``Connection: close``)."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.open: set[object] = set()
        self._idle: list[Deferred[None]] = []

    def buildProtocol(self, addr: object) -> Any:
        protocol = super().buildProtocol(addr)
        self.open.add(protocol)
        lost = protocol.connectionLost

        def connection_lost(reason: object) -> None:
            lost(reason)
            self.open.discard(protocol)
            if not self.open:
                waiting, self._idle = self._idle, []
                for d in waiting:
                    d.callback(None)

        protocol.connectionLost = connection_lost
        return protocol

    def idle(self) -> Deferred[None]:
        if not self.open:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d


@pytest_twisted.async_yield_fixture
async def listening() -> AsyncIterator[list[tuple[IListeningPort, CountingSite]]]:
    """The receivers' listening ports, closed at the end once their connections are."""
    ports: list[tuple[IListeningPort, CountingSite]] = []
    yield ports
    for port, site in ports:
        await port.stopListening()
        await site.idle()


def listen(
    receiver: Receiver, ports: list[tuple[IListeningPort, CountingSite]], port: int = 0
) -> int:
    site = CountingSite(receiver)
    listening_port = reactor.listenTCP(port, site, interface="127.0.0.1")
    ports.append((listening_port, site))
    return int(listening_port.getHost().port)


def send(port: int, *rcpts: str) -> str:
    with Wire(port) as wire:
        wire.ehlo()
        wire.command("MAIL FROM:<a@sender.example> ENVID=hook-test")
        for rcpt in rcpts or ("b@localhost",):
            wire.command(f"RCPT TO:<{rcpt}>")
        wire.command("DATA")
        wire.send(message("webhook") + b".\r\n")
        return queue_id_of(wire.reply())


@pytest_twisted.ensureDeferred
async def test_events_arrive_signed_after_the_receiver_recovers(tmp_path, listening):
    receiver = Receiver(frozenset({"arrived", "delivered"}), failures=(500, 302, 503))
    port = listen(receiver, listening)
    hooks = {
        "rcv": {
            "url": f"http://127.0.0.1:{port}/hook",
            "secret_file": str(secret_file(tmp_path)),
            "events": ["arrived", "delivered", "failed"],
            "first_retry": "0.1s",
            "max_retry_interval": "0.2s",
            "timeout": "5s",
        }
    }
    node = await start_node(node_config(tmp_path / "data", options=(("webhooks", hooks),)))
    try:
        queue_id = await in_thread(send, node.port("smtp"))
        await queue_emptied(node)
        await receiver.delivered
        counted = node.metrics.registry.get_sample_value
        delivered = await until(
            lambda: counted("mtrkmta_webhook_deliveries_total", {"result": "delivered"}) == 2,
            "both deliveries counted",
        )
        retried = counted("mtrkmta_webhook_deliveries_total", {"result": "retried"})
    finally:
        await stop_node(node)
    assert (delivered, retried) == (True, 3)
    assert [r.answered for r in receiver.requests[:3]] == [500, 302, 503]
    assert set(receiver.paths) == {b"/hook"}  # the redirect was not followed
    assert all(verified(r) for r in receiver.requests)
    assert all(r.headers["Content-Type"] == "application/json" for r in receiver.requests)
    ids = {r.headers["Mtrkmta-Event-Id"] for r in receiver.requests}
    assert ids == {str(r.event["id"]) for r in receiver.requests}
    assert len(ids) == 2  # retries carry the same id: the receiver can drop duplicates
    by_kind = {r.event["kind"]: r.event for r in receiver.requests if r.answered == 200}
    assert by_kind["arrived"]["queue_id"] == queue_id
    assert by_kind["arrived"]["envid"] == "hook-test"
    assert by_kind["arrived"]["sender"] == "a@sender.example"
    assert by_kind["delivered"]["recipient"] == "b@localhost"
    assert by_kind["delivered"]["status"] == "2.1.5"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_config(tmp_path: Path, hook_port: int, workers: int = 1) -> Path:
    """The configuration file of a ``mtrkmta serve`` with one hook, "rcv", on ``hook_port``."""
    data_dir = tmp_path / "data"
    config = tmp_path / "mtrkmta.toml"
    config.write_text(
        f"""
[server]
hostname = "mx.example.test"
data_dir = "{data_dir}"
database = "{database_url(data_dir)}"
workers = {workers}

[listeners]
smtp = "tcp:0:interface=127.0.0.1"
submission = "none"
lmtp = "none"
mtqp = "none"
http = "none"

[webhooks.rcv]
url = "http://127.0.0.1:{hook_port}/hook"
secret_file = "{secret_file(tmp_path)}"
events = ["arrived", "delivered"]
first_retry = "0.1s"
max_retry_interval = "0.2s"
timeout = "1s"
""",
        encoding="utf-8",
    )
    return config


NOT_DELIVERED = re.compile(r"webhook rcv: event ([0-9a-f]{32}) \(\S+\) not delivered")


@pytest_twisted.ensureDeferred
async def test_events_survive_a_sigkill_while_the_receiver_is_down(tmp_path, listening):
    hook_port = free_port()  # nothing listens there yet: connections are refused
    args = ["--config", str(serve_config(tmp_path, hook_port))]
    first = ServeProcess(args, tmp_path)
    try:
        port = await in_thread(first.port)
        await in_thread(send, port)

        def two_failed_events() -> set[str]:
            ids: set[str] = set()
            while len(ids) < 2:
                ids.add(first.wait_for(NOT_DELIVERED).group(1))
            return ids

        failed = await in_thread(two_failed_events)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    finally:
        first.stop()
    receiver = Receiver(frozenset({"arrived", "delivered"}))
    listen(receiver, listening, hook_port)
    second = ServeProcess(args, tmp_path)
    try:
        await receiver.delivered
    finally:
        await in_thread(second.stop)
    assert {r.headers["Mtrkmta-Event-Id"] for r in receiver.requests} == failed
    assert all(verified(r) for r in receiver.requests)


def hook_table(tmp_path: Path, url: str, **keys: object) -> dict[str, object]:
    return {
        "url": url,
        "secret_file": str(secret_file(tmp_path)),
        "first_retry": "0.1s",
        "max_retry_interval": "0.2s",
        **keys,
    }


@pytest_twisted.ensureDeferred
async def test_requests_in_flight_are_bounded_and_a_silent_receiver_times_out(tmp_path, listening):
    # Two recipients: three events. The receiver keeps the first two requests waiting:
    # with concurrency 2 the third event waits until the timeout frees a place, and the
    # two that timed out come again, with their ids.
    receiver = Receiver(frozenset({"arrived", "delivered"}), hold=2)
    port = listen(receiver, listening)
    url = f"http://127.0.0.1:{port}/hook"
    hooks = {"rcv": hook_table(tmp_path, url, concurrency=2, timeout="1s")}
    node = await start_node(node_config(tmp_path / "data", options=(("webhooks", hooks),)))
    try:
        await in_thread(send, node.port("smtp"), "b@localhost", "c@localhost")
        await queue_emptied(node)
        await receiver.delivered
        await until(lambda: len(receiver.requests) >= 5, "every event answered")
    finally:
        await stop_node(node)
    assert receiver.most_at_once == 2
    held = {r.headers["Mtrkmta-Event-Id"] for r in receiver.requests[:2]}
    answered = {r.headers["Mtrkmta-Event-Id"] for r in receiver.requests if r.answered == 200}
    assert len(held) == 2 and held <= answered and len(answered) == 3


@pytest_twisted.ensureDeferred
async def test_https_receivers_are_verified_against_the_ca_file(tmp_path, listening):
    certificate, private_key = write_certificate(tmp_path / "tls", "localhost")
    receiver = Receiver(frozenset({"arrived"}))
    options = server_context(certificate, private_key)
    site = CountingSite(receiver)
    tls_port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
    listening.append((tls_port, site))
    url = f"https://localhost:{tls_port.getHost().port}/hook"
    hooks = {
        "trusted": hook_table(tmp_path, url, ca_file=str(certificate), events=["arrived"]),
        "untrusted": hook_table(tmp_path, url, events=["arrived"]),  # the system's CAs
    }
    refused: Deferred[str] = Deferred()

    def observe(event: dict[str, object]) -> None:
        if event.get("hook") == "untrusted" and "reason" in event and not refused.called:
            refused.callback(str(event["reason"]))

    globalLogPublisher.addObserver(observe)
    node = await start_node(node_config(tmp_path / "data", options=(("webhooks", hooks),)))
    try:
        await in_thread(send, node.port("smtp"))
        await receiver.delivered
        reason = await refused
    finally:
        await stop_node(node)
        globalLogPublisher.removeObserver(observe)
    assert len(receiver.requests) == 1  # the trusted hook's; the other never got through TLS
    assert "certificate verify failed" in reason


@pytest_twisted.ensureDeferred
async def test_worker_processes_write_the_outbox_and_the_master_sends_it(tmp_path, listening):
    receiver = Receiver(frozenset({"arrived", "delivered"}))
    hook_port = listen(receiver, listening)
    process = ServeProcess(["--config", str(serve_config(tmp_path, hook_port, 2))], tmp_path)
    try:
        port = await in_thread(process.port)
        await in_thread(process.wait_for, "worker 1: smtp accepting on")
        os.kill(process.proc.pid, signal.SIGSTOP)  # only the worker can take the message now
        try:
            queue_id = await in_thread(send, port)
        finally:
            os.kill(process.proc.pid, signal.SIGCONT)
        await receiver.delivered
    finally:
        await in_thread(process.stop)
    assert {r.event["queue_id"] for r in receiver.requests} == {queue_id}
    assert all(verified(r) for r in receiver.requests)
    output = [*process.seen, *iter(process.lines.get_nowait, None)]  # read to the end by stop
    sent = [line for line in output if "webhook rcv: delivered" in line]
    assert sent and not any("[worker 1" in line for line in sent)  # the master's lines


class Logged:
    """The log events of the webhook sender, and a Deferred for the next one that matches."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._waiting: list[tuple[str, Deferred[dict[str, Any]]]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        text = str(event.get("log_format", ""))
        if "webhook" not in text:
            return
        self.events.append(event)
        for wanted, d in list(self._waiting):
            if wanted in text:
                self._waiting.remove((wanted, d))
                d.callback(event)

    def next(self, wanted: str) -> Deferred[dict[str, Any]]:
        d: Deferred[dict[str, Any]] = Deferred()
        self._waiting.append((wanted, d))
        return d


@pytest_twisted.async_yield_fixture
async def logged() -> AsyncIterator[Logged]:
    observer = Logged()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


async def record_arrivals(store: MemoryTrackingStore, *queue_ids: str) -> None:
    for queue_id in queue_ids:
        envelope = Envelope(queue_id, "a@sender.example", (Recipient("b@dest.example"),))
        await store.record_arrival(envelope, reporting_mta="mx.test", node_id="n", size=1)


@pytest_twisted.ensureDeferred
async def test_an_event_failing_past_max_age_is_dropped_with_a_log_line(
    tmp_path, listening, logged
):
    # The time is a clock the test advances; the requests go over real sockets.
    receiver = Receiver(frozenset({"arrived"}), failures=(500,) * 10)
    url = f"http://127.0.0.1:{listen(receiver, listening)}/hook"
    hook = Webhook("h", url, secret_file(tmp_path), max_age=60.0, first_retry=10.0,
                   max_retry_interval=20.0)  # fmt: skip
    clock = Clock()
    clock.advance(1_700_000_000)
    store = MemoryTrackingStore(clock, webhooks=(hook,))
    await record_arrivals(store, "Q1")
    metrics = PrometheusMetrics()
    sender = WebhookSender(reactor, store, (hook,), {"h": SECRET}, owner="t", max_entries=10,
                           clock=clock, draw=lambda: 0.0, metrics=metrics)  # fmt: skip
    failed = logged.next("not delivered")
    sender.start()
    try:
        event = await failed
        assert (event["attempts"], event["delay"]) == (1, 5.0)  # first_retry 10, jitter 0
        assert event["reason"] == "HTTP 500: not now\\x{0A}"
        dropped = logged.next("dropped event")
        clock.advance(50)  # the second attempt fails; the third would be at 60 s: too late
        event = await dropped
        assert (event["attempts"], event["max_age"]) == (2, 60.0)
    finally:
        await sender.stop()
    assert len(receiver.requests) == 2
    assert await store.claim_webhooks("h", "t", 10, 10.0) == []
    counted = metrics.registry.get_sample_value
    assert [
        counted("mtrkmta_webhook_deliveries_total", {"result": r}) for r in WEBHOOK_RESULTS
    ] == [1.0 if r in ("retried", "dropped") else None for r in WEBHOOK_RESULTS]


@pytest_twisted.ensureDeferred
async def test_the_oldest_events_beyond_the_outbox_limit_are_dropped_with_a_log_line(
    tmp_path, listening, logged
):
    receiver = Receiver(frozenset({"arrived"}))
    url = f"http://127.0.0.1:{listen(receiver, listening)}/hook"
    hook = Webhook("h", url, secret_file(tmp_path))
    clock = Clock()
    store = MemoryTrackingStore(clock, webhooks=(hook,))
    await record_arrivals(store, "Q1", "Q2", "Q3")
    sender = WebhookSender(reactor, store, (hook,), {"h": SECRET}, owner="t", max_entries=1,
                           clock=clock)  # fmt: skip
    dropped = logged.next("undelivered event(s)")
    sender.start()
    try:
        assert (await dropped)["count"] == 2
        await receiver.delivered
    finally:
        await sender.stop()
    assert [r.event["queue_id"] for r in receiver.requests] == ["Q3"]
