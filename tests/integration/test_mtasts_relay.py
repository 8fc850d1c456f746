"""MTA-STS (RFC 8461) over real loopback sockets: a test DNS zone, an HTTPS policy server with
a test CA, and an mtrkmta node with STARTTLS as the MX host.

The relaying side is the Router (with a PolicyFetcher whose HTTPS port is injected: the
policy host resolves to 127.0.0.1 in the test zone) and the SMTPTransport, as the queue
uses them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from certs import TestCA
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from dnsserver import DNSServer, Zone, a, mx, serve_dns
from test_relay_auth_verify import SETTINGS, received, relay_through_node
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mtrkmta.config import DEFAULT_ROUTE, CAFile
from mtrkmta.delivery.interfaces import Attempt, NextHop, RecipientOutcome, RouteFailure
from mtrkmta.delivery.smtp import SMTPTransport
from mtrkmta.envelope import Envelope, MailParams, RcptParams, Recipient
from mtrkmta.routing.mtasts import MAX_POLICY_SIZE, load_cache
from mtrkmta.routing.mtastsfetch import RETRY_FETCH_AFTER, WELL_KNOWN, PolicyFetcher, PolicyFile
from mtrkmta.routing.router import Router
from mtrkmta.testing import node_config, start_node, stop_node
from mtrkmta.tracking.interfaces import RecipientState as S

DOMAIN = "far.example"
MX_HOST = "mx.far.example"
CONTENT = b"From: a@client.example\r\nSubject: MTA-STS\r\n\r\nHello.\r\n"


def policy(mode: str = "enforce", mx_pattern: str = MX_HOST) -> bytes:
    return f"version: STSv1\r\nmode: {mode}\r\nmx: {mx_pattern}\r\nmax_age: 86400\r\n".encode()


def zone(txt: bytes | None = b"v=STSv1; id=20260101T0;") -> Zone:
    records: dict[str, list[Any]] = {
        DOMAIN: [mx(10, MX_HOST)],
        MX_HOST: [a("127.0.0.1")],
        f"mta-sts.{DOMAIN}": [a("127.0.0.1")],
    }
    if txt is not None:
        records[f"_mta-sts.{DOMAIN}"] = [dns.Record_TXT(txt), dns.Record_TXT(b"v=spf1 -all")]
    return Zone(DOMAIN, records)


def set_txt(dns_server: DNSServer, txt: bytes) -> None:
    """Change the zone's TXT record for ``_mta-sts`` while the server runs."""
    authority = dns_server.factory.resolver.resolvers[0]
    authority.records[f"_mta-sts.{DOMAIN}".encode()] = [dns.Record_TXT(txt, ttl=60)]


