"""mtrkmta.metrics and the /metrics resource: own registries, bounded labels, sums over
processes, the Prometheus text format as prometheus_client's own parser reads it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from test_mtqp_server import FakeStore, Session, make, stored, track_line
from test_smtp_auth import CLOSED, PASSWORD, USER, CountingChecker, TLSClient, auth_plain
from test_smtp_server import Client, make_factory
from test_smtp_server import RecordingReceiver as SMTPReceiver
from twisted.internet.defer import fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from mtrkmta.metrics import (
    PrometheusMetrics,
    merged_exposition,
    read_expositions,
    refusal_reason,
    write_exposition,
)
from mtrkmta.mtqp.server import MTQPServerFactory
from mtrkmta.smtp.server import ServerSettings, SMTPServerFactory
from mtrkmta.web.metrics import metrics_resource


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, as prometheus_client's parser reads it."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_two_nodes_in_one_process_share_no_series():
    a, b = PrometheusMetrics(), PrometheusMetrics()
    a.accepted("smtp")
    a.accepted("smtp")
    b.accepted("smtp")
    assert a.registry.get_sample_value("mtrkmta_messages_accepted_total", {"listener": "smtp"}) == 2
    assert b.registry.get_sample_value("mtrkmta_messages_accepted_total", {"listener": "smtp"}) == 1


def test_label_values_outside_their_fixed_set_count_as_other():
    metrics = PrometheusMetrics()
    metrics.accepted("<script>")
    metrics.refused("smtp", "anything the client said")
    metrics.mtqp_query("found")
    value = metrics.registry.get_sample_value
    assert value("mtrkmta_messages_accepted_total", {"listener": "other"}) == 1
    assert value("mtrkmta_messages_refused_total", {"listener": "smtp", "reason": "other"}) == 1
    assert value("mtrkmta_mtqp_queries_total", {"result": "found"}) == 1


def test_refusal_reasons_come_from_the_reply_codes():
    assert refusal_reason("CONNECT", 421, "4.7.0") == "connection_limit"
    assert refusal_reason("RCPT", 554, "5.7.1") == "relay_denied"
    assert refusal_reason("RCPT", 550, "5.1.1") == "unknown_user"
    assert refusal_reason("RCPT", 553, "5.1.3") == "bad_address"
    assert refusal_reason("MAIL", 552, "5.3.4") == "size"
    assert refusal_reason("RCPT", 452, "4.5.3") == "too_many_recipients"
    assert refusal_reason("MAIL", 452, "4.3.1") == "storage"
    assert refusal_reason("MAIL", 530, "5.7.0") == "auth"
    assert refusal_reason("END-OF-MESSAGE", 554, "5.4.6") == "content"
    assert refusal_reason("END-OF-MESSAGE", 500, "5.5.2") == "content"
    assert refusal_reason("RCPT", 503, "5.5.1") == "protocol"
    assert refusal_reason("END-OF-MESSAGE", 451, "4.3.0") == "temporary"


def test_smtp_refusals_are_counted_by_listener_and_reason():
    metrics = PrometheusMetrics()
    factory = SMTPServerFactory(
        ServerSettings(hostname="mx.example.test", listener="submission", max_recipients=1),
        SMTPReceiver(),
        MemoryReactorClock(),
        metrics=metrics,
    )
    c = Client(factory)
    c.send(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@x.example>\r\n")
    assert c.send(b"RCPT TO:<v@x.example>\r\n") == [b"452 4.5.3 Too many recipients"]
    c.close()
    value = metrics.registry.get_sample_value
    labels = {"listener": "submission", "reason": "too_many_recipients"}
    assert value("mtrkmta_messages_refused_total", labels) == 1


def test_connection_limit_refusals_are_counted():
    metrics = PrometheusMetrics()
    settings = ServerSettings(hostname="mx.example.test", max_connections_per_ip=1)
    factory = SMTPServerFactory(settings, SMTPReceiver(), MemoryReactorClock(), metrics=metrics)
    first, second = Client(factory), Client(factory)
    assert second.lines()[0].startswith(b"421 4.7.0")
    first.close()
    second.close()
    labels = {"listener": "smtp", "reason": "connection_limit"}
    assert metrics.registry.get_sample_value("mtrkmta_messages_refused_total", labels) == 1
    # The default counts nothing and needs no registry.
    assert make_factory(SMTPReceiver(), MemoryReactorClock()).metrics.accepted("smtp") is None


def test_mtqp_track_answers_are_counted_by_result():
    clock = MemoryReactorClock()
    clock.advance(1_700_000_060)
    metrics = PrometheusMetrics()
    factory = make(clock, FakeStore(stored()), track_rate=2, failure_rate=0)
    counted = MTQPServerFactory(factory.settings, factory.tracking, clock, metrics)
    session = Session(counted)
    session.output()
    assert session.send(track_line()).startswith(b"+OK+ ")
    assert session.send(track_line("nobody@nowhere.example")).startswith(b"-ERR/noinfo")
    assert session.send(track_line()).startswith(b"-TEMP/rate-limit")
    value = metrics.registry.get_sample_value
    for result in ("found", "not_found", "rate_limited"):
        assert value("mtrkmta_mtqp_queries_total", {"result": result}) == 1, result


def test_worker_expositions_are_summed_into_the_masters(tmp_path):
    master, worker = PrometheusMetrics(), PrometheusMetrics()
    master.accepted("smtp")
    worker.accepted("smtp")
    worker.accepted("submission")
    master.attempt_delay("smtp", 0.3)
    worker.attempt_delay("smtp", 2.0)
    master.watch_workers(lambda: 2)
    worker.watch_queue(lambda: {"waiting": 3, "active": 1})
    path = tmp_path / "metrics.prom"
    write_exposition(path, worker.exposition())
    assert not path.with_name("metrics.prom.tmp").exists()
    others = read_expositions([path, tmp_path / "absent" / "metrics.prom"])
    found = samples(merged_exposition(master.registry, others).decode())
    assert found[("mtrkmta_messages_accepted_total", (("listener", "smtp"),))] == 2
    assert found[("mtrkmta_messages_accepted_total", (("listener", "submission"),))] == 1
    bucket = (("le", "2.5"), ("transport", "smtp"))
    assert found[("mtrkmta_delivery_attempt_seconds_bucket", bucket)] == 2
    assert found[("mtrkmta_delivery_attempt_seconds_bucket", (("le", "1.0"), bucket[1]))] == 1
    assert found[("mtrkmta_delivery_attempt_seconds_sum", (bucket[1],))] == 2.3
    assert found[("mtrkmta_queue_messages", (("state", "waiting"),))] == 3
    assert found[("mtrkmta_processes_up", ())] == 2
    assert not any(name.endswith("_created") for name, _ in found)


def render(resource, request: DummyRequest) -> None:
    assert resource.render(request) == NOT_DONE_YET
    assert request.finished  # the exposition was ready: the answer went out at once


def test_the_resource_serves_the_text_format():
    metrics = PrometheusMetrics()
    metrics.dsn_sent("failed")
    metrics.tls_session("out")
    request = DummyRequest([b""])
    render(metrics_resource(lambda: succeed(metrics.exposition())), request)
    assert request.finished
    assert request.responseHeaders.getRawHeaders(b"content-type") == [CONTENT_TYPE_LATEST.encode()]
    found = samples(b"".join(request.written).decode())
    assert found[("mtrkmta_dsns_sent_total", (("kind", "failed"),))] == 1
    assert found[("mtrkmta_tls_sessions_total", (("direction", "out"),))] == 1
    assert found[("mtrkmta_queue_messages", (("state", "active"),))] == 0


def test_the_resource_answers_500_when_the_metrics_cannot_be_read():
    request = DummyRequest([b""])
    render(metrics_resource(lambda: fail(OSError("disk gone"))), request)
    assert request.responseCode == 500
    assert b"".join(request.written) == b"metrics unavailable; see the node's log\n"


DASHBOARD = Path(__file__).resolve().parents[2] / "doc" / "examples" / "grafana-dashboard.json"


def every_metric_once() -> PrometheusMetrics:
    metrics = PrometheusMetrics()
    metrics.accepted("smtp")
    metrics.refused("smtp", "relay_denied")
    metrics.delivery("delivered", "maildir")
    metrics.attempt_delay("maildir", 0.01)
    metrics.end_to_end_delay("delivered", 0.5)
    metrics.dsn_sent("failed")
    metrics.mtqp_query("found")
    metrics.http_track_query("not_found")
    metrics.tls_session("in")
    metrics.webhook_delivery("delivered")
    metrics.watch_workers(lambda: 1)
    return metrics


def test_the_grafana_dashboard_asks_only_for_metrics_the_registry_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    text = every_metric_once().exposition().decode()
    exported = {name for name, _ in samples(text)}
    families = {
        f.name for f in text_string_to_metric_families(text) if not f.name.endswith("_created")
    }
    asked: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${" + variable["name"] + "}", panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bmtrkmta_[a-z_]+", target["expr"]))
            assert names, target["expr"]
            assert names <= exported, (panel["title"], names - exported)
            asked |= names
    # And every metric has its panel.
    assert {f for f in families if not any(name.startswith(f) for name in asked)} == set()


def test_starttls_and_an_auth_shut_out_are_counted():
    # RFC 3207 (STARTTLS), RFC 4954 §4 (AUTH): after 3 failures the connection ends with 421.
    clock = MemoryReactorClock()
    metrics = PrometheusMetrics()
    settings = ServerSettings(
        hostname="mx.example.test",
        listener="submission",
        tls=object(),
        checker=CountingChecker(**{USER: PASSWORD.encode()}),
    )
    client = TLSClient(SMTPServerFactory(settings, SMTPReceiver(), clock, metrics=metrics))
    client.transport.clear()
    client.proto.dataReceived(auth_plain("wrong") * 3)
    clock.pump([1] * 30)
    assert client.lines()[-1] == CLOSED
    client.close()
    value = metrics.registry.get_sample_value
    assert value("mtrkmta_tls_sessions_total", {"direction": "in"}) == 1
    assert (
        value("mtrkmta_messages_refused_total", {"listener": "submission", "reason": "auth"}) == 1
    )
