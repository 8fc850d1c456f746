"""MX routing against a real twisted.names DNS server on loopback (UDP and TCP)."""

from __future__ import annotations

import random
import socket

import pytest_twisted
from dnsserver import (
    LoopbackResolver,
    Zone,
    a,
    aaaa,
    cname,
    mx,
    null_mx,
    serve_dns,
)
from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.names import dns

from mtrkmta.config import DEFAULT_ROUTE
from mtrkmta.delivery.interfaces import NextHop, RouteFailure, Server
from mtrkmta.routing.router import Router
from mtrkmta.tracking.interfaces import RecipientState

ZONE = Zone(
    "example.test",
    {
        # Preferences listed out of order on purpose.
        "pref.example.test": [
            mx(20, "mx2.example.test"),
            mx(10, "mx1.example.test"),
            mx(30, "mx3.example.test"),
        ],
        "mx1.example.test": [a("192.0.2.1")],
        "mx2.example.test": [a("192.0.2.2")],
        "mx3.example.test": [a("192.0.2.3")],
        "tie.example.test": [
            mx(5, "first.example.test"),
            mx(10, "ta.example.test"),
            mx(10, "tb.example.test"),
            mx(10, "tc.example.test"),
        ],
        "first.example.test": [a("192.0.2.10")],
        "ta.example.test": [a("192.0.2.11")],
        "tb.example.test": [a("192.0.2.12")],
        "tc.example.test": [a("192.0.2.13")],
        "plain.example.test": [a("192.0.2.50"), aaaa("2001:db8::50")],
        "nullmx.example.test": [null_mx(), a("192.0.2.60")],
        "partial.example.test": [
            mx(10, "ghost.example.test"),  # NXDOMAIN
            mx(20, "noaddr.example.test"),  # exists, but no A or AAAA
            mx(30, "mx3.example.test"),
        ],
        "noaddr.example.test": [dns.Record_TXT(b"no addresses here")],
        "allbad.example.test": [mx(10, "ghost.example.test"), mx(20, "noaddr.example.test")],
        "v6.example.test": [mx(10, "dual.example.test")],
        "dual.example.test": [aaaa("2001:db8::25"), a("192.0.2.25")],
        "alias.example.test": [cname("pref.example.test")],
        "big.example.test": [mx(10 + i, f"host{i:02d}.example.test") for i in range(30)],
        **{f"host{i:02d}.example.test": [a(f"198.51.100.{i + 1}")] for i in range(30)},
    },
)


def router(resolver, **kw) -> Router:
    return Router((DEFAULT_ROUTE,), (), resolver, **kw)


def names(hop: NextHop) -> list[str]:
    return [server.name for server in hop.servers]


@pytest_twisted.ensureDeferred
async def test_mx_hosts_in_preference_order():
    async with serve_dns(reactor, [ZONE]) as dns_server:
        hop = await router(dns_server.resolver()).route("pref.example.test")
    assert hop == NextHop(
        transport="smtp",
        destination="mx:pref.example.test",
        servers=(
            Server("mx1.example.test", "tcp:host=192.0.2.1:port=25"),
            Server("mx2.example.test", "tcp:host=192.0.2.2:port=25"),
            Server("mx3.example.test", "tcp:host=192.0.2.3:port=25"),
        ),
    )


@pytest_twisted.ensureDeferred
async def test_equal_preferences_are_shuffled_and_keep_their_rank():
    source_order = ["ta.example.test", "tb.example.test", "tc.example.test"]
    async with serve_dns(reactor, [ZONE]) as dns_server:
        routes = router(dns_server.resolver(), rng=random.Random(20240101))
        orders = [names(await routes.route("tie.example.test")) for _ in range(12)]
    assert all(order[0] == "first.example.test" for order in orders)
    assert all(sorted(order[1:]) == source_order for order in orders)
    assert any(order[1:] != source_order for order in orders)
    assert len({tuple(order) for order in orders}) > 1


@pytest_twisted.ensureDeferred
async def test_no_mx_falls_back_to_the_domains_own_addresses():
    async with serve_dns(reactor, [ZONE]) as dns_server:
        resolver = dns_server.resolver()
        hop = await router(resolver, smtp_port=2525).route("plain.example.test")
        v6_first = await router(resolver, prefer_ipv6=True).route("plain.example.test")
    assert hop.destination == "mx:plain.example.test"
    assert hop.servers == (
        Server("plain.example.test", "tcp:host=192.0.2.50:port=2525"),
        Server("plain.example.test", r"tcp:host=2001\:db8\:\:50:port=2525"),
    )
    assert [s.endpoint for s in v6_first.servers] == [
        r"tcp:host=2001\:db8\:\:50:port=25",
        "tcp:host=192.0.2.50:port=25",
    ]