class PolicyResource(Resource):
    """Serves the policy at /.well-known/mta-sts.txt and counts the requests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.body = policy()
        self.content_type = b"text/plain; charset=us-ascii"
        self.code = 200
        self.location: bytes | None = None
        self.chunked = False
        self.requests: list[bytes] = []

    def render_GET(self, request: Any) -> Any:
        self.requests.append(request.path)
        if request.path != WELL_KNOWN.encode():
            request.setResponseCode(404)
            return b"not here"
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", self.content_type)
        if self.location is not None:
            request.setHeader(b"location", self.location)
        if not self.chunked:
            return self.body
        for start in range(0, len(self.body), 8192):  # no Content-Length: chunked
            request.write(self.body[start : start + 8192])
        request.finish()
        return NOT_DONE_YET


class PolicyServer:
    """An HTTPS server on 127.0.0.1 with a certificate for ``mta-sts.far.example``."""

    def __init__(self, ca: TestCA, name: str = f"mta-sts.{DOMAIN}") -> None:
        self.resource = PolicyResource()
        cert_pem, key_pem = ca.issue(name)
        options = ssl.CertificateOptions(
            privateKey=serialization.load_pem_private_key(key_pem, None),
            certificate=x509.load_pem_x509_certificate(cert_pem),
        )
        self.port = reactor.listenSSL(0, Site(self.resource), options, interface="127.0.0.1")

    @property
    def number(self) -> int:
        return self.port.getHost().port

    async def stop(self) -> None:
        await maybeDeferred(self.port.stopListening)


@pytest_twisted.async_yield_fixture
async def https(ca: TestCA) -> AsyncIterator[PolicyServer]:
    server = PolicyServer(ca)
    yield server
    await server.stop()


def make_router(
    dns_server: DNSServer,
    smtp_port: int,
    ca: TestCA,
    https_port: int,
    store: PolicyFile | None = None,
    clock: Any = None,
    timeout: float = 5.0,
) -> tuple[Router, PolicyFetcher]:
    fetcher = PolicyFetcher(
        reactor,
        dns_server.resolver(),
        clock=clock,
        timeout=timeout,
        ca=CAFile(Path("ca.pem"), ca.pem),
        https_port=https_port,
        store=store,
    )
    router = Router(
        (DEFAULT_ROUTE,),
        (),
        dns_server.resolver(),
        smtp_port=smtp_port,
        mta_sts=fetcher,
    )
    return router, fetcher


async def send(router: Router) -> RecipientOutcome | RouteFailure:
    """Route bob@far.example and, when there is a next hop, deliver one message to it."""
    hop = await router.route(DOMAIN)
    if isinstance(hop, RouteFailure):
        return hop
    assert isinstance(hop, NextHop)
    envelope = Envelope(
        queue_id="MTASTS1",
        sender="a@client.example",
        recipients=(Recipient(f"bob@{DOMAIN}", RcptParams()),),
        params=MailParams(),
        arrival=1_700_000_000.0,
    )
    transport = SMTPTransport(reactor, SETTINGS)
    try:
        (outcome,) = await transport.deliver(Attempt(envelope, CONTENT, (0,), hop, 1.7e9))
    finally:
        await transport.close()
    return outcome


def relayed(outcome: RecipientOutcome | RouteFailure) -> bool:
    return isinstance(outcome, RecipientOutcome) and (outcome.state, outcome.status) == (
        S.RELAYED,
        "2.1.9",
    )


# -- enforce ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_enforce_with_a_policy_mx_and_verified_tls_delivers(smarthost, https, ca):
    await smarthost.start(MX_HOST, users=False, local=(DOMAIN,))
    async with serve_dns(reactor, [zone()]) as dns_server:
        router, _ = make_router(dns_server, smarthost.node.port("smtp"), ca, https.number)
        hop = await router.route(DOMAIN)
        assert isinstance(hop, NextHop) and (hop.tls, hop.servers[0].name) == ("verify", MX_HOST)
        assert relayed(await send(router))
    assert await received(smarthost) == 1
    assert https.resource.requests == [WELL_KNOWN.encode()]  # send() reused the cached policy


@pytest_twisted.ensureDeferred
async def test_enforce_defers_when_no_mx_is_in_the_policy(smarthost, https, ca, log_lines):
    await smarthost.start(MX_HOST, users=False, local=(DOMAIN,))
    https.resource.body = policy("enforce", "*.mail.far.example")
    async with serve_dns(reactor, [zone()]) as dns_server:
        router, _ = make_router(dns_server, smarthost.node.port("smtp"), ca, https.number)
        result = await send(router)
    assert isinstance(result, RouteFailure)
    assert (result.state, result.status) == (S.DEFERRED, "4.7.0")
    assert result.reason == (
        "no MX host of far.example is in its MTA-STS policy "
        "(MX mx.far.example; the policy allows *.mail.far.example)"
    )
    assert await received(smarthost) == 0
    assert any(result.reason in line for line in log_lines)


@pytest_twisted.ensureDeferred
async def test_enforce_defers_4_7_5_for_a_certificate_of_another_name(smarthost, https, ca):
    await smarthost.start(DOMAIN, users=False, local=(DOMAIN,))  # for far.example, not the MX
    async with serve_dns(reactor, [zone()]) as dns_server:
        router, _ = make_router(dns_server, smarthost.node.port("smtp"), ca, https.number)
        outcome = await send(router)
    assert isinstance(outcome, RecipientOutcome)
    assert (outcome.state, outcome.status) == (S.DEFERRED, "4.7.5")
    assert outcome.diagnostic == (
        f"x-mtrkmta; TLS certificate of {MX_HOST} not verified: "
        f"the certificate is not for {MX_HOST} (it names {DOMAIN})"
    )
    assert await received(smarthost) == 0


@pytest_twisted.ensureDeferred
async def test_enforce_defers_4_7_4_when_the_mx_offers_no_starttls(tmp_path, https, ca):
    options = (("durability.fsync", False), ("domains.local", (DOMAIN,)))
    config = node_config(tmp_path / "plain", hostname=MX_HOST, options=options)
    node = await start_node(config, deliver=False)  # no TLS certificate: no STARTTLS
    try:
        async with serve_dns(reactor, [zone()]) as dns_server:
            router, _ = make_router(dns_server, node.port("smtp"), ca, https.number)
            outcome = await send(router)
        assert len(await node.spool.queue_ids()) == 0
    finally:
        await stop_node(node)
    assert isinstance(outcome, RecipientOutcome)
    assert (outcome.state, outcome.status) == (S.DEFERRED, "4.7.4")
    assert outcome.diagnostic == (f"x-mtrkmta; TLS is required, but was not offered by {MX_HOST}")


# -- testing, none, and no policy -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_testing_mode_logs_and_delivers_as_before(smarthost, https, ca, log_lines):
    # The MX is outside the policy and its certificate is for another name: delivered anyway.
    await smarthost.start(DOMAIN, users=False, local=(DOMAIN,))
    https.resource.body = policy("testing", "*.mail.far.example")
    async with serve_dns(reactor, [zone()]) as dns_server:
        router, _ = make_router(dns_server, smarthost.node.port("smtp"), ca, https.number)
        assert relayed(await send(router))
    assert await received(smarthost) == 1
    notes = [line for line in log_lines if "(mode testing)" in line]
    assert notes == [
        "MTA-STS policy of far.example (mode testing) does not allow MX mx.far.example "
        "(it allows *.mail.far.example); delivering as without a policy"
    ]


@pytest_twisted.ensureDeferred
async def test_without_a_txt_record_nothing_is_fetched_and_mail_goes_as_before(
    smarthost, https, ca
):
    await smarthost.start(DOMAIN, users=False, local=(DOMAIN,))  # a wrong name: not checked
    async with serve_dns(reactor, [zone(txt=None)]) as dns_server:
        router, _ = make_router(dns_server, smarthost.node.port("smtp"), ca, https.number)
        hop = await router.route(DOMAIN)
        assert isinstance(hop, NextHop) and hop.tls == "may"
        assert relayed(await send(router))
    assert https.resource.requests == []


# -- the cache (RFC 8461 §5.1) ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_policy_is_cached_and_refetched_when_the_txt_id_changes(smarthost, https, ca):
    await smarthost.start(MX_HOST, users=False, local=(DOMAIN,))
    async with serve_dns(reactor, [zone()]) as dns_server:
        router, fetcher = make_router(dns_server, smarthost.node.port("smtp"), ca, https.number)
        assert relayed(await send(router))
        assert relayed(await send(router))
        assert len(https.resource.requests) == 1  # the second delivery fetched nothing
        https.resource.body = policy("enforce", "elsewhere.far.example")
        set_txt(dns_server, b"v=STSv1; id=20260102T0;")
        result = await send(router)
        assert len(https.resource.requests) == 2
        cached = fetcher.cache.get(DOMAIN)
        assert cached is not None and cached.id == "20260102T0"
    assert isinstance(result, RouteFailure) and result.status == "4.7.0"
    assert await received(smarthost) == 2


@pytest_twisted.ensureDeferred
async def test_a_failed_refetch_keeps_the_cached_policy(smarthost, https, ca):
    await smarthost.start(MX_HOST, users=False, local=(DOMAIN,))
    https.resource.body = policy("enforce", "elsewhere.far.example")
    async with serve_dns(reactor, [zone()]) as dns_server:
        router, _ = make_router(dns_server, smarthost.node.port("smtp"), ca, https.number)
        assert isinstance(await send(router), RouteFailure)
        https.resource.code = 500
        set_txt(dns_server, b"v=STSv1; id=20260102T0;")
        result = await send(router)  # the fetch fails: the cached enforce policy holds
        assert len(https.resource.requests) == 2
    assert isinstance(result, RouteFailure) and result.status == "4.7.0"


@pytest_twisted.ensureDeferred
async def test_the_policy_cache_survives_a_restart(tmp_path, smarthost, https, ca):
    await smarthost.start(MX_HOST, users=False, local=(DOMAIN,))
    path, pool = tmp_path / "mta-sts.json", reactor.getThreadPool()
    async with serve_dns(reactor, [zone()]) as dns_server:
        store = PolicyFile(path, reactor, pool)
        router, _ = make_router(dns_server, smarthost.node.port("smtp"), ca, https.number, store)
        assert relayed(await send(router))
        await store.idle()
        # A new fetcher on the same file, as after a restart: nothing is fetched.
        again, _ = make_router(
            dns_server, smarthost, ca, https.number, PolicyFile(path, reactor, pool)
        )
        hop = await again.route(DOMAIN)
    assert isinstance(hop, NextHop) and hop.tls == "verify"
    assert len(https.resource.requests) == 1
    ((domain, entry),) = load_cache(path.read_bytes())
    assert (domain, entry.id, entry.policy.mode) == (DOMAIN, "20260101T0", "enforce")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("mta-sts")) == [
        "mta-sts.json"
    ]


@pytest_twisted.ensureDeferred
async def test_a_broken_cache_file_is_ignored_and_replaced(
    tmp_path, smarthost, https, ca, log_lines
):
    await smarthost.start(MX_HOST, users=False, local=(DOMAIN,))
    path, pool = tmp_path / "mta-sts.json", reactor.getThreadPool()
    path.write_bytes(b'{"format": "mtrkmta-mta-sts-1", "policies": "x"}')
    async with serve_dns(reactor, [zone()]) as dns_server:
        store = PolicyFile(path, reactor, pool)
        router, _ = make_router(dns_server, smarthost.node.port("smtp"), ca, https.number, store)
        assert relayed(await send(router))
        await store.idle()
    assert len(https.resource.requests) == 1
    assert [entry.id for _, entry in load_cache(path.read_bytes())] == ["20260101T0"]
    assert any(
        f"ignoring the policy cache {path}: 'policies' is not a list" in line for line in log_lines
    )


# -- hostile or broken policy hosts: ignored, mail goes as without a policy ------------------


@pytest.mark.parametrize(
    ("breakage", "why"),
    [
        ("too big", "policy larger than 65536 bytes (Content-Length)"),
        ("too big, chunked", "policy larger than 65536 bytes; delivering"),
        ("malformed", "invalid policy: policy mode enforce has no mx"),
        ("html", "Content-Type 'text/html', not text/plain"),
        ("not 200", "HTTP status 404 (only 200 counts; no redirects)"),
        ("redirect", "HTTP status 301 (only 200 counts; no redirects)"),
        ("other name", "the HTTPS certificate is not for the policy host"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_bad_policy_is_ignored_safely(smarthost, ca, breakage, why, log_lines):
    await smarthost.start(DOMAIN, users=False, local=(DOMAIN,))  # enforce would refuse it
    https = PolicyServer(ca, "other.example" if breakage == "other name" else f"mta-sts.{DOMAIN}")
    resource = https.resource
    resource.body = policy("enforce", "*.mail.far.example")
    padding = b"x_pad: " + b"y" * MAX_POLICY_SIZE + b"\r\n"
    if breakage.startswith("too big"):
        resource.body += padding
        resource.chunked = breakage.endswith("chunked")
    elif breakage == "malformed":
        resource.body = b"version: STSv1\r\nmode: enforce\r\nmax_age: 86400\r\n"  # no mx
    elif breakage == "html":
        resource.content_type = b"text/html"
    elif breakage == "not 200":
        resource.code = 404
    elif breakage == "redirect":
        resource.code = 301
        resource.location = f"https://mta-sts.{DOMAIN}:{https.number}/elsewhere".encode()
    try:
        async with serve_dns(reactor, [zone()]) as dns_server:
            router, fetcher = make_router(dns_server, smarthost.node.port("smtp"), ca, https.number)
            outcome = await send(router)
            assert fetcher.cache.get(DOMAIN) is None
    finally:
        await https.stop()
    assert relayed(outcome)
    # A redirect is not followed; a server with a certificate for another name gets no request.
    assert resource.requests == ([] if breakage == "other name" else [WELL_KNOWN.encode()])
    (line,) = [line for line in log_lines if "MTA-STS: far.example: policy not fetched" in line]
    assert why in line


@pytest_twisted.ensureDeferred
async def test_a_failed_fetch_is_not_repeated_for_every_delivery(smarthost, https, ca, log_lines):
    # A policy host that fails costs one attempt per RETRY_FETCH_AFTER, not one per message.
    await smarthost.start(DOMAIN, users=False, local=(DOMAIN,))
    https.resource.code = 500
    clock = Clock()
    async with serve_dns(reactor, [zone()]) as dns_server:
        router, _ = make_router(
            dns_server, smarthost.node.port("smtp"), ca, https.number, clock=clock
        )
        assert relayed(await send(router))
        assert relayed(await send(router))
        assert len(https.resource.requests) == 1
        clock.advance(RETRY_FETCH_AFTER)
        https.resource.code = 200
        https.resource.body = policy("enforce", "elsewhere.far.example")
        result = await send(router)
        assert len(https.resource.requests) == 2
    assert isinstance(result, RouteFailure) and result.status == "4.7.0"
    failures = [line for line in log_lines if "policy not fetched" in line]
    assert len(failures) == 1 and "next try in 300s at the earliest" in failures[0]


@pytest_twisted.ensureDeferred
async def test_an_unreachable_policy_host_delivers_as_before(smarthost, ca):
    await smarthost.start(DOMAIN, users=False, local=(DOMAIN,))
    https = PolicyServer(ca)
    port = https.number
    await https.stop()  # nothing listens there now
    async with serve_dns(reactor, [zone()]) as dns_server:
        router, _ = make_router(dns_server, smarthost.node.port("smtp"), ca, port)
        assert relayed(await send(router))


class Silent(Protocol):
    """Accepts a connection and never says a word (a policy host that hangs)."""

    def connectionMade(self) -> None:
        self.factory.accepted.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_a_policy_host_that_hangs_times_out_and_mail_goes_as_before(smarthost, ca):
    await smarthost.start(DOMAIN, users=False, local=(DOMAIN,))
    factory = Factory.forProtocol(Silent)
    factory.accepted, factory.lost = Deferred(), Deferred()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    clock = Clock()  # the fetch timeout runs on this clock; the sockets are real
    try:
        async with serve_dns(reactor, [zone()]) as dns_server:
            smtp_port, https_port = smarthost.node.port("smtp"), port.getHost().port
            router, _ = make_router(
                dns_server, smtp_port, ca, https_port, clock=clock, timeout=10.0
            )
            routing = router.route(DOMAIN)
            await factory.accepted.addTimeout(30, reactor)  # a safety net, not a wait
            clock.advance(9.9)
            assert not routing.called
            clock.advance(0.1)
            hop = await routing
            await factory.lost  # the fetch's connection was dropped
    finally:
        await maybeDeferred(port.stopListening)
    assert isinstance(hop, NextHop) and hop.tls == "may"


# -- a whole node: the configuration switch ------------------------------------------------


@pytest.mark.parametrize("enabled", [True, False])
@pytest_twisted.ensureDeferred
async def test_a_node_asks_for_the_txt_record_only_with_delivery_mta_sts(
    tmp_path, smarthost, ca, enabled
):
    await smarthost.start(MX_HOST, users=False, local=(DOMAIN,))
    options: tuple[tuple[str, object], ...] = (
        ("routes", f"{DOMAIN}=mx"),  # an mx route without tls of its own: relayed to
        ("delivery.smtp_port", smarthost.node.port("smtp")),
        ("delivery.mta_sts", enabled),
        ("delivery.mta_sts_ca_file", str(ca.write(tmp_path / "ca.pem"))),
    )
    async with serve_dns(reactor, [zone(txt=None)]) as dns_server:
        update = await relay_through_node(
            tmp_path, f"bob@{DOMAIN}", options, resolver=dns_server.resolver()
        )
        asked = [query.name for query in dns_server.queries if query.type == dns.TXT]
    assert (update.state, update.status) == (S.RELAYED, "2.1.9")
    assert asked == ([f"_mta-sts.{DOMAIN}"] if enabled else [])
