"""Router logic with a fake resolver: route selection, fixed routes, MX decisions and the cache."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IResolver
from twisted.internet.task import Clock
from twisted.names import dns, error
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtrkmta.config import DEFAULT_ROUTE, Config, Delivery, Route, select_route
from mtrkmta.delivery.interfaces import IRouter, NextHop, RouteFailure, Server
from mtrkmta.routing.router import (
    MAILDIR_HOP,
    Router,
    endpoint_host,
    split_description,
)
from mtrkmta.tracking.interfaces import RecipientState

SOA_MINIMUM = 60


@implementer(IResolver)
class FakeResolver:
    """Answers MX, A and AAAA lookups from a dict; names it does not know are NXDOMAIN.

    ``records`` maps a name to its records (``dns.Record_*``; their ``ttl`` or 300);
    ``errors`` maps ``(name, type)`` to an exception to fail that lookup with.
    """

    def __init__(self, records=None, errors=None) -> None:
        self.records = {name.lower(): list(rrs) for name, rrs in (records or {}).items()}
        self.errors = dict(errors or {})
        self.calls: list[tuple[str, int]] = []

    def _answer(self, name, rtype):
        name = name.lower()
        self.calls.append((name, rtype))
        if (name, rtype) in self.errors:
            return defer.fail(self.errors[(name, rtype)])
        if name not in self.records:
            soa = dns.RRHeader(
                "test", dns.SOA, ttl=300, payload=dns.Record_SOA(minimum=SOA_MINIMUM, ttl=300)
            )
            message = dns.Message(rCode=dns.ENAME)
            message.authority = [soa]
            return defer.fail(error.DNSNameError(message))
        answers = [
            dns.RRHeader(name, rr.TYPE, ttl=300 if rr.ttl is None else rr.ttl, payload=rr)
            for rr in self.records[name]
            if rr.TYPE in (rtype, dns.CNAME)
        ]
        authority = []
        if not answers:
            soa = dns.Record_SOA(minimum=SOA_MINIMUM, ttl=300)
            authority = [dns.RRHeader("test", dns.SOA, ttl=300, payload=soa)]
        return defer.succeed((answers, authority, []))

    def lookupMailExchange(self, name, timeout=None):
        return self._answer(name, dns.MX)

    def lookupAddress(self, name, timeout=None):
        return self._answer(name, dns.A)

    def lookupIPV6Address(self, name, timeout=None):
        return self._answer(name, dns.AAAA)


def result_of(d: Deferred):
    """The result a Deferred has already fired with (the fake resolver answers at once)."""
    results: list = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def route(router: Router, domain: str):
    return result_of(router.route(domain))


def mx_router(records=None, errors=None, **kw) -> tuple[Router, FakeResolver]:
    resolver = FakeResolver(records, errors)
    return Router((DEFAULT_ROUTE,), (), resolver, **kw), resolver


def assert_failure(result, state: RecipientState, status: str) -> RouteFailure:
    assert isinstance(result, RouteFailure), result
    assert (result.state, result.status) == (state, status), result
    return result


def hosts(hop: NextHop) -> list[str]:
    return [server.name for server in hop.servers]


# -- route selection and fixed routes ------------------------------------------

ROUTES = (
    Route("special.example.org", "smtp", "tcp:host=relay.example.net:port=587"),
    Route("local.example.org", "mx"),  # a local domain with its own route: the route wins
    Route(".example.org", "lmtp", "unix:path=/run/dovecot/lmtp"),
    Route(".deep.example.org", "smtp", "tcp:deep.example.net:25"),
    Route("archive.example.com", "maildir"),
    Route("*", "smtp", r"tcp:host=2001\:db8\:\:587:port=587"),
)
LOCAL = ("example.com", "local.example.org", "sub.example.org")


def fixed_router(**kw) -> tuple[Router, FakeResolver]:
    resolver = FakeResolver()
    return Router(ROUTES, LOCAL, resolver, hostname="mail.example.com", **kw), resolver


def test_router_provides_irouter():
    router, _ = fixed_router()
    assert verifyObject(IRouter, router)


def test_local_domains_go_to_maildir_without_dns():
    router, resolver = fixed_router()
    assert route(router, "example.com") == NextHop("maildir", "maildir", ())
    assert route(router, "Example.COM.") is MAILDIR_HOP
    assert route(router, "sub.example.org") == MAILDIR_HOP  # local beats the .example.org route
    assert resolver.calls == []


def test_maildir_route_for_a_non_local_domain():
    router, _ = fixed_router()
    assert route(router, "archive.example.com") == MAILDIR_HOP


def test_own_route_beats_local_domain():
    router, resolver = fixed_router()
    resolver.records["local.example.org"] = [dns.Record_A("192.0.2.9")]
    hop = route(router, "local.example.org")
    assert hop.destination == "mx:local.example.org"
    assert hop.servers == (Server("local.example.org", "tcp:host=192.0.2.9:port=25"),)


def test_lmtp_route_over_a_unix_socket_is_named_after_our_host():
    router, _ = fixed_router()
    endpoint = "unix:path=/run/dovecot/lmtp"
    assert route(router, "lists.example.org") == NextHop(
        transport="lmtp",
        destination=f"route:lmtp:{endpoint}",
        servers=(Server("mail.example.com", endpoint),),
        max_recipients=50,
    )
    anonymous = Router(ROUTES, LOCAL, FakeResolver(), lmtp_max_recipients=7)
    hop = route(anonymous, "lists.example.org")
    assert hop.servers == (Server("localhost", endpoint),)
    assert hop.max_recipients == 7


def test_nearest_parent_route_wins():
    router, _ = fixed_router()
    hop = route(router, "a.b.deep.example.org")
    assert hop == NextHop(
        transport="smtp",
        destination="route:smtp:tcp:deep.example.net:25",
        servers=(Server("deep.example.net", "tcp:deep.example.net:25"),),
    )
    assert route(router, "deep.example.org").transport == "lmtp"  # .deep covers subdomains only


def test_parent_pattern_does_not_cover_the_domain_itself():
    router, _ = fixed_router()
    hop = route(router, "example.org")
    assert hop.destination == r"route:smtp:tcp:host=2001\:db8\:\:587:port=587"


def test_smtp_route_names_its_host():
    router, _ = fixed_router(smtp_max_recipients=20)
    assert route(router, "special.example.org") == NextHop(
        transport="smtp",
        destination="route:smtp:tcp:host=relay.example.net:port=587",
        servers=(Server("relay.example.net", "tcp:host=relay.example.net:port=587"),),
        max_recipients=20,
    )


def test_default_route_relays_and_unescapes_an_ipv6_host():
    router, resolver = fixed_router()
    hop = route(router, "elsewhere.example.net")
    assert hop.servers == (Server("2001:db8::587", r"tcp:host=2001\:db8\:\:587:port=587"),)
    assert resolver.calls == []


def test_a_fixed_routes_next_hop_is_built_once():
    # Every delivery asks the router; a configured route's hop is the same each time.
    router, _ = fixed_router()
    first = route(router, "one.example.net")
    assert route(router, "two.example.net") is first
    assert route(router, "special.example.org") is route(router, "special.example.org")
    assert route(router, "special.example.org") != first


def test_without_a_star_route_the_default_is_mx():
    resolver = FakeResolver({"example.net": [dns.Record_A("192.0.2.7")]})
    router = Router((), (), resolver)
    assert route(router, "example.net").destination == "mx:example.net"


def test_a_fixed_route_needs_an_endpoint():
    with pytest.raises(ValueError, match="no endpoint"):
        Router((Route("example.org", "lmtp"),), (), FakeResolver())


def test_empty_domain_is_refused():
    router, _ = fixed_router()
    assert_failure(route(router, ""), RecipientState.FAILED, "5.1.3")


def test_from_config():
    config = Config(
        hostname="mx.example.com",
        data_dir=Path("/nonexistent"),
        database="sqlite://",
        node_id="n1",
        local_domains=("example.com",),
        routes=(Route(".example.org", "lmtp", "unix:path=/run/lmtp"), DEFAULT_ROUTE),
    )
    router = Router.from_config(config, FakeResolver())
    assert route(router, "example.com") == MAILDIR_HOP
    assert route(router, "x.example.org").servers == (
        Server("mx.example.com", "unix:path=/run/lmtp"),
    )


@pytest.mark.parametrize(
    ("description", "host"),
    [
        ("tcp:host=127.0.0.1:port=24", "127.0.0.1"),
        ("tcp:127.0.0.1:24", "127.0.0.1"),
        ("tcp:port=24:host=lmtp.example.org", "lmtp.example.org"),
        (r"tcp:host=\:\:1:port=24", "::1"),
        ("tls:relay.example.net:465", "relay.example.net"),
        ("unix:path=/run/dovecot/lmtp", "me.example.com"),
        ("unix:/run/dovecot/lmtp", "me.example.com"),
    ],
)
def test_endpoint_host(description, host):
    assert endpoint_host(description, "me.example.com") == host


def test_split_description_handles_escapes():
    assert split_description(r"tcp:host=a\:b\\c:port=1:positional") == (
        ["tcp", "positional"],
        {"host": "a:b\\c", "port": "1"},
    )


_label = st.sampled_from(["a", "b", "c", "example", "org"])
_domain = st.lists(_label, min_size=1, max_size=4).map(".".join)
_pattern = st.one_of(_domain, _domain.map(lambda d: "." + d))


@given(
    patterns=st.lists(_pattern, max_size=6, unique=True),
    local=st.lists(_domain, max_size=4, unique=True),
    domain=_domain,
)
def test_select_route_picks_the_most_specific_rule(patterns, local, domain):
    routes = tuple(
        Route(p, "smtp", f"tcp:host={i}.invalid:port=25") for i, p in enumerate(patterns)
    )
    chosen = select_route((*routes, DEFAULT_ROUTE), local, domain)
    if domain in patterns:
        assert chosen.domain == domain  # an exact route wins over everything
    elif domain in local:
        assert chosen == Route(domain, "maildir")
    else:
        parents = [p for p in patterns if p.startswith(".") and domain.endswith(p)]
        if parents:
            assert chosen.domain == max(parents, key=len)  # the nearest parent
        else:
            assert chosen == DEFAULT_ROUTE


# -- MX decisions ----------------------------------------------------------------


def test_mx_order_and_servers_per_address():
    router, _ = mx_router(
        {
            "example.org": [dns.Record_MX(20, "backup.example.org"), dns.Record_MX(10, "mx")],
            "mx": [dns.Record_AAAA("2001:db8::1"), dns.Record_A("192.0.2.1")],
            "backup.example.org": [dns.Record_A("192.0.2.2"), dns.Record_A("192.0.2.3")],
        },
        smtp_port=2525,
    )
    assert route(router, "example.org") == NextHop(
        transport="smtp",
        destination="mx:example.org",
        servers=(
            Server("mx", "tcp:host=192.0.2.1:port=2525"),
            Server("mx", r"tcp:host=2001\:db8\:\:1:port=2525"),
            Server("backup.example.org", "tcp:host=192.0.2.2:port=2525"),
            Server("backup.example.org", "tcp:host=192.0.2.3:port=2525"),
        ),
    )


@given(
    preferences=st.lists(st.integers(0, 3), min_size=1, max_size=8),
    seed=st.integers(0, 2**32),
)
def test_mx_hosts_come_in_preference_order(preferences, seed):
    records = {"example.org": [dns.Record_MX(p, f"h{i}") for i, p in enumerate(preferences)]}
    records.update({f"h{i}": [dns.Record_A(f"192.0.2.{i + 1}")] for i in range(len(preferences))})
    router, _ = mx_router(records, rng=random.Random(seed))
    order = [int(name[1:]) for name in hosts(route(router, "example.org"))]
    assert sorted(order) == list(range(len(preferences)))
    assert [preferences[i] for i in order] == sorted(preferences)


def test_equal_preferences_follow_the_injected_random_source():
    records = {"example.org": [dns.Record_MX(10, f"h{i}") for i in range(5)]}
    records.update({f"h{i}": [dns.Record_A(f"192.0.2.{i + 1}")] for i in range(5)})
    first, _ = mx_router(records, rng=random.Random(7))
    second, _ = mx_router(records, rng=random.Random(7))
    orders = [hosts(route(first, "example.org")) for _ in range(10)]
    assert orders == [hosts(route(second, "example.org")) for _ in range(10)]
    assert len({tuple(order) for order in orders}) > 1


def test_duplicate_hosts_and_addresses_are_tried_once():
    router, _ = mx_router(
        {
            "example.org": [
                dns.Record_MX(10, "a.example.org"),
                dns.Record_MX(20, "a.example.org"),
                dns.Record_MX(30, "b.example.org"),
            ],
            "a.example.org": [dns.Record_A("192.0.2.1")],
            "b.example.org": [dns.Record_A("192.0.2.1"), dns.Record_A("192.0.2.2")],
        }
    )
    assert route(router, "example.org").servers == (
        Server("a.example.org", "tcp:host=192.0.2.1:port=25"),
        Server("b.example.org", "tcp:host=192.0.2.2:port=25"),
    )


def test_server_list_is_capped():
    records = {"example.org": [dns.Record_MX(i, f"h{i}") for i in range(6)]}
    records.update({f"h{i}": [dns.Record_A(f"192.0.2.{i + 1}")] for i in range(6)})
    router, _ = mx_router(records, max_mx_servers=4)
    assert hosts(route(router, "example.org")) == ["h0", "h1", "h2", "h3"]


@pytest.mark.parametrize("preference", [0, 10])
def test_null_mx_fails_without_further_lookups(preference):
    router, resolver = mx_router(
        {"example.org": [dns.Record_MX(preference, b""), dns.Record_A("192.0.2.1")]}
    )
    failure = assert_failure(route(router, "example.org"), RecipientState.FAILED, "5.1.10")
    assert "null MX" in failure.reason
    assert resolver.calls == [("example.org", dns.MX)]


def test_a_root_mx_beside_real_ones_is_ignored():
    router, _ = mx_router(
        {
            "example.org": [dns.Record_MX(0, b""), dns.Record_MX(10, "mx.example.org")],
            "mx.example.org": [dns.Record_A("192.0.2.1")],
        }
    )
    assert hosts(route(router, "example.org")) == ["mx.example.org"]


def test_nxdomain_fails_with_bad_destination_system():
    router, _ = mx_router({})
    failure = assert_failure(route(router, "nowhere.test"), RecipientState.FAILED, "5.1.2")
    assert "nowhere.test" in failure.reason


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (error.DNSQueryTimeoutError(1), "timed out"),
        (defer.TimeoutError(), "timed out"),
        (error.DNSServerError(), "SERVFAIL"),
        (error.DNSQueryRefusedError(), "REFUSED"),
        (OSError("network unreachable"), "network unreachable"),
    ],
)
def test_dns_trouble_defers(exc, words):
    router, _ = mx_router({}, {("example.org", dns.MX): exc})
    failure = assert_failure(route(router, "example.org"), RecipientState.DEFERRED, "4.4.3")
    assert words in failure.reason


def test_implicit_mx_uses_the_domains_addresses_ipv4_first():
    records = {"example.org": [dns.Record_AAAA("2001:db8::5"), dns.Record_A("192.0.2.5")]}
    router, _ = mx_router(records)
    assert route(router, "example.org").servers == (
        Server("example.org", "tcp:host=192.0.2.5:port=25"),
        Server("example.org", r"tcp:host=2001\:db8\:\:5:port=25"),
    )
    v6_router, _ = mx_router(records, prefer_ipv6=True)
    assert [s.endpoint for s in route(v6_router, "example.org").servers] == [
        r"tcp:host=2001\:db8\:\:5:port=25",
        "tcp:host=192.0.2.5:port=25",
    ]


def test_implicit_mx_without_addresses_cannot_be_routed():
    router, _ = mx_router({"example.org": [dns.Record_TXT(b"v=spf1 -all")]})
    assert_failure(route(router, "example.org"), RecipientState.FAILED, "5.4.4")


def test_implicit_mx_address_trouble_defers_unless_the_other_family_answers():
    timeout = error.DNSQueryTimeoutError(1)
    records = {"example.org": [dns.Record_A("192.0.2.5")]}
    router, _ = mx_router(records, {("example.org", dns.AAAA): timeout})
    assert hosts(route(router, "example.org")) == ["example.org"]
    router, _ = mx_router(records, {("example.org", dns.A): timeout})
    assert_failure(route(router, "example.org"), RecipientState.DEFERRED, "4.4.3")


def test_mx_host_with_address_trouble_is_skipped():
    router, _ = mx_router(
        {
            "example.org": [dns.Record_MX(10, "bad.example.org"), dns.Record_MX(20, "good")],
            "bad.example.org": [dns.Record_A("192.0.2.1")],
            "good": [dns.Record_A("192.0.2.2")],
        },
        {
            ("bad.example.org", dns.A): error.DNSServerError(),
            ("bad.example.org", dns.AAAA): error.DNSServerError(),
        },
    )
    assert hosts(route(router, "example.org")) == ["good"]


def test_no_mx_host_with_an_address_defers():
    router, _ = mx_router(
        {"example.org": [dns.Record_MX(10, "gone.example.org"), dns.Record_MX(20, "empty")]}
        | {"empty": [dns.Record_TXT(b"nothing")]}
    )
    failure = assert_failure(route(router, "example.org"), RecipientState.DEFERRED, "4.4.3")
    assert "gone.example.org" in failure.reason and "empty" in failure.reason


def test_our_own_mx_and_worse_ones_are_dropped():
    records = {
        "example.org": [
            dns.Record_MX(10, "primary"),
            dns.Record_MX(20, "me.example.com"),
            dns.Record_MX(20, "peer"),
            dns.Record_MX(30, "worse"),
        ],
        "primary": [dns.Record_A("192.0.2.1")],
        "me.example.com": [dns.Record_A("192.0.2.2")],
        "peer": [dns.Record_A("192.0.2.3")],
        "worse": [dns.Record_A("192.0.2.4")],
    }
    router, _ = mx_router(records, hostname="me.example.com.")
    assert hosts(route(router, "example.org")) == ["primary"]


def test_being_the_best_mx_is_a_mail_loop():
    records = {
        "example.org": [dns.Record_MX(10, "ME.example.com"), dns.Record_MX(20, "backup")],
        "backup": [dns.Record_A("192.0.2.1")],
    }
    router, resolver = mx_router(records, hostname="me.example.com")
    assert_failure(route(router, "example.org"), RecipientState.FAILED, "5.4.6")
    assert resolver.calls == [("example.org", dns.MX)]
    implicit, _ = mx_router(
        {"me.example.com": [dns.Record_A("192.0.2.2")]}, hostname="me.example.com"
    )
    assert_failure(route(implicit, "me.example.com"), RecipientState.FAILED, "5.4.6")


def test_cname_is_followed_and_requeried():
    router, resolver = mx_router(
        {
            "example.org": [dns.Record_CNAME("mail.example.net")],
            "mail.example.net": [dns.Record_MX(10, "mx.example.net")],
            "mx.example.net": [dns.Record_CNAME("host.example.net")],
            "host.example.net": [dns.Record_A("192.0.2.8")],
        }
    )
    hop = route(router, "example.org")
    assert hop.destination == "mx:example.org"
    assert hop.servers == (Server("mx.example.net", "tcp:host=192.0.2.8:port=25"),)
    assert ("mail.example.net", dns.MX) in resolver.calls


def test_cname_loop_defers():
    router, _ = mx_router(
        {"example.org": [dns.Record_CNAME("b.test")], "b.test": [dns.Record_CNAME("example.org")]}
    )
    failure = assert_failure(route(router, "example.org"), RecipientState.DEFERRED, "4.4.3")
    assert "CNAME" in failure.reason


@pytest.mark.parametrize(
    ("literal", "endpoint"),
    [
        ("[192.0.2.1]", "tcp:host=192.0.2.1:port=25"),
        ("[IPv6:2001:DB8::1]", r"tcp:host=2001\:db8\:\:1:port=25"),
    ],
)
def test_address_literals_connect_directly(literal, endpoint):
    router, resolver = mx_router({})
    hop = route(router, literal)
    assert hop.destination == f"mx:{literal.lower()}"
    assert hop.servers == (Server(literal.lower(), endpoint),)
    assert resolver.calls == []


@pytest.mark.parametrize("literal", ["[300.1.1.1]", "[IPv6:192.0.2.1]", "[2001:db8::1]", "[x"])
def test_bad_address_literals_fail(literal):
    router, _ = mx_router({})
    assert_failure(route(router, literal), RecipientState.FAILED, "5.1.3")


# -- the cache ---------------------------------------------------------------------

CACHED = {
    "example.org": [dns.Record_MX(10, "mx.example.org", ttl=600)],
    "mx.example.org": [dns.Record_A("192.0.2.1", ttl=30)],
}


def test_results_are_cached_for_the_smallest_ttl():
    clock = Clock()
    router, resolver = mx_router(CACHED, clock=clock)
    first = route(router, "example.org")
    asked = len(resolver.calls)
    clock.advance(29)
    assert route(router, "example.org") == first
    assert len(resolver.calls) == asked
    clock.advance(1)
    assert route(router, "example.org") == first
    assert len(resolver.calls) == 2 * asked


def test_without_a_clock_nothing_is_cached():
    router, resolver = mx_router(CACHED)
    route(router, "example.org")
    asked = len(resolver.calls)
    route(router, "example.org")
    assert len(resolver.calls) == 2 * asked


def test_cache_ttl_is_capped():
    records = {
        "example.org": [dns.Record_MX(10, "mx.example.org", ttl=86400)],
        "mx.example.org": [dns.Record_A("192.0.2.1", ttl=86400)],
    }
    clock = Clock()
    router, resolver = mx_router(records, clock=clock, max_cache_ttl=100)
    route(router, "example.org")
    asked = len(resolver.calls)
    clock.advance(100)
    route(router, "example.org")
    assert len(resolver.calls) == 2 * asked


def test_negative_answers_are_cached_for_the_soa_minimum():
    clock = Clock()
    router, resolver = mx_router({}, clock=clock)
    assert_failure(route(router, "nowhere.test"), RecipientState.FAILED, "5.1.2")
    clock.advance(SOA_MINIMUM - 1)
    assert_failure(route(router, "nowhere.test"), RecipientState.FAILED, "5.1.2")
    assert len(resolver.calls) == 1
    clock.advance(1)
    route(router, "nowhere.test")
    assert len(resolver.calls) == 2


def test_temporary_failures_are_not_cached():
    clock = Clock()
    resolver_errors = {("example.org", dns.MX): error.DNSServerError()}
    router, resolver = mx_router(CACHED, resolver_errors, clock=clock)
    assert_failure(route(router, "example.org"), RecipientState.DEFERRED, "4.4.3")
    del resolver.errors[("example.org", dns.MX)]
    assert hosts(route(router, "example.org")) == ["mx.example.org"]


def test_cache_is_bounded_and_drops_the_least_recently_used():
    records = {f"d{i}.test": [dns.Record_A(f"192.0.2.{i + 1}")] for i in range(3)}
    clock = Clock()
    router, resolver = mx_router(records, clock=clock, cache_size=2)
    for name in ("d0.test", "d1.test", "d0.test", "d2.test"):  # d1 is least recently used
        route(router, name)
    resolver.calls.clear()
    route(router, "d0.test")
    route(router, "d2.test")
    assert resolver.calls == []
    route(router, "d1.test")
    assert {name for name, _ in resolver.calls} == {"d1.test"}


def test_tls_policy_from_route_or_delivery_default():
    # Issue 4: STARTTLS policy per route (none | may | encrypt), else delivery.tls.
    records = {
        "plain.example": [dns.Record_MX(10, "mx.plain.example")],
        "mx.plain.example": [dns.Record_A("192.0.2.10")],
        "strict.example": [dns.Record_MX(10, "mx.strict.example")],
        "mx.strict.example": [dns.Record_A("192.0.2.11")],
    }
    routes = (
        Route("fixed.example", "smtp", "tcp:host=192.0.2.1:port=25", tls="none"),
        Route("strict.example", "mx", None, tls="encrypt"),
        DEFAULT_ROUTE,
    )
    router = Router(routes, (), FakeResolver(records), tls="may")
    assert route(router, "fixed.example").tls == "none"
    assert route(router, "strict.example").tls == "encrypt"
    assert route(router, "plain.example").tls == "may"


def test_from_config_takes_delivery_settings():
    config = Config(
        hostname="mx.example.com",
        data_dir=Path("/nonexistent"),
        database="sqlite://",
        node_id="n1",
        routes=(Route("lmtp.example", "lmtp", "tcp:host=127.0.0.1:port=24"), DEFAULT_ROUTE),
        delivery=Delivery(smtp_port=2525, tls="encrypt", max_recipients=7),
    )
    records = {"far.example": [dns.Record_A("192.0.2.20")]}
    router = Router.from_config(config, FakeResolver(records))
    hop = route(router, "far.example")
    assert hop.servers[0].endpoint == "tcp:host=192.0.2.20:port=2525"
    assert (hop.tls, hop.max_recipients) == ("encrypt", 7)
    assert route(router, "lmtp.example").max_recipients == 7


# -- what is known without DNS: the receiver refuses at RCPT what will fail ------------------


def test_known_decisions_need_no_dns():
    clock = Clock()
    resolver = FakeResolver({"null.test": [dns.Record_MX(0, "")]})
    router = Router(ROUTES, LOCAL, resolver, clock=clock)
    assert_failure(router.known(""), RecipientState.FAILED, "5.1.3")
    assert router.known("Example.COM.") == MAILDIR_HOP
    assert router.known("a.example.org").destination == "route:lmtp:unix:path=/run/dovecot/lmtp"
    other = Router((Route("*", "mx"),), (), resolver, clock=clock)
    assert other.known("[192.0.2.1]").servers == (
        Server("[192.0.2.1]", "tcp:host=192.0.2.1:port=25"),
    )
    assert_failure(other.known("[x-tag:foo]"), RecipientState.FAILED, "5.1.3")
    # An MX decision is known once looked up, for as long as it is cached.
    assert other.known("null.test") is None and other.known("nowhere.test") is None
    assert resolver.calls == []
    route(other, "null.test")
    route(other, "nowhere.test")
    assert_failure(other.known("null.test"), RecipientState.FAILED, "5.1.10")
    assert_failure(other.known("nowhere.test"), RecipientState.FAILED, "5.1.2")
    clock.advance(SOA_MINIMUM)
    assert other.known("nowhere.test") is None


def test_route_is_what_known_says_when_it_knows():
    router, resolver = mx_router({}, clock=Clock())
    for domain in ("", "[192.0.2.1]", "[tag:x]"):
        assert route(router, domain) == router.known(domain)
    assert resolver.calls == []
