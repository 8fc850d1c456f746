"""Operational metrics: the IMetrics seam the node's code calls, and its Prometheus registry."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from zope.interface import Interface, implementer

PREFIX = "mtrkmta"

# Every label value is one of these fixed sets; anything else is counted as "other", so that
# nothing a client sends can grow the number of series.
LISTENERS = frozenset(
    {"smtp", "submission", "lmtp", "pickup", "sendmail", "dsn", "expansion", "admin"}
)
REFUSAL_REASONS = (
    "connection_limit",  # too many connections (in all, or from one address)
    "relay_denied",  # RFC 5321 §3.6.2: not a local domain, not a trusted client
    "unknown_user",  # a local recipient that does not exist (5.1.1)
    "bad_address",  # a recipient address or domain that cannot be used (5.1.x)
    "size",  # the message is larger than the limit (5.3.4, 5.2.3)
    "too_many_recipients",  # RFC 5321 §4.5.3.1.8
    "storage",  # the spool's free space is below its floor (4.3.1)
    "auth",  # authentication required, or too many failures
    "content",  # bare CR/LF, a line too long, a mail loop
    "protocol",  # commands out of order, syntax errors
    "temporary",  # the message could not be queued (4.3.0) or another 4xx
    "other",
)
DELIVERY_OUTCOMES = frozenset(
    {"delivered", "transferred", "relayed", "expanded", "failed", "deferred"}
)
TRANSPORTS = frozenset({"smtp", "lmtp", "maildir", "routing"})
DSN_KINDS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
QUERY_RESULTS = frozenset(
    {"found", "not_found", "rate_limited", "bad_request", "tls_required", "unavailable"}
)
TLS_DIRECTIONS = frozenset({"in", "out"})
WEBHOOK_RESULTS = frozenset({"delivered", "retried", "dropped"})
QUEUE_STATES = ("active", "waiting")

# Delays from a fraction of a second (a local delivery) to the queue's five days.
ATTEMPT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)
DELAY_BUCKETS = (
    *(0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0),
    *(4 * 3600.0, 86400.0, 2 * 86400.0, 5 * 86400.0),
)

METRICS_FILE = "metrics.prom"
"""The file in a worker's directory that holds its latest exposition."""
METRICS_INTERVAL = 5.0
"""Seconds between two writes of a worker's metrics file."""


def bounded(value: str, allowed: Iterable[str]) -> str:
    """``value`` when it is one of ``allowed``, else ``"other"``."""
    return value if value in allowed else "other"


def refusal_reason(verb: str, code: int, status: str | None) -> str:
    """The reason label of a refusal: the command refused, its reply code and its RFC 3463
    enhanced status code (pure; never the reply's free text)."""
    if verb == "CONNECT":
        return "connection_limit" if code == 421 else "other"
    status = status or ""
    if status == "5.7.1":
        return "relay_denied"
    if status == "5.1.1":
        return "unknown_user"
    if status.startswith(("5.1.", "4.1.")):
        return "bad_address"
    if status in ("5.3.4", "5.2.3", "4.3.4"):
        return "size"
    if status == "4.5.3":
        return "too_many_recipients"
    if status == "4.3.1":
        return "storage"
    if status.startswith(("5.7.", "4.7.")) or code in (530, 535):
        return "auth"
    if status.startswith(("5.6.", "5.4.6")) or (status == "5.5.2" and verb == "END-OF-MESSAGE"):
        return "content"
    if status.startswith("5.5."):
        return "protocol"
    if 400 <= code < 500:
        return "temporary"
    return "other"


