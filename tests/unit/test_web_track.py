"""The tracking page and JSON API (mtrkmta.web.track) through a twisted.web Site on a
StringTransport, with a controlled clock and a tracker that answers canned traces."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import client
from twisted.web.server import Site

from mtrkmta.config import Override, load_config
from mtrkmta.metrics import PrometheusMetrics
from mtrkmta.mtqp.client import Hop, Target, Trace, recipient_paths
from mtrkmta.mtqp.protocol import Response
from mtrkmta.mtqp.timeline import trace_json
from mtrkmta.tracking.status import RecipientStatus, TrackingReport, TypedValue
from mtrkmta.web.site import Root
from mtrkmta.web.track import (
    ERRORS,
    QueryError,
    TrackLimits,
    client_factory,
    form_fields,
    json_fields,
    openapi_document,
    parse_query,
    result_line,
    split_server,
    trace_html,
    track_resources,
)

DOCS = Path(__file__).resolve().parents[2] / "doc" / "tracking.rst"
SECRET = "AAECAwQFBgcICQoLDA0ODw=="
ENVID = "id1@mx-a.example.test"
URI = f"mtqp://mx-a.example.test:2038/track/{ENVID}/{quote(SECRET, safe='')}"
A_NAME, B_NAME = "mx-a.example.test", "mx-b.example.test"
RCPT = "bob@chain.example"
PEER = IPv4Address("TCP", "192.0.2.7", 40000)
HOSTILE = '<script>alert("x")</script>&'


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def two_hop_trace(diagnostic: str = "250 2.0.0 ok", reporting_b: str = B_NAME) -> Trace:
    """A transferred bob@chain.example to B, which delivered it."""
    bob = TypedValue("rfc822", RCPT)
    first = TrackingReport(
        ENVID,
        TypedValue("dns", A_NAME),
        at("2026-12-04T16:00:00+00:00"),
        (
            RecipientStatus(
                bob,
                bob,
                "transferred",
                "2.0.0",
                remote_mta=TypedValue("dns", B_NAME),
                last_attempt_date=at("2026-12-04T16:00:02+00:00"),
            ),
        ),
    )
    second = TrackingReport(
        ENVID,
        TypedValue("dns", reporting_b),
        at("2026-12-04T16:00:02+00:00"),
        (
            RecipientStatus(
                bob,
                bob,
                "delivered",
                "2.0.0",
                last_attempt_date=at("2026-12-04T16:00:03+00:00"),
                extensions=(("Diagnostic-Code", f"smtp; {diagnostic}"),),
            ),
        ),
    )
    answered = Response.multiline(b"(the entity)", text="Tracking information follows")
    hops = (
        Hop(
            host=A_NAME,
            port=2038,
            server=Target("127.0.0.1", 2038, A_NAME),
            response=answered,
            reports=(first,),
        ),
        Hop(
            host=B_NAME,
            referred_by=A_NAME,
            server=Target("127.0.0.1", 2039, B_NAME),
            tls=True,
            response=answered,
            reports=(second,),
        ),
    )
    return Trace(envid=ENVID, hops=hops, recipients=recipient_paths(hops))


def refused_trace(text: str = "No tracking information") -> Trace:
    response = Response("-ERR", ("noinfo",), text)
    hop = Hop(host=A_NAME, server=Target("127.0.0.1", 2038, A_NAME), response=response)
    return Trace(envid=ENVID, hops=(hop,))


def unreachable_trace(error: str) -> Trace:
    return Trace(envid=ENVID, hops=(Hop(host=A_NAME, error=error),))


def events() -> list[dict[str, Any]]:
    """Events in the shape the trace JSON's top-level ``events`` list has."""
    common = {
        "recipient": RCPT,
        "status": None,
        "meaning": None,
        "diagnostic": None,
        "relay": None,
        "next_attempt": None,
        "by_administrator": False,
    }
    return [
        {
            **common,
            "time": "2026-12-04T16:00:00+00:00",
            "elapsed": 0,
            "hop": 1,
            "reporting_mta": A_NAME,
            "recipient": None,
            "kind": "arrived",
            "text": "Accepted from client.example.test",
        },
        {
            **common,
            "time": "2026-12-04T16:00:01+00:00",
            "elapsed": 1,
            "hop": 1,
            "reporting_mta": A_NAME,
            "kind": "deferred",
            "status": "4.4.1",
            "meaning": "no answer from host",
            "diagnostic": "connection refused",
            "next_attempt": "2026-12-04T16:00:02+00:00",
            "text": "Attempt 1 failed",
        },
        {
            **common,
            "time": "2026-12-04T16:00:02+00:00",
            "elapsed": 2,
            "hop": 1,
            "reporting_mta": A_NAME,
            "kind": "transferred",
            "status": "2.0.0",
            "meaning": "other or undefined status",
            "relay": B_NAME,
            "text": f"Handed to {B_NAME}",
        },
        {
            **common,
            "time": "2026-12-04T16:00:03+00:00",
            "elapsed": 3,
            "hop": 2,
            "reporting_mta": B_NAME,
            "kind": "delivered",
            "status": "2.0.0",
            "meaning": "other or undefined status",
            "text": "Delivered",
        },
    ]


