"""The router under MTA-STS (RFC 8461 §5): which routes a policy touches and how."""

from __future__ import annotations

from pathlib import Path

from test_routing_router import FakeResolver, hosts, route
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.names import dns
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtrkmta.config import DEFAULT_ROUTE, CAFile, Route
from mtrkmta.delivery.interfaces import NextHop, RouteFailure
from mtrkmta.routing.mtasts import IPolicySource, Policy
from mtrkmta.routing.router import Router
from mtrkmta.tracking.interfaces import RecipientState

CA = CAFile(Path("ca.pem"), b"-----BEGIN CERTIFICATE-----")
RECORDS = {
    "example.org": [dns.Record_MX(10, "mx1.example.org"), dns.Record_MX(20, "backup.example.net")],
    "mx1.example.org": [dns.Record_A("192.0.2.1")],
    "backup.example.net": [dns.Record_A("192.0.2.2")],
}


@implementer(IPolicySource)
class Policies:
    """Policies by domain from a dict (the router's seam; the fetcher is tested over HTTPS)."""

    def __init__(self, policies: dict[str, Policy], ca: CAFile | None = CA) -> None:
        self.policies = policies
        self.ca = ca
        self.asked: list[str] = []

    def policy(self, domain: str):
        self.asked.append(domain)
        return succeed(self.policies.get(domain))


def sts_router(policies: Policies, routes=(DEFAULT_ROUTE,), **kw) -> Router:
    return Router(routes, (), FakeResolver(RECORDS), mta_sts=policies, **kw)


def test_policies_provides_the_interface():
    verifyObject(IPolicySource, Policies({}))


def test_enforce_keeps_policy_mx_hosts_and_verifies_them():
    policies = Policies({"example.org": Policy("enforce", 60, ("*.example.org",))})
    hop = route(sts_router(policies), "example.org")
    assert isinstance(hop, NextHop)
    assert hosts(hop) == ["mx1.example.org"]
    assert (hop.tls, hop.ca) == ("verify", CA)


def test_enforce_without_a_policy_mx_defers():
    policies = Policies({"example.org": Policy("enforce", 60, ("mail.example.com",))})
    result = route(sts_router(policies), "example.org")
    assert isinstance(result, RouteFailure)
    assert (result.state, result.status) == (RecipientState.DEFERRED, "4.7.0")
    assert "no MX host of example.org is in its MTA-STS policy" in result.reason


def test_testing_and_no_policy_route_as_before():
    for policies in (
        Policies({"example.org": Policy("testing", 60, ("mail.example.com",))}),
        Policies({}),
    ):
        hop = route(sts_router(policies), "example.org")
        assert isinstance(hop, NextHop)
        assert hosts(hop) == ["mx1.example.org", "backup.example.net"]
        assert (hop.tls, hop.ca) == ("may", None)


def test_routes_with_tls_or_a_fixed_next_hop_are_not_affected():
    policies = Policies({"example.org": Policy("enforce", 60, ("mail.example.com",))})
    routes = (Route("example.org", "mx", None, tls="encrypt"),)
    hop = route(sts_router(policies, routes), "example.org")
    assert isinstance(hop, NextHop) and hop.tls == "encrypt"
    fixed = (Route("example.org", "smtp", "tcp:host=192.0.2.9:port=25"),)
    hop = route(sts_router(policies, fixed), "example.org")
    assert isinstance(hop, NextHop) and hop.tls == "may"
    assert route(sts_router(policies), "[192.0.2.7]").tls == "may"
    assert policies.asked == []


def test_a_cached_mx_result_still_gets_the_policy():
    policies = Policies({"example.org": Policy("enforce", 60, ("mx1.example.org",))})
    router = sts_router(policies, clock=Clock())
    first = route(router, "example.org")
    assert router.known("example.org") is not None  # the MX answer is cached
    second = route(router, "example.org")
    assert first == second and hosts(second) == ["mx1.example.org"]
    assert second.tls == "verify"
    assert policies.asked == ["example.org", "example.org"]