class IMetrics(Interface):
    """Told each countable event of one node (label values from the fixed sets above)."""

    def accepted(listener: str) -> None:
        """A message was durably accepted through ``listener``."""

    def refused(listener: str, reason: str) -> None:
        """A connection or command on ``listener`` was refused (see REFUSAL_REASONS)."""

    def delivery(outcome: str, transport: str) -> None:
        """One recipient's attempt ended in ``outcome`` (a recipient state) via ``transport``."""

    def attempt_delay(transport: str, seconds: float) -> None:
        """One attempt to one next hop took ``seconds`` (connection and transmission)."""

    def end_to_end_delay(outcome: str, seconds: float) -> None:
        """A recipient reached a final ``outcome`` ``seconds`` after its message arrived."""

    def dsn_sent(kind: str) -> None:
        """A DSN with Action ``kind`` was queued."""

    def mtqp_query(result: str) -> None:
        """An MTQP TRACK command was answered with ``result`` (see QUERY_RESULTS)."""

    def http_track_query(result: str) -> None:
        """A tracking query over HTTP was answered with ``result`` (see QUERY_RESULTS)."""

    def webhook_delivery(result: str) -> None:
        """One attempt to POST a webhook event ended with ``result`` (WEBHOOK_RESULTS):
        delivered, to be retried, or dropped past its hook's max_age."""

    def tls_session(direction: str) -> None:
        """A TLS session was set up: ``in`` (our STARTTLS server) or ``out`` (our client)."""

    def watch_queue(counts: Callable[[], Mapping[str, int]]) -> None:
        """Read the queue's message counts by state (in memory) at each scrape."""

    def watch_workers(running: Callable[[], int]) -> None:
        """Read the number of processes running (master and workers) at each scrape."""


@implementer(IMetrics)
class NoMetrics:
    """Counts nothing: the default of every collaborator that takes an IMetrics."""

    def accepted(self, listener: str) -> None:
        return None

    def refused(self, listener: str, reason: str) -> None:
        return None

    def delivery(self, outcome: str, transport: str) -> None:
        return None

    def attempt_delay(self, transport: str, seconds: float) -> None:
        return None

    def end_to_end_delay(self, outcome: str, seconds: float) -> None:
        return None

    def dsn_sent(self, kind: str) -> None:
        return None

    def mtqp_query(self, result: str) -> None:
        return None

    def http_track_query(self, result: str) -> None:
        return None

    def webhook_delivery(self, result: str) -> None:
        return None

    def tls_session(self, direction: str) -> None:
        return None

    def watch_queue(self, counts: Callable[[], Mapping[str, int]]) -> None:
        return None

    def watch_workers(self, running: Callable[[], int]) -> None:
        return None


class _Readings(Collector):
    """Gauges read at scrape time from what the node already keeps in memory."""

    def __init__(self) -> None:
        self.queue: Callable[[], Mapping[str, int]] | None = None
        self.workers: Callable[[], int] | None = None

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily(
            f"{PREFIX}_queue_messages",
            "Messages in this node's queue by state (active: in a queue run; waiting: "
            "scheduled for a run, now or later).",
            labels=["state"],
        )
        counts = self.queue() if self.queue is not None else {}
        for state in QUEUE_STATES:
            queue.add_metric([state], counts.get(state, 0))
        yield queue
        if self.workers is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_processes_up",
                "Processes of the node running: the master and its worker processes.",
                value=self.workers(),
            )