@dataclass
class CannedTracker:
    """Stands for the network: answers each follow() with the next result, recording
    what it was asked (host, envid, secret, port)."""

    results: list[Trace | Deferred[Trace]]
    asked: list[tuple[str, str, str, int | None]] = field(default_factory=list)

    def follow(
        self, host: str, envid: str, secret: str, *, port: int | None = None
    ) -> Deferred[Trace]:
        self.asked.append((host, envid, secret, port))
        result = self.results.pop(0)
        return result if isinstance(result, Deferred) else succeed(result)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)


class Web:
    """A Site with the track resources, spoken to over StringTransports (HTTP/1.0)."""

    def __init__(
        self,
        tracker: CannedTracker,
        limits: TrackLimits | None = None,
        factory: Callable[[], Any] | None = None,
    ) -> None:
        self.clock = MemoryReactorClock()
        self.tracker = tracker
        limits = limits or TrackLimits()
        factory = factory or (lambda: tracker)
        self.metrics = PrometheusMetrics()
        root = Root(track_resources(factory, limits, self.clock, self.metrics))
        self.site = Site(root, timeout=None)
        self.transports: list[StringTransport] = []

    def send(self, method: str, path: str, body: bytes = b"", content_type: str = "") -> int:
        """Send one request; the index of its connection for :meth:`reply`."""
        transport = StringTransport(peerAddress=PEER)
        channel = self.site.buildProtocol(PEER)
        assert channel is not None
        channel.makeConnection(transport)
        head = f"{method} {path} HTTP/1.0\r\nHost: localhost\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        if body or method == "POST":
            head += f"Content-Length: {len(body)}\r\n"
        channel.dataReceived(head.encode("ascii") + b"\r\n" + body)
        self.transports.append(transport)
        return len(self.transports) - 1

    def reply(self, index: int) -> Reply:
        raw = self.transports[index].value()
        head, separator, body = raw.partition(b"\r\n\r\n")
        assert separator, raw
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return Reply(status, headers, body)

    def request(self, method: str, path: str, body: bytes = b"", content_type: str = "") -> Reply:
        return self.reply(self.send(method, path, body, content_type))

    def api(self, query: dict[str, Any]) -> Reply:
        body = json.dumps(query).encode()
        return self.request("POST", "/api/v1/track", body, "application/json")

    def form(self, fields: dict[str, str]) -> Reply:
        body = urlencode(fields).encode()
        return self.request("POST", "/track", body, "application/x-www-form-urlencoded")


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every log event's text while the test runs."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) + repr(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


# -- the query --------------------------------------------------------------------------------


def test_a_uri_gives_host_port_decoded_envid_and_secret():
    query = parse_query({"uri": URI})
    assert (query.host, query.port, query.envid, query.secret) == (A_NAME, 2038, ENVID, SECRET)
    assert SECRET not in repr(query)


def test_a_uri_at_port_1038_lets_srv_decide_as_the_cli_does():
    query = parse_query({"uri": f"mtqp://{A_NAME}:1038/track/{ENVID}/{SECRET}"})
    assert query.port is None


def test_envid_secret_and_server_give_the_same_query():
    query = parse_query({"envid": "id1+40x", "secret": SECRET, "server": "[2001:db8::1]:2038"})
    assert (query.host, query.port, query.envid) == ("2001:db8::1", 2038, "id1@x")
    assert parse_query({"envid": ENVID, "secret": SECRET, "server": A_NAME}).port is None


