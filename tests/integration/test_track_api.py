"""The HTTP tracking API end to end: a message crosses two in-process nodes, and
``POST /api/v1/track`` on the first node's HTTP listener follows it across both (RFC 3886
§3.3.3, RFC 3887 §2): the node finds each hop's tracking server as `mtrkmta track` does,
by the SRV records of test_tracking_chain's DNS server."""

from __future__ import annotations

import io
import json
from urllib.parse import urlencode

import pytest_twisted
from smtpwire import queue_emptied, until
from test_tracking_chain import A_NAME, B_NAME, DOMAIN, RCPT, chain
from twisted.internet import reactor
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from mtrkmta.mtqp.uri import parse_uri


async def post(port: int, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    agent = Agent(reactor)
    headers = Headers({b"content-type": [content_type.encode()]})
    url = f"http://127.0.0.1:{port}{path}".encode()
    response = await agent.request(b"POST", url, headers, FileBodyProducer(io.BytesIO(body)))
    return response.code, await readBody(response)


@pytest_twisted.ensureDeferred
async def test_the_api_follows_a_message_across_two_nodes(tmp_path, log_lines):
    lines = log_lines
    async with chain(tmp_path) as rig:
        b = await rig.start("b", B_NAME, ("domains.local", (DOMAIN,)))
        a = await rig.start(
            "a",
            A_NAME,
            ("routes", f"{DOMAIN}=mx"),
            ("delivery.smtp_port", b.port("smtp")),
            resolver=rig.dns.resolver(),
            listeners=("smtp", "mtqp", "http"),
        )
        a_mtqp, b_mtqp = a.port("mtqp"), b.port("mtqp")
        uri = await rig.send()
        await queue_emptied(a)
        await queue_emptied(b)
        secret = parse_uri(uri).secret
        port = a.port("http")
        query = json.dumps({"uri": uri}).encode()
        status, body = await post(port, "/api/v1/track", query, "application/json")
        page_status, page = await post(
            port,
            "/track",
            urlencode({"uri": uri}).encode(),
            "application/x-www-form-urlencoded",
        )
        # Both answers are counted on the node's /metrics, served beside them.
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
        metrics = (await readBody(response)).decode()
    assert status == 200, body
    trace = json.loads(body)
    first, second = trace["hops"]
    assert (first["host"], first["server"]["port"]) == (A_NAME, a_mtqp)
    assert first["reports"][0]["reporting_mta"] == f"dns; {A_NAME}"
    assert (second["host"], second["referred_by"], second["server"]["port"]) == (
        B_NAME,
        A_NAME,
        b_mtqp,
    )
    assert second["reports"][0]["reporting_mta"] == f"dns; {B_NAME}"
    (path,) = trace["recipients"]
    assert (path["original_recipient"], path["outcome"], path["final"]) == (
        RCPT,
        "delivered",
        True,
    )
    assert [step["action"] for step in path["path"]] == ["transferred", "delivered"]
    assert page_status == 200
    text = page.decode()
    assert '<p class="result" role="status">Delivered: 1 recipient, 1 delivered.</p>' in text
    assert f'2</th><td data-label="Server">{B_NAME} (127.0.0.1 port {b_mtqp})' in text
    assert f"dns; {B_NAME}" in text
    assert secret not in body.decode() and secret not in text
    assert any("HTTP track from 127.0.0.1" in line for line in lines)
    assert not [line for line in lines if secret in line]
    assert 'mtrkmta_http_track_queries_total{result="found"} 2.0' in metrics


@pytest_twisted.ensureDeferred
async def test_a_query_naming_another_service_sends_it_nothing(tmp_path, log_lines):
    # The page connects where a query says, so a stranger could name any host and port of
    # the node's network; the MTQP client sends nothing before it has read an MTQP
    # greeting (RFC 3887 §3), so another service (here the node's own SMTP listener) gets
    # a connection and not one byte.
    lines = log_lines
    async with chain(tmp_path) as rig:
        a = await rig.start("a", A_NAME, listeners=("smtp", "mtqp", "http"))
        query = {
            "envid": "probe@example.test",
            "secret": "AAECAwQFBgcICQoLDA0ODw==",
            "server": f"127.0.0.1:{a.port('smtp')}",
        }
        status, body = await post(
            a.port("http"), "/api/v1/track", json.dumps(query).encode(), "application/json"
        )
        await until(
            lambda: any("smtp disconnect" in line for line in lines), "the SMTP session's end"
        )
    assert status == 502, body
    assert json.loads(body)["error"]["code"] == "upstream_error"
    (ended,) = [line for line in lines if "smtp disconnect" in line]
    assert ended.endswith(" commands=0"), ended
