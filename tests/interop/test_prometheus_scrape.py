"""A real Prometheus server (Debian's ``prometheus``) scrapes a node's /metrics, and answers
PromQL over what it scraped, the Grafana dashboard's expressions included."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest_twisted
from interop_lab import (
    START_TIMEOUT,
    Daemon,
    Lab,
    eventually,
    in_thread,
    program,
    running_mtrkmta,
    send_mail,
)
from twisted.internet import reactor
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import Site

from mtrkmta.web.metrics import metrics_resource

DASHBOARD = Path(__file__).resolve().parents[2] / "doc" / "examples" / "grafana-dashboard.json"
CONTENT = b"From: sender@localhost\r\nSubject: scraped\r\n\r\nCounted.\r\n"


class Prometheus(Daemon):
    """``prometheus`` scraping one target every second, its storage in the lab."""

    name = "prometheus"

    def __init__(self, lab: Lab, target: str) -> None:
        super().__init__(lab)
        self.target = target
        self.dir = lab.path("prometheus")

    def _start_once(self) -> None:
        self.dir.mkdir(exist_ok=True)
        config = self.dir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: mtrkmta\n"
            f"    static_configs: [{{targets: ['{self.target}']}}]\n"
        )
        self._spawn(
            [
                program("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            [],
        )

    def start(self) -> None:
        """Start, then wait until its storage is open: the web port answers before that,
        and the query API says 503 until /-/ready does not."""
        super().start()
        deadline = time.monotonic() + START_TIMEOUT
        url = f"http://127.0.0.1:{self.port}/-/ready"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as error:  # 503: "Service Unavailable" while starting
                if error.code != 503 or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def api(self, path: str, **query: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        return answer["data"]


def accepted_over_smtp(prometheus: Prometheus) -> float | None:
    data = prometheus.api("query", query='mtrkmta_messages_accepted_total{listener="smtp"}')
    values = [float(r["value"][1]) for r in data["result"]]
    return values[0] if values else None


@pytest_twisted.ensureDeferred
async def test_prometheus_scrapes_the_counts_of_a_message(lab: Lab):
    async with running_mtrkmta(lab, "from-postfix.toml") as node:
        root = Resource()
        root.putChild(b"metrics", metrics_resource(node.exposition))
        connections = WrappingFactory(Site(root))  # .protocols: the scrapers' connections
        site = reactor.listenTCP(0, connections, interface="127.0.0.1")
        try:
            prometheus = Prometheus(lab, f"127.0.0.1:{site.getHost().port}")
            await in_thread(prometheus.start)
            recipients = [("bob@example.test", "")]
            await in_thread(send_mail, node.port("smtp"), "sender@localhost", recipients, CONTENT)

            async def scraped() -> bool:
                return await in_thread(accepted_over_smtp, prometheus) == 1.0

            await eventually(scraped, "Prometheus to scrape one accepted message")
            (target,) = (await in_thread(prometheus.api, "targets"))["activeTargets"]
            assert target["health"] == "up", target
            delivered = 'mtrkmta_deliveries_total{outcome="delivered",transport="maildir"}'

            async def delivery_scraped() -> bool:
                data = await in_thread(prometheus.api, "query", query=delivered)
                return [r["value"][1] for r in data["result"]] == ["1"]

            await eventually(delivery_scraped, "Prometheus to scrape the delivery")
            # Every expression of the Grafana dashboard is PromQL that Prometheus evaluates.
            dashboard = json.loads(DASHBOARD.read_text())
            for panel in dashboard["panels"]:
                for target in panel["targets"]:
                    expr = target["expr"].replace("$__rate_interval", "1m")
                    expr = re.sub(r"\$instance", ".*", expr)
                    await in_thread(prometheus.api, "query", query=expr)
            await in_thread(prometheus.stop)
            await eventually(lambda: not connections.protocols, "Prometheus's connection to end")
        finally:
            await site.stopListening()