@pytest.mark.parametrize(
    ("fields", "wanted"),
    [
        ({}, "envid is missing"),
        ({"uri": "http://example.org/"}, "not an mtqp URI"),
        ({"uri": URI, "secret": SECRET}, "either uri"),
        ({"envid": ENVID, "secret": SECRET}, "server is missing"),
        ({"envid": ENVID, "secret": "not base64!", "server": A_NAME}, "base64"),
        ({"envid": ENVID, "secret": SECRET, "server": f"{A_NAME}:99999"}, "port"),
        ({"envid": ENVID, "secret": SECRET, "server": "bad host!"}, "host"),
        ({"uri": 42}, "uri must be a string"),
    ],
)
def test_malformed_queries_are_invalid_and_never_quote_the_secret(fields, wanted):
    with pytest.raises(QueryError) as caught:
        parse_query(fields)
    assert caught.value.code == "invalid_query"
    assert caught.value.status == 422
    assert wanted in caught.value.message
    assert SECRET not in caught.value.message


def test_split_server():
    assert split_server("mx.example.org") == ("mx.example.org", None)
    assert split_server("mx.example.org:2038") == ("mx.example.org", 2038)
    assert split_server("2001:db8::1") == ("2001:db8::1", None)
    assert split_server("[2001:db8::1]") == ("2001:db8::1", None)


def test_form_and_json_bodies():
    assert form_fields(b"uri=mtqp%3A%2F%2Fa%2Ftrack%2Fx%2Fy&envid=") == {
        "uri": "mtqp://a/track/x/y",
        "envid": "",
    }
    assert form_fields(b"") == {}
    with pytest.raises(QueryError) as caught:
        form_fields(b"\xff")
    assert caught.value.code == "bad_request"
    assert json_fields(b'{"uri": "x"}') == {"uri": "x"}
    for body in (b"[1]", b"{", b'{"uri": "x", "token": 1}'):
        with pytest.raises(QueryError) as caught:
            json_fields(body)
        assert caught.value.code == "bad_request"


# -- the page ---------------------------------------------------------------------------------


def test_the_form_is_semantic_html_with_a_label_for_every_field_and_no_script():
    web = Web(CannedTracker([]))
    reply = web.request("GET", "/track")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    assert reply.headers["content-security-policy"].startswith("default-src 'self'")
    page = reply.text
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert '<html lang="en">' in page and "<main>" in page and "<h1>" in page
    assert '<form method="post" action="/track"' in page
    for name in ("uri", "envid", "secret", "server"):
        assert f'<label for="{name}">' in page
        assert f'id="{name}" name="{name}"' in page
    assert '<button type="submit">' in page
    assert "<script" not in page and "style=" not in page and "<style" not in page
    assert 'href="/track/track.css"' in page


def test_the_stylesheet_is_served_from_the_package():
    reply = Web(CannedTracker([])).request("GET", "/track/track.css")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/css; charset=utf-8"
    assert b".timeline" in reply.body


def test_a_posted_uri_shows_both_hops_and_the_outcome():
    tracker = CannedTracker([two_hop_trace()])
    web = Web(tracker)
    reply = web.form({"uri": URI})
    assert reply.status == 200
    assert tracker.asked == [(A_NAME, ENVID, SECRET, 2038)]
    page = reply.text
    assert '<p class="result" role="status">Delivered: 1 recipient, 1 delivered.</p>' in page
    row = '<th scope="row"><span class="label">Hop </span>{}</th><td data-label="Server">{}</td>'
    assert row.format(1, "mx-a.example.test (127.0.0.1 port 2038)") in page
    assert row.format(2, "mx-b.example.test (127.0.0.1 port 2039)") in page
    assert "<h3>bob@chain.example</h3>" in page
    assert (
        '<li>Hop 2, mx-b.example.test: <strong class="action">delivered</strong> '
        "<code>2.0.0</code> (other or undefined status)"
        '<br><span class="diagnostic">smtp; 250 2.0.0 ok</span></li>'
    ) in page
    assert 'class="outcome">delivered</strong>' in page


