"""The HTTP tracking API end to end: a message crosses two in-process nodes, and
``POST /api/v1/track`` on a twisted.web Site on loopback follows it across both (RFC 3886
§3.3.3, RFC 3887 §2), with the setup of test_tracking_chain's two nodes on one address."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode

import pytest_twisted
from smtpwire import queue_emptied
from test_tracking_chain import A_NAME, B_NAME, DOMAIN, RCPT, REPLY_TIMEOUT, chain
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from mtrkmta.mtqp.uri import parse_uri
from mtrkmta.web.track import TrackLimits, client_factory, track_resources


@asynccontextmanager
async def web_for(resolver: Any, b_mtqp: int) -> AsyncIterator[int]:
    """A Site with the track resources on 127.0.0.1; its port. B's Remote-MTA is
    ``[127.0.0.1]``: its tracking server is where ``--connect-to`` would say."""

    def connect_to(host: str, port: int | None) -> tuple[str, int] | None:
        return ("127.0.0.1", b_mtqp) if (host, port) == ("127.0.0.1", None) else None

    factory = client_factory(reactor, resolver, reply_timeout=REPLY_TIMEOUT, connect_to=connect_to)
    root = Resource()
    for name, child in track_resources(factory, TrackLimits(), reactor).items():
        root.putChild(name, child)
    listening = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        yield listening.getHost().port
    finally:
        await listening.stopListening()


async def post(port: int, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    agent = Agent(reactor)
    headers = Headers({b"content-type": [content_type.encode()]})
    url = f"http://127.0.0.1:{port}{path}".encode()
    response = await agent.request(b"POST", url, headers, FileBodyProducer(io.BytesIO(body)))
    return response.code, await readBody(response)


@pytest_twisted.ensureDeferred
async def test_the_api_follows_a_message_across_two_nodes(tmp_path):
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    try:
        async with chain(tmp_path) as rig:
            b = await rig.start("b", B_NAME, ("domains.local", (DOMAIN,)))
            route = f"{DOMAIN}=smtp:tcp:host=127.0.0.1:port={b.port('smtp')};tls=none"
            a = await rig.start("a", A_NAME, ("routes", route))
            a_mtqp = a.port("mtqp")
            uri = await rig.send(mtqp_server=f"127.0.0.1:{a_mtqp}")
            await queue_emptied(a)
            await queue_emptied(b)
            secret = parse_uri(uri).secret
            async with web_for(rig.dns.resolver(), b.port("mtqp")) as port:
                query = json.dumps({"uri": uri}).encode()
                status, body = await post(port, "/api/v1/track", query, "application/json")
                page_status, page = await post(
                    port,
                    "/track",
                    urlencode({"uri": uri}).encode(),
                    "application/x-www-form-urlencoded",
                )
    finally:
        globalLogPublisher.removeObserver(observe)
    assert status == 200, body
    trace = json.loads(body)
    first, second = trace["hops"]
    assert (first["host"], first["server"]["port"]) == ("127.0.0.1", a_mtqp)
    assert first["reports"][0]["reporting_mta"] == f"dns; {A_NAME}"
    assert (second["host"], second["referred_by"]) == ("[127.0.0.1]", A_NAME)
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
    assert '2</th><td data-label="Server">[127.0.0.1] (127.0.0.1 port' in text
    assert f"dns; {B_NAME}" in text
    assert secret not in body.decode() and secret not in text
    assert any("HTTP track from 127.0.0.1" in line for line in lines)
    assert not [line for line in lines if secret in line]
