"""Worker processes' metrics: each `mtrkmta serve` worker writes its counts into its directory,
where the master's /metrics sums them in (mtrkmta.metrics, doc/running.rst "Metrics")."""

from __future__ import annotations

import os
import signal

from prometheus_client.parser import text_string_to_metric_families
from test_workers import ACCEPTING, LISTENING, STARTED, send, server, wait_for

from mtrkmta.metrics import METRICS_FILE, PrometheusMetrics, merged_exposition, read_expositions
from mtrkmta.workers import metrics_files

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