def test_the_events_are_an_ordered_list_with_machine_readable_times():
    data = {**trace_json(two_hop_trace()), "events": events()}
    part = trace_html(data)
    timeline = part[part.index('<ol class="timeline">') : part.index("</ol>")]
    assert timeline.count("<li>") == 4
    assert '<time datetime="2026-12-04T16:00:01+00:00">2026-12-04 16:00:01 UTC</time>' in timeline
    assert "Attempt 1 failed" in timeline
    assert "<code>4.4.1</code> (no answer from host)" in timeline
    assert "next attempt <time datetime=" in timeline
    assert f"next hop {B_NAME}" in timeline
    assert timeline.index("Accepted") < timeline.index("Attempt 1") < timeline.index("Handed")


def test_an_administrator_action_is_shown_as_such():
    deleted = {**events()[0], "kind": "deleted", "by_administrator": True, "text": "Deleted"}
    part = trace_html({**trace_json(two_hop_trace()), "events": [deleted]})
    assert '<span class="admin">by the administrator</span>' in part


def test_every_value_from_a_server_is_escaped():
    trace = two_hop_trace(diagnostic=HOSTILE, reporting_b=f"b{HOSTILE}")
    hostile_event = {**events()[3], "text": HOSTILE, "time": f'"><script>{HOSTILE}'}
    data = {**trace_json(trace), "events": [hostile_event]}
    data["recipients"][0]["diagnostic"] = HOSTILE
    part = trace_html(data)
    assert "<script" not in part
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in part
    assert '<time datetime="&quot;&gt;&lt;script&gt;' in part
    reply = Web(CannedTracker([trace])).form({"uri": URI})
    assert "<script" not in reply.text and "&lt;script&gt;" in reply.text


def test_result_line_says_failed_in_progress_and_done():
    def paths(*outcomes: str, complete: bool = False) -> dict[str, Any]:
        return {"complete": complete, "recipients": [{"outcome": o} for o in outcomes]}

    assert result_line(paths("delivered", "failed", complete=True)) == (
        "Failed: 2 recipients, 1 delivered, 1 failed."
    )
    assert result_line(paths("delayed")) == "In progress: 1 recipient, 1 delayed."
    assert result_line(paths("relayed", complete=True)) == "Done: 1 recipient, 1 relayed."
    assert result_line(paths()) == "No recipient is known."


def test_an_error_is_a_page_with_its_status_and_an_empty_form():
    web = Web(CannedTracker([refused_trace()]))
    reply = web.form({"uri": URI})
    assert reply.status == 404
    assert '<p class="error" role="alert">' in reply.text
    assert "<code>(not_found)</code>" in reply.text
    assert "<textarea" in reply.text and "</textarea>" in reply.text
    bad = web.form({"uri": "mtqp://x"})
    assert bad.status == 422 and "(invalid_query)" in bad.text
    wrong = web.request("POST", "/track", b"{}", "application/json")
    assert wrong.status == 415


def test_the_secret_is_never_in_a_page_an_api_answer_or_a_log_line(logged):
    echoed = f"your secret was {SECRET}"
    web = Web(
        CannedTracker(
            [
                two_hop_trace(diagnostic=echoed),
                refused_trace(echoed),
                unreachable_trace(echoed),
                two_hop_trace(diagnostic=echoed),
            ]
        )
    )
    replies = [
        web.form({"uri": URI}),
        web.form({"envid": ENVID, "secret": SECRET, "server": f"{A_NAME}:2038"}),
        web.api({"uri": URI}),
        web.api({"envid": ENVID, "secret": SECRET, "server": A_NAME}),
        web.form({"envid": ENVID, "secret": SECRET, "server": "bad host!"}),
        web.api({"uri": URI + "x!"}),
    ]
    assert [reply.status for reply in replies] == [200, 404, 502, 200, 422, 422]
    for reply in replies:
        assert SECRET.encode() not in reply.body
        assert quote(SECRET, safe="").encode() not in reply.body
    assert "your secret was [secret]" in replies[0].text
    assert any("HTTP track from 192.0.2.7" in line for line in logged)
    assert not [line for line in logged if SECRET in line or quote(SECRET, safe="") in line]


# -- the JSON API -----------------------------------------------------------------------------