@implementer(IMetrics)
class PrometheusMetrics:
    """IMetrics on a registry of its own (``self.registry``): two nodes in one process
    never share a series."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._accepted = Counter(
            f"{PREFIX}_messages_accepted",
            "Messages durably accepted, by listener.",
            ["listener"],
            registry=r,
        )
        self._refused = Counter(
            f"{PREFIX}_messages_refused",
            "Connections and commands refused, by listener and reason.",
            ["listener", "reason"],
            registry=r,
        )
        self._deliveries = Counter(
            f"{PREFIX}_deliveries",
            "Recipients' delivery attempts, by outcome and transport.",
            ["outcome", "transport"],
            registry=r,
        )
        self._attempt = Histogram(
            f"{PREFIX}_delivery_attempt_seconds",
            "Duration of one attempt to one next hop, by transport.",
            ["transport"],
            buckets=ATTEMPT_BUCKETS,
            registry=r,
        )
        self._delay = Histogram(
            f"{PREFIX}_delivery_delay_seconds",
            "Time from a message's arrival to a recipient's final outcome, by outcome.",
            ["outcome"],
            buckets=DELAY_BUCKETS,
            registry=r,
        )
        self._dsns = Counter(
            f"{PREFIX}_dsns_sent",
            "Delivery status notifications queued, by kind.",
            ["kind"],
            registry=r,
        )
        self._mtqp = Counter(
            f"{PREFIX}_mtqp_queries", "MTQP TRACK commands, by result.", ["result"], registry=r
        )
        self._http = Counter(
            f"{PREFIX}_http_track_queries",
            "Tracking queries over HTTP, by result.",
            ["result"],
            registry=r,
        )
        self._webhooks = Counter(
            f"{PREFIX}_webhook_deliveries",
            "Webhook POSTs, by result (delivered, retried, dropped past max_age).",
            ["result"],
            registry=r,
        )
        self._tls = Counter(
            f"{PREFIX}_tls_sessions",
            "TLS sessions set up, by direction (in: STARTTLS offered by us; out: our client).",
            ["direction"],
            registry=r,
        )
        self._readings = _Readings()
        r.register(self._readings)

    def accepted(self, listener: str) -> None:
        self._accepted.labels(bounded(listener, LISTENERS)).inc()

    def refused(self, listener: str, reason: str) -> None:
        self._refused.labels(bounded(listener, LISTENERS), bounded(reason, REFUSAL_REASONS)).inc()

    def delivery(self, outcome: str, transport: str) -> None:
        self._deliveries.labels(
            bounded(outcome, DELIVERY_OUTCOMES), bounded(transport, TRANSPORTS)
        ).inc()

    def attempt_delay(self, transport: str, seconds: float) -> None:
        self._attempt.labels(bounded(transport, TRANSPORTS)).observe(max(0.0, seconds))

    def end_to_end_delay(self, outcome: str, seconds: float) -> None:
        self._delay.labels(bounded(outcome, DELIVERY_OUTCOMES)).observe(max(0.0, seconds))

    def dsn_sent(self, kind: str) -> None:
        self._dsns.labels(bounded(kind, DSN_KINDS)).inc()

    def mtqp_query(self, result: str) -> None:
        self._mtqp.labels(bounded(result, QUERY_RESULTS)).inc()

    def http_track_query(self, result: str) -> None:
        self._http.labels(bounded(result, QUERY_RESULTS)).inc()

    def webhook_delivery(self, result: str) -> None:
        self._webhooks.labels(bounded(result, WEBHOOK_RESULTS)).inc()

    def tls_session(self, direction: str) -> None:
        self._tls.labels(bounded(direction, TLS_DIRECTIONS)).inc()

    def watch_queue(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._readings.queue = counts

    def watch_workers(self, running: Callable[[], int]) -> None:
        self._readings.workers = running

    def exposition(self) -> bytes:
        """This process's metrics in the Prometheus text format."""
        return generate_latest(self.registry)


# -- worker processes: each writes its exposition to a file, the master sums them ----------


def write_exposition(path: Path, text: bytes) -> None:
    """Replace ``path`` with ``text`` atomically (a reader sees the old or the new file whole;
    blocking)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(text)
    os.replace(temporary, path)


def remove_files(paths: Iterable[Path]) -> None:
    """Remove each file that exists (blocking)."""
    for path in paths:
        path.unlink(missing_ok=True)


def read_expositions(paths: Iterable[Path]) -> list[str]:
    """The text of each file that exists (blocking)."""
    texts = []
    for path in paths:
        try:
            texts.append(path.read_text("utf-8"))
        except FileNotFoundError:
            continue
    return texts


class _Merged:
    """Metric families as ``generate_latest`` reads them from a registry."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merged_exposition(registry: CollectorRegistry, others: Iterable[str]) -> bytes:
    """``registry``'s metrics with the samples of ``others`` (expositions of other processes
    of the node) added in: each series is the sum over the processes. The ``_created``
    samples, which do not add up, are left out."""
    families: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}

    def add(family: Metric) -> None:
        if family.name.endswith("_created"):  # the text parser's view of _created samples
            return
        if family.name not in families:
            families[family.name] = Metric(family.name, family.documentation, family.type)
            sums[family.name] = {}
        totals = sums[family.name]
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = (sample.name, tuple(sorted(sample.labels.items())))
            totals[key] = totals.get(key, 0.0) + sample.value

    for family in registry.collect():
        add(family)
    for text in others:
        for family in text_string_to_metric_families(text):
            add(family)
    for name, family in families.items():
        for (sample_name, labels), value in sums[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return generate_latest(_Merged(list(families.values())))
