"""Relay policy: which recipients a client may give us (no open relay, ever)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from mtrkmta.address import recipient_domain
from mtrkmta.delivery.interfaces import NextHop, RouteFailure
from mtrkmta.smtp.reply import Reply
from mtrkmta.tracking.interfaces import RecipientState

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RELAY_DENIED = Reply(554, "5.7.1", ("Relay access denied",))
NO_DOMAIN = Reply(
    553, "5.1.3", ("Recipient address needs a domain (only <postmaster> may lack one)",)
)


def domain_matches(domain: str, pattern: str) -> bool:
    """``example.org`` matches itself; ``.example.org`` matches its subdomains only."""
    if pattern.startswith("."):
        return domain.endswith(pattern)
    return domain == pattern


@dataclass(frozen=True)
class RelayPolicy:
    """Decides whether a recipient is acceptable from a given client.

    Mail for our local domains and for domains with an explicit route is accepted
    from anyone. Anything else is relaying, allowed only for authenticated clients
    and clients in ``trusted_networks`` — empty by default, not even loopback.
    """

    local_domains: frozenset[str]
    routed_domains: frozenset[str]
    trusted_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def build(
        cls,
        local_domains: Iterable[str],
        routed_domains: Iterable[str],
        trusted_networks: Iterable[IPNetwork] = (),
    ) -> RelayPolicy:
        return cls(
            frozenset(d.lower() for d in local_domains),
            frozenset(d.lower() for d in routed_domains if d != "*"),
            tuple(trusted_networks),
        )

    def is_local(self, domain: str) -> bool:
        return domain == "" or domain in self.local_domains

    def accepts_domain(self, domain: str) -> bool:
        """True when mail for ``domain`` is ours to take from anyone."""
        return self.is_local(domain) or any(
            domain_matches(domain, pattern) for pattern in self.routed_domains
        )

    def is_trusted(self, client_address: str) -> bool:
        try:
            ip = ipaddress.ip_address(client_address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.trusted_networks)

    def check(self, address: str, *, client_address: str, authenticated: bool) -> Reply | None:
        """None when the recipient may be accepted, else the refusal to send."""
        if self.accepts_domain(recipient_domain(address)):
            return None
        if authenticated or self.is_trusted(client_address):
            return None
        return RELAY_DENIED


def route_refusal(address: str, route: NextHop | RouteFailure | None) -> Reply | None:
    """The RCPT refusal for a recipient the router already knows will fail, else None.

    A recipient accepted and then failed would cost a bounce to a sender who may be
    forged (the message itself relayed to a third party with ``RET=FULL``), so what
    is known to fail is refused at RCPT instead. Only permanent failures: a temporary
    one (DNS trouble) is accepted and retried by the queue. The reply code: 553 for
    an address that cannot be routed (5.1.3), 556 for a domain that takes no mail
    (5.1.10, RFC 7504 §3), 550 otherwise.
    """
    if not isinstance(route, RouteFailure) or route.state is not RecipientState.FAILED:
        return None
    code = {"5.1.3": 553, "5.1.10": 556}.get(route.status, 550)
    return Reply(code, route.status, (f"<{address}>: Recipient address rejected: {route.reason}",))