def test_the_api_answers_the_trace_json():
    trace = two_hop_trace()
    web = Web(CannedTracker([trace]))
    reply = web.api({"envid": ENVID, "secret": SECRET, "server": "mx-a.example.test:2038"})
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == trace_json(trace)
    assert [hop["host"] for hop in reply.json()["hops"]] == [A_NAME, B_NAME]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"{", "application/json", 400, "bad_request"),
        (b'["uri"]', "application/json", 400, "bad_request"),
        (b'{"uri": "x"}', "text/plain", 415, "unsupported_media_type"),
        (b'{"uri": "mtqp://x"}', "application/json; charset=utf-8", 422, "invalid_query"),
        (b'{"uri": "' + b"x" * 9000 + b'"}', "application/json", 413, "body_too_large"),
    ],
)
def test_api_errors_have_a_stable_code(body, content_type, status, code):
    reply = Web(CannedTracker([])).request("POST", "/api/v1/track", body, content_type)
    assert reply.status == status
    assert reply.json()["error"]["code"] == code
    assert ERRORS[code] == status


def test_noinfo_is_404_and_an_unreachable_server_502():
    web = Web(CannedTracker([refused_trace(), unreachable_trace("cannot connect: refused")]))
    missing = web.api({"uri": URI})
    assert (missing.status, missing.json()["error"]["code"]) == (404, "not_found")
    down = web.api({"uri": URI})
    assert down.status == 502
    assert down.json() == {
        "error": {
            "code": "upstream_error",
            "message": f"the tracking server of {A_NAME} could not be asked: "
            "cannot connect: refused",
        }
    }


def test_a_tracker_that_cannot_be_made_is_502_not_a_hung_request(logged):
    clock = MemoryReactorClock()
    broken = client_factory(clock, client.Resolver(servers=[("127.0.0.1", 53)]), max_hops=0)
    web = Web(CannedTracker([]), factory=broken)
    reply = web.api({"uri": URI})
    assert reply.status == 502
    assert reply.json()["error"]["code"] == "upstream_error"
    assert any("the tracker failed" in line for line in logged)


def test_a_trace_slower_than_the_deadline_is_504():
    pending: Deferred[Trace] = Deferred()
    web = Web(CannedTracker([pending]), TrackLimits(deadline=30))
    index = web.send("POST", "/api/v1/track", json.dumps({"uri": URI}).encode(), "application/json")
    web.clock.advance(29)
    assert web.transports[index].value() == b""
    web.clock.advance(1)
    reply = web.reply(index)
    assert reply.status == 504
    assert reply.json()["error"]["code"] == "timeout"
    pending.callback(two_hop_trace())  # too late: the answer stands
    assert web.reply(index).status == 504


# -- rate limits --------------------------------------------------------------------------------


def test_queries_over_the_track_rate_are_429_until_the_minute_passed():
    web = Web(CannedTracker([two_hop_trace() for _ in range(4)]), TrackLimits(track_rate=2))
    assert [web.api({"uri": URI}).status for _ in range(2)] == [200, 200]
    limited = web.api({"uri": URI})
    assert limited.status == 429
    assert limited.headers["retry-after"] == "60"
    assert limited.json()["error"]["code"] == "rate_limited"
    page = web.form({"uri": URI})
    assert page.status == 429 and page.headers["retry-after"] == "60"
    assert len(web.tracker.asked) == 2
    web.clock.advance(60)
    assert web.api({"uri": URI}).status == 200


def test_not_found_answers_count_against_the_failure_rate():
    tracker = CannedTracker([refused_trace(), refused_trace(), two_hop_trace()])
    web = Web(tracker, TrackLimits(track_rate=10, failure_rate=2))
    assert [web.api({"uri": URI}).status for _ in range(3)] == [404, 404, 429]
    web.clock.advance(60)
    assert web.api({"uri": URI}).status == 200
    # Each answer is counted by its result, as the MTQP listener counts TRACK.
    counted = web.metrics.registry.get_sample_value
    results = ("found", "not_found", "rate_limited")
    assert [counted("mtrkmta_http_track_queries_total", {"result": r}) for r in results] == [
        1.0,
        2.0,
        1.0,
    ]


def test_successful_answers_do_not_count_as_failures():
    tracker = CannedTracker([two_hop_trace() for _ in range(3)])
    web = Web(tracker, TrackLimits(track_rate=10, failure_rate=1))
    assert [web.api({"uri": URI}).status for _ in range(3)] == [200, 200, 200]


# -- OpenAPI ------------------------------------------------------------------------------------


def resolve(schema: dict[str, Any], document: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        schema = document["components"]["schemas"][name]
    return schema


TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
}


