"""Worker processes' metrics: each `mtrkmta serve` worker writes its counts into its directory,
where the master's /metrics sums them in (mtrkmta.metrics, doc/running.rst "Metrics")."""

from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from smtpwire import in_thread, until
from test_workers import (
    ACCEPTING,
    HOSTNAME,
    LISTENING,
    STARTED,
    TIMEOUT,
    send,
    server,
    wait_for,
)
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from mtrkmta.config import load_config
from mtrkmta.metrics import METRICS_FILE, PrometheusMetrics, merged_exposition, read_expositions
from mtrkmta.service import MTAService
from mtrkmta.testing import LOOPBACK_ANY_PORT, database_url, stop_node
from mtrkmta.web.metrics import metrics_resource
from mtrkmta.workers import ConfigOrigin, metrics_files

__all__ = ["server"]  # the fixture: a real `mtrkmta serve --workers 2`


def value(text: str, name: str, labels: dict[str, str]) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def test_a_workers_counts_reach_the_file_the_master_sums(server):
    proc, data, log = server
    logged = lambda: log.read_text("utf-8", "replace")  # noqa: E731
    port = int(wait_for(lambda: LISTENING.search(logged()), "the smtp listener", log).group(1))
    wait_for(lambda: STARTED.search(logged()), "worker 1", log)
    wait_for(lambda: ACCEPTING in logged(), "worker 1 to accept", log)
    # With the master stopped, only the worker can take the connections.
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        send(port, 3)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    path = data / "workers" / "1" / METRICS_FILE
    accepted = ("mtrkmta_messages_accepted_total", {"listener": "smtp"})
    delivered = ("mtrkmta_deliveries_total", {"outcome": "delivered", "transport": "maildir"})

    def written() -> bool:
        text = path.read_text() if path.exists() else ""
        return value(text, *accepted) == 3 and value(text, *delivered) == 3

    wait_for(written, "worker 1's metrics file to count 3 messages", log)
    assert metrics_files(data) == [path]
    # What the master's /metrics renders: its own registry plus every worker's file.
    master = PrometheusMetrics()
    master.accepted("smtp")
    text = merged_exposition(master.registry, read_expositions(metrics_files(data))).decode()
    assert value(text, *accepted) == 4
    assert value(text, *delivered) == 3


def config_file(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    path = tmp_path / "mtrkmta.toml"
    path.write_text(
        f'[server]\ndata_dir = "{data}"\ndatabase = "{database_url(data)}"\n'
        f'hostname = "{HOSTNAME}"\nworkers = 2\n'
        f'[listeners]\nsmtp = "{LOOPBACK_ANY_PORT}"\nsubmission = "none"\n'
        'lmtp = "none"\nmtqp = "none"\nhttp = "none"\n'
        '[domains]\nlocal = ["example.test"]\n'
        "[durability]\nfsync = false\n"
    )
    return path


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        return response.read().decode()


@pytest_twisted.ensureDeferred
async def test_the_masters_metrics_sum_every_process(tmp_path):
    path = config_file(tmp_path)
    node = MTAService(load_config(path), reactor, origin=ConfigOrigin(path, ()))
    node.startService()
    await node.ready
    root = Resource()
    root.putChild(b"metrics", metrics_resource(node.exposition))
    site = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    url = f"http://127.0.0.1:{site.getHost().port}/metrics"
    worker_file = node.config.data_dir / "workers" / "1" / METRICS_FILE
    accepted = ("mtrkmta_messages_accepted_total", {"listener": "smtp"})
    try:
        await until(lambda: node.supervisor is not None and node.supervisor.running, "worker 1")
        sent = 0
        # The kernel hands each connection to the master or the worker: send until the
        # worker has taken some (its file counts them) and the master some too.
        for _ in range(20):
            await in_thread(send, node.port("smtp"), 5)
            sent += 5
            await until(lambda: worker_file.exists(), "worker 1's metrics file", TIMEOUT)
            own = node.metrics.registry.get_sample_value(*accepted) or 0
            if 0 < own < sent:
                break
        own = node.metrics.registry.get_sample_value(*accepted)
        assert own is not None and 0 < own < sent

        async def summed() -> bool:
            return value(await in_thread(fetch, url), *accepted) == sent

        await until(summed, f"/metrics to count {sent} messages from both processes", TIMEOUT)
        text = await in_thread(fetch, url)
        assert value(text, "mtrkmta_processes_up", {}) == 2
    finally:
        await site.stopListening()
        await stop_node(node)