@pytest_twisted.ensureDeferred
async def test_null_mx_fails_at_once():
    async with serve_dns(reactor, [ZONE]) as dns_server:
        result = await router(dns_server.resolver()).route("nullmx.example.test")
        asked = [(q.name, q.type) for q in dns_server.queries]
    assert isinstance(result, RouteFailure)
    assert (result.state, result.status) == (RecipientState.FAILED, "5.1.10")
    assert "null MX" in result.reason
    assert asked == [("nullmx.example.test", dns.MX)]  # no address lookups, no fallback


@pytest_twisted.ensureDeferred
async def test_nxdomain_is_a_bad_destination_system():
    async with serve_dns(reactor, [ZONE]) as dns_server:
        routes = router(dns_server.resolver())
        inside = await routes.route("nope.example.test")
        outside = await routes.route("elsewhere.invalid")
    for result in (inside, outside):
        assert isinstance(result, RouteFailure)
        assert (result.state, result.status) == (RecipientState.FAILED, "5.1.2")


@pytest_twisted.ensureDeferred
async def test_mx_hosts_without_addresses_are_skipped():
    async with serve_dns(reactor, [ZONE]) as dns_server:
        routes = router(dns_server.resolver())
        partial = await routes.route("partial.example.test")
        none = await routes.route("allbad.example.test")
    assert partial.servers == (Server("mx3.example.test", "tcp:host=192.0.2.3:port=25"),)
    assert isinstance(none, RouteFailure)
    assert (none.state, none.status) == (RecipientState.DEFERRED, "4.4.3")
    assert "ghost.example.test" in none.reason and "noaddr.example.test" in none.reason


@pytest_twisted.ensureDeferred
async def test_ipv6_addresses_make_valid_client_endpoints():
    async with serve_dns(reactor, [ZONE]) as dns_server:
        hop = await router(dns_server.resolver()).route("v6.example.test")
    assert names(hop) == ["dual.example.test", "dual.example.test"]
    v4, v6 = (server.endpoint for server in hop.servers)
    assert v4 == "tcp:host=192.0.2.25:port=25"
    assert v6 == r"tcp:host=2001\:db8\:\:25:port=25"
    memory = MemoryReactor()
    for endpoint in (v4, v6):
        clientFromString(memory, endpoint).connect(Factory())
    assert [client[:2] for client in memory.tcpClients] == [
        ("192.0.2.25", 25),
        ("2001:db8::25", 25),
    ]


@pytest_twisted.ensureDeferred
async def test_cname_to_a_domain_with_mx_records():
    async with serve_dns(reactor, [ZONE]) as dns_server:
        hop = await router(dns_server.resolver()).route("alias.example.test")
    assert hop.destination == "mx:alias.example.test"
    assert names(hop) == ["mx1.example.test", "mx2.example.test", "mx3.example.test"]


@pytest_twisted.ensureDeferred
async def test_mx_set_too_large_for_udp_is_fetched_over_tcp():
    async with serve_dns(reactor, [ZONE]) as dns_server:
        hop = await router(dns_server.resolver(), max_mx_servers=100).route("big.example.test")
        mx_queries = [q for q in dns_server.queries if q.name == "big.example.test"]
    assert names(hop) == [f"host{i:02d}.example.test" for i in range(30)]
    assert [q.transport for q in mx_queries] == ["udp", "tcp"]


@pytest_twisted.ensureDeferred
async def test_our_own_mx_drops_it_and_the_less_preferred_hosts():
    async with serve_dns(reactor, [ZONE]) as dns_server:
        resolver = dns_server.resolver()
        backup = await router(resolver, hostname="mx2.example.test").route("pref.example.test")
        primary = await router(resolver, hostname="MX1.example.test").route("pref.example.test")
    assert names(backup) == ["mx1.example.test"]
    assert isinstance(primary, RouteFailure)
    assert (primary.state, primary.status) == (RecipientState.FAILED, "5.4.6")


@pytest_twisted.ensureDeferred
async def test_servfail_defers():
    async with serve_dns(reactor, [ZONE], servfail=["pref.example.test"]) as dns_server:
        result = await router(dns_server.resolver()).route("pref.example.test")
    assert isinstance(result, RouteFailure)
    assert (result.state, result.status) == (RecipientState.DEFERRED, "4.4.3")
    assert "SERVFAIL" in result.reason


@pytest_twisted.ensureDeferred
async def test_unreachable_dns_server_defers_after_the_timeout():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    resolver = LoopbackResolver(reactor, [("127.0.0.1", dead_port)], timeout=(0.3,))
    try:
        result = await router(resolver).route("pref.example.test")
    finally:
        await resolver.close()
    assert isinstance(result, RouteFailure)
    assert (result.state, result.status) == (RecipientState.DEFERRED, "4.4.3")
    assert "timed out" in result.reason


@pytest_twisted.ensureDeferred
async def test_closing_the_resolver_mid_query_leaves_nothing_behind():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound but never read: the query just waits
        resolver = LoopbackResolver(reactor, [silent.getsockname()], timeout=(30,))
        pending = router(resolver).route("pref.example.test")
        await resolver.close()
        result = await pending
    assert isinstance(result, RouteFailure)
    assert (result.state, result.status) == (RecipientState.DEFERRED, "4.4.3")