def problems(value: Any, schema: dict[str, Any], document: dict[str, Any], at: str = "$") -> list:
    """Where ``value`` breaks ``schema`` (the JSON Schema subset the document uses; no
    jsonschema package is installed)."""
    schema = resolve(schema, document)
    if "oneOf" in schema:
        matching = [s for s in schema["oneOf"] if not problems(value, s, document, at)]
        return [] if len(matching) == 1 else [f"{at}: matches {len(matching)} of oneOf"]
    found = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if isinstance(value, bool) and "boolean" not in kinds:
            return [f"{at}: {value!r} is not {kinds}"]
        if not any(isinstance(value, TYPES[kind]) for kind in kinds):
            return [f"{at}: {value!r} is not {kinds}"]
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{at}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        found += [
            f"{at}: {name} missing" for name in schema.get("required", []) if name not in value
        ]
        if schema.get("additionalProperties") is False:
            found += [f"{at}: {name} unexpected" for name in value if name not in properties]
        for name, item in value.items():
            if name in properties:
                found += problems(item, properties[name], document, f"{at}.{name}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += problems(item, schema["items"], document, f"{at}[{index}]")
    return found


def test_the_openapi_document_is_served_and_describes_every_error():
    reply = Web(CannedTracker([])).request("GET", "/api/v1/openapi.json")
    assert reply.status == 200
    document = reply.json()
    assert document == openapi_document()
    assert document["openapi"] == "3.1.0"
    responses = document["paths"]["/api/v1/track"]["post"]["responses"]
    described = {}
    for status, response in responses.items():
        for example in (
            response.get("content", {}).get("application/json", {}).get("examples", {}).values()
        ):
            assert (
                problems(
                    example["value"], response["content"]["application/json"]["schema"], document
                )
                == []
            )
            described[example["value"]["error"]["code"]] = int(status)
    assert described == ERRORS
    assert "Retry-After" in responses["429"]["headers"]


def test_the_request_examples_are_valid_queries():
    document = openapi_document()
    body = document["paths"]["/api/v1/track"]["post"]["requestBody"]["content"]["application/json"]
    for example in body["examples"].values():
        assert problems(example["value"], body["schema"], document) == []
        parse_query(example["value"])
    assert problems({"uri": URI, "secret": SECRET}, body["schema"], document) != []


def test_real_answers_match_the_schemas():
    document = openapi_document()
    data = {**trace_json(two_hop_trace()), "events": events()}
    assert problems(data, {"$ref": "#/components/schemas/Trace"}, document) == []
    assert problems({"envid": 1}, {"$ref": "#/components/schemas/Trace"}, document) != []
    web = Web(CannedTracker([two_hop_trace(), refused_trace()]))
    ok, missing = web.api({"uri": URI}), web.api({"uri": URI})
    assert problems(ok.json(), {"$ref": "#/components/schemas/Trace"}, document) == []
    assert problems(missing.json(), {"$ref": "#/components/schemas/Error"}, document) == []


# -- the documentation --------------------------------------------------------------------------


def doc_json_blocks() -> dict[str, Any]:
    """The JSON examples of doc/tracking.rst's API section, by the comment line before them
    (``.. api-example: NAME``)."""
    text = DOCS.read_text()
    found = {}
    pattern = r"\.\. api-example: (\S+)\n\n::\n\n((?:    [^\n]*\n|\n)+)"
    for name, block in re.findall(pattern, text):
        found[name] = json.loads("\n".join(line[4:] for line in block.splitlines()))
    return found


def test_the_documented_examples_are_what_the_api_answers():
    blocks = doc_json_blocks()
    assert set(blocks) >= {"request", "response", "error-request", "error-response"}
    trace = two_hop_trace()
    web = Web(CannedTracker([trace]))
    request = blocks["request"]
    answer = web.api(request).json()

    document = openapi_document()
    assert problems(blocks["response"], {"$ref": "#/components/schemas/Trace"}, document) == []
    assert blocks["response"] == answer
    error = web.api(blocks["error-request"])
    assert error.status == 422
    assert error.json() == blocks["error-response"]


def test_the_limits_are_the_mtqp_listeners():
    config = load_config(
        None,
        [Override("test", "mtqp.track_rate", 7), Override("test", "mtqp.failure_rate", 3)],
        fqdn=lambda: "mx.example.test",
    )
    assert TrackLimits.from_config(config) == TrackLimits(track_rate=7, failure_rate=3)
