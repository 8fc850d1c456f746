"""The metrics of a whole node: counted where the events happen, served at /metrics."""

from __future__ import annotations

import urllib.request

import pytest_twisted
from certs import tls_options
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from smtpwire import Wire, in_thread, message, queue_emptied, until
from test_dsn_end_to_end import SENDER, node_with_fake, send
from test_receive_tls_auth import secure
from test_relay_end_to_end import relaying
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from mtrkmta.web.metrics import metrics_resource


def refuse_relaying(port: int) -> int:
    with Wire(port) as wire:
        assert wire.ehlo().code == 250
        assert wire.command(f"MAIL FROM:<{SENDER}>").code == 250
        code = wire.command("RCPT TO:<x@elsewhere.example>").code  # RFC 5321 §3.6.2
        wire.command("QUIT")
    return code


def fetch(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


@pytest_twisted.ensureDeferred
async def test_a_node_counts_acceptance_refusals_deliveries_and_dsns(tmp_path):
    async with node_with_fake(tmp_path) as (node, fake):
        fake.rcpt_replies["bad@relay.example"] = "550 5.1.1 <bad@relay.example> User unknown"
        assert await in_thread(refuse_relaying, node.port("smtp")) == 554
        await in_thread(
            send, node.port("smtp"), SENDER, [("bad@relay.example", ""), ("ok@relay.example", "")]
        )
        await queue_emptied(node)
        value = node.metrics.registry.get_sample_value
        assert value("mtrkmta_messages_accepted_total", {"listener": "smtp"}) == 1
        assert value("mtrkmta_messages_accepted_total", {"listener": "dsn"}) == 1
        refused = {"listener": "smtp", "reason": "relay_denied"}
        assert value("mtrkmta_messages_refused_total", refused) == 1
        failed = {"outcome": "failed", "transport": "smtp"}
        assert value("mtrkmta_deliveries_total", failed) == 1
        relayed = {"outcome": "relayed", "transport": "smtp"}
        assert value("mtrkmta_deliveries_total", relayed) == 1
        dsn = {"outcome": "delivered", "transport": "maildir"}  # the DSN, into sender's Maildir
        assert value("mtrkmta_deliveries_total", dsn) == 1
        assert value("mtrkmta_dsns_sent_total", {"kind": "failed"}) == 1
        assert value("mtrkmta_delivery_attempt_seconds_count", {"transport": "smtp"}) == 1
        assert value("mtrkmta_delivery_delay_seconds_count", {"outcome": "failed"}) == 1
        assert value("mtrkmta_delivery_delay_seconds_count", {"outcome": "delivered"}) == 1
        assert value("mtrkmta_queue_messages", {"state": "waiting"}) == 0
        assert value("mtrkmta_processes_up") == 1

        # The same numbers at GET /metrics, on a site of the node's resource.
        root = Resource()
        root.putChild(b"metrics", metrics_resource(node.exposition))
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        try:
            url = f"http://127.0.0.1:{port.getHost().port}/metrics"
            content_type, text = await in_thread(fetch, url)
        finally:
            await port.stopListening()
        assert content_type == CONTENT_TYPE_LATEST  # the Prometheus text format
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples[("mtrkmta_messages_accepted_total", (("listener", "smtp"),))] == 1
        assert samples[("mtrkmta_dsns_sent_total", (("kind", "failed"),))] == 1


def send_over_starttls(port: int) -> None:
    with Wire(port) as wire:
        secure(wire)
        assert wire.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert wire.command("RCPT TO:<ok@relay.example>").code == 250
        assert wire.data(message()).code == 250
        wire.command("QUIT")


@pytest_twisted.ensureDeferred
async def test_tls_sessions_in_and_out_are_counted(tmp_path):
    # RFC 3207: the client's STARTTLS to us (in), ours to the next hop (out).
    async with relaying(tmp_path, tls=True, options=tls_options(tmp_path / "tls")) as rig:
        node = rig.node
        assert node is not None
        await in_thread(send_over_starttls, node.port("smtp"))
        await queue_emptied(node)
        value = node.metrics.registry.get_sample_value
        assert value("mtrkmta_tls_sessions_total", {"direction": "in"}) == 1
        assert value("mtrkmta_tls_sessions_total", {"direction": "out"}) == 1
        relayed = {"outcome": "relayed", "transport": "smtp"}
        assert value("mtrkmta_deliveries_total", relayed) == 1


@pytest_twisted.ensureDeferred
async def test_a_deferred_message_waits_in_the_queue_count(tmp_path):
    async with node_with_fake(tmp_path) as (node, fake):
        fake.rcpt_replies["later@relay.example"] = "451 4.3.0 <later@relay.example> try later"
        await in_thread(send, node.port("smtp"), SENDER, [("later@relay.example", "")])
        value = node.metrics.registry.get_sample_value
        deferred = {"outcome": "deferred", "transport": "smtp"}
        await until(lambda: value("mtrkmta_deliveries_total", deferred) == 1, "the deferral")

        def counts() -> tuple[float | None, float | None]:
            return (
                value("mtrkmta_queue_messages", {"state": "active"}),
                value("mtrkmta_queue_messages", {"state": "waiting"}),
            )

        await until(lambda: counts() == (0, 1), "the message to wait for its retry")
        assert value("mtrkmta_delivery_delay_seconds_count", {"outcome": "deferred"}) is None
