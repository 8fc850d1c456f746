"""MX resolution over a Twisted IResolver: a domain's mail exchangers as ordered SMTP servers."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from twisted.internet import defer
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IResolver
from twisted.names import dns, error

from mtrkmta.delivery.interfaces import NextHop, RouteFailure, Server
from mtrkmta.tracking.interfaces import RecipientState

#: The longest CNAME chain followed before the lookup counts as failed (temporarily).
MAX_CNAME_CHAIN = 8

#: What an IResolver lookup fires with: answers, authority, additional, each a list.
#: IResolver's annotations say each is one RRHeader and the timeout is required; its
#: documentation and every Twisted resolver give lists and default the timeout.
_DNSResult = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]
_Lookup = Callable[[str], Deferred[_DNSResult]]


@dataclass(frozen=True, slots=True)
class MXAnswer:
    """What a lookup decided, and for how many seconds that may be reused (0: not at all).

    ``ttl`` is the smallest TTL of the DNS answers the result rests on (for empty
    answers and NXDOMAIN, the negative-caching TTL of RFC 2308). Temporary
    failures always have ttl 0.
    """

    result: NextHop | RouteFailure
    ttl: int


def endpoint_value(text: str) -> str:
    """Escape ``text`` for use as a value in a Twisted endpoint description (``\\`` and ``:``)."""
    return text.replace("\\", "\\\\").replace(":", "\\:")


def tcp_endpoint(address: str, port: int) -> str:
    """The client endpoint description connecting to ``address`` (IPv4 or IPv6) on ``port``.

    Twisted's ``tcp`` client endpoint takes IPv6 literals too (there is no ``tcp6``
    client type); their colons are escaped: ``tcp:host=2001\\:db8\\:\\:1:port=25``.
    """
    return f"tcp:host={endpoint_value(address)}:port={port}"


def _name(name: dns.Name | bytes | str) -> str:
    """A DNS name as text: lower case, no trailing dot; the root is ``""``."""
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
    return text.lower().removesuffix(".")


def _payload(rr: dns.RRHeader) -> object:
    """The record of ``rr``, as an object: typed IEncodableRecord, mypy-zope cannot narrow
    it to a record class."""
    return rr.payload


def _negative_ttl(authority: Sequence[dns.RRHeader]) -> int:
    """How long an empty answer or NXDOMAIN may be cached (RFC 2308 §5): 0 without an SOA."""
    ttls = [
        min(rr.ttl, soa.minimum)
        for rr in authority
        if rr.type == dns.SOA and isinstance(soa := _payload(rr), dns.Record_SOA)
    ]
    return min(ttls, default=0)


def _describe(exc: BaseException) -> str:
    """A short account of why a DNS query failed, for logs and DSNs."""
    if isinstance(exc, defer.TimeoutError | TimeoutError):
        return "timed out"
    for kind, text in (
        (error.DNSServerError, "SERVFAIL"),
        (error.DNSQueryRefusedError, "REFUSED"),
        (error.DNSFormatError, "FORMERR"),
        (error.DNSNotImplementedError, "NOTIMP"),
    ):
        if isinstance(exc, kind):
            return text
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _LookupProblem(Exception):
    """A query gave no answer: NXDOMAIN (cacheable for ``ttl``) or a temporary failure."""

    def __init__(self, reason: str, *, nxdomain: bool = False, ttl: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.nxdomain = nxdomain
        self.ttl = ttl


@dataclass(frozen=True, slots=True)
class _Answer:
    """Records of the wanted type for a name (after CNAMEs); empty means NODATA."""

    records: tuple[dns.RRHeader, ...]
    ttl: int


@dataclass(frozen=True, slots=True)
class _Addresses:
    """A host's addresses in connection order, or why it has none."""

    host: str
    addresses: tuple[str, ...]
    ttl: int
    problem: str | None = None
    temporary: bool = False
    nxdomain: bool = False


class MXResolver:
    """Turns a domain into an SMTP next hop by MX lookup (RFC 5321 §5.1, RFC 7505).

    MX hosts are taken in preference order, equal preferences in random order
    (``rng``). A domain without MX records is its own implicit MX. Each host
    becomes one Server per address, named after the host (for Remote-MTA): its
    IPv4 addresses first, then its IPv6 ones, unless ``prefer_ipv6`` (IPv4 first
    by default because many hosts have no working IPv6 route, and a black-holed
    IPv6 connection costs a full connect timeout before the fallback). Hosts
    without addresses are skipped; duplicate addresses are tried once.

    When ``hostname`` (ours) is an MX host of the domain, it and every less
    preferred host are dropped; if nothing is left, the mail would loop (5.4.6).
    """

    def __init__(
        self,
        resolver: IResolver,
        *,
        smtp_port: int = 25,
        hostname: str | None = None,
        rng: random.Random | None = None,
        prefer_ipv6: bool = False,
        max_servers: int = 10,
        max_recipients: int = 50,
    ) -> None:
        if max_servers < 1:
            raise ValueError(f"max_servers must be at least 1, got {max_servers}")
        self._resolver = resolver
        self._port = smtp_port
        self._hostname = None if hostname is None else _name(hostname)
        self._rng = rng if rng is not None else random.Random()
        self._prefer_ipv6 = prefer_ipv6
        self._max_servers = max_servers
        self._max_recipients = max_recipients

    def resolve(self, domain: str) -> Deferred[MXAnswer]:
        """The next hop for ``domain`` (or an address literal such as ``[192.0.2.1]``)."""
        return Deferred.fromCoroutine(self._resolve(_name(domain)))

    # -- the decision ---------------------------------------------------------

    async def _resolve(self, domain: str) -> MXAnswer:
        if domain.startswith("["):
            return self.literal(domain)
        try:
            mx = await self._records(dns.MX, domain)
        except _LookupProblem as problem:
            if problem.nxdomain:
                return self._failed("5.1.2", f"{domain}: no such domain (NXDOMAIN)", problem.ttl)
            return self._deferred(f"MX lookup for {domain} failed: {problem.reason}")
        if not mx.records:
            return await self._implicit_mx(domain, mx.ttl)

        exchanges = [
            (record.preference, _name(record.name))
            for rr in mx.records
            if isinstance(record := _payload(rr), dns.Record_MX)
        ]
        usable = [(preference, host) for preference, host in exchanges if host]
        if not usable:
            reason = f"{domain} does not accept mail (null MX, RFC 7505)"
            return self._failed("5.1.10", reason, mx.ttl)
        ordered = self._order(usable)
        if self._hostname is not None:
            own = [preference for preference, host in ordered if host == self._hostname]
            if own:
                ordered = [(p, host) for p, host in ordered if p < min(own)]
                if not ordered:
                    reason = f"mail for {domain} loops back to myself ({self._hostname} is its MX)"
                    return self._failed("5.4.6", reason, mx.ttl)

        found = await gatherResults(
            [Deferred.fromCoroutine(self._addresses(host)) for _, host in ordered],
            consumeErrors=True,
        )
        servers = self._servers(found)
        if not servers:
            why = "; ".join(f"{hosts.host}: {hosts.problem}" for hosts in found)
            return self._deferred(f"no MX host of {domain} has an address ({why})")
        ttl = min([mx.ttl, *(hosts.ttl for hosts in found)])
        return MXAnswer(self._next_hop(domain, servers), ttl)

    async def _implicit_mx(self, domain: str, mx_ttl: int) -> MXAnswer:
        """No MX records: the domain itself is the only MX host, with preference 0."""
        if domain == self._hostname:
            reason = f"mail for {domain} loops back to myself (no MX; it is my host name)"
            return self._failed("5.4.6", reason, mx_ttl)
        found = await self._addresses(domain)
        servers = self._servers([found])
        ttl = min(mx_ttl, found.ttl)
        if servers:
            return MXAnswer(self._next_hop(domain, servers), ttl)
        if found.temporary:
            return self._deferred(f"address lookup for {domain} failed: {found.problem}")
        if found.nxdomain:
            return self._failed("5.1.2", f"{domain}: no such domain (NXDOMAIN)", ttl)
        return self._failed("5.4.4", f"{domain} has no MX, A or AAAA records", ttl)

    def literal(self, domain: str) -> MXAnswer:
        """An address literal (RFC 5321 §4.1.3): connect to that address. No DNS involved."""
        inner = domain[1:-1] if domain.endswith("]") else ""
        address: ipaddress.IPv4Address | ipaddress.IPv6Address
        try:
            if inner.startswith("ipv6:"):
                address = ipaddress.IPv6Address(inner[5:])
            else:
                address = ipaddress.IPv4Address(inner)
        except ValueError:
            return self._failed("5.1.3", f"{domain} is not a valid address literal", 0)
        server = Server(domain, tcp_endpoint(str(address), self._port))
        return MXAnswer(self._next_hop(domain, [server]), 0)

    def _order(self, exchanges: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """By preference, shuffled within one preference; a host listed twice keeps its best."""
        shuffled = list(exchanges)
        self._rng.shuffle(shuffled)
        shuffled.sort(key=lambda exchange: exchange[0])  # stable: the shuffle survives in ties
        seen: set[str] = set()
        ordered = []
        for preference, host in shuffled:
            if host not in seen:
                seen.add(host)
                ordered.append((preference, host))
        return ordered

    def _servers(self, found: Sequence[_Addresses]) -> list[Server]:
        servers: list[Server] = []
        seen: set[str] = set()
        for hosts in found:
            for address in hosts.addresses:
                if address not in seen:
                    seen.add(address)
                    servers.append(Server(hosts.host, tcp_endpoint(address, self._port)))
        return servers[: self._max_servers]

    def _next_hop(self, domain: str, servers: Sequence[Server]) -> NextHop:
        return NextHop(
            transport="smtp",
            destination=f"mx:{domain}",
            servers=tuple(servers),
            max_recipients=self._max_recipients,
        )

    @staticmethod
    def _failed(status: str, reason: str, ttl: int) -> MXAnswer:
        return MXAnswer(RouteFailure(RecipientState.FAILED, status, reason), ttl)

    @staticmethod
    def _deferred(reason: str) -> MXAnswer:
        return MXAnswer(RouteFailure(RecipientState.DEFERRED, "4.4.3", reason), 0)

    # -- DNS ------------------------------------------------------------------

    async def _addresses(self, host: str) -> _Addresses:
        """The A and AAAA records of ``host``, looked up in parallel."""
        v4_query = Deferred.fromCoroutine(self._settled(dns.A, host))
        v6_query = Deferred.fromCoroutine(self._settled(dns.AAAA, host))
        v4, v6 = await v4_query, await v6_query
        answers = [answer for answer in (v4, v6) if isinstance(answer, _Answer)]
        problems = [answer for answer in (v4, v6) if isinstance(answer, _LookupProblem)]
        first, second = (v6, v4) if self._prefer_ipv6 else (v4, v6)
        addresses = tuple(
            address
            for answer in (first, second)
            if isinstance(answer, _Answer)
            for address in self._decode(answer)
        )
        if addresses:
            return _Addresses(host, addresses, min(answer.ttl for answer in answers))
        ttl = min([answer.ttl for answer in answers] + [p.ttl for p in problems], default=0)
        temporary = [p for p in problems if not p.nxdomain]
        if temporary:
            return _Addresses(host, (), 0, temporary[0].reason, temporary=True)
        if problems:
            return _Addresses(host, (), ttl, "no such domain (NXDOMAIN)", nxdomain=True)
        return _Addresses(host, (), ttl, "no A or AAAA records")

    @staticmethod
    def _decode(answer: _Answer) -> list[str]:
        addresses: list[str] = []
        for rr in answer.records:
            payload = _payload(rr)
            if isinstance(payload, dns.Record_A):
                addresses.append(str(ipaddress.IPv4Address(payload.address)))
            elif isinstance(payload, dns.Record_AAAA):
                addresses.append(str(ipaddress.IPv6Address(payload.address)))
        return addresses

    async def _settled(self, rtype: int, name: str) -> _Answer | _LookupProblem:
        try:
            return await self._records(rtype, name)
        except _LookupProblem as problem:
            return problem

    def _lookup_for(self, rtype: int) -> _Lookup:
        if rtype == dns.MX:
            return cast(_Lookup, self._resolver.lookupMailExchange)
        if rtype == dns.A:
            return cast(_Lookup, self._resolver.lookupAddress)
        return cast(_Lookup, self._resolver.lookupIPV6Address)

    async def _records(self, rtype: int, name: str) -> _Answer:
        """The ``rtype`` records of ``name``, following CNAMEs (re-querying their target).

        Raises _LookupProblem on NXDOMAIN, DNS errors and timeouts.
        """
        lookup = self._lookup_for(rtype)
        target = name
        ttls: list[int] = []
        hops = 0
        while True:
            try:
                answers, authority, _additional = await lookup(target)
            except error.DNSNameError as exc:
                message = exc.args[0] if exc.args else None
                negative = _negative_ttl(getattr(message, "authority", ()))
                reason = f"{target}: no such domain (NXDOMAIN)"
                raise _LookupProblem(reason, nxdomain=True, ttl=min([*ttls, negative])) from None
            except Exception as exc:
                raise _LookupProblem(_describe(exc)) from None
            queried = target
            while True:
                cname = next(
                    (rr for rr in answers if rr.type == dns.CNAME and _name(rr.name) == target),
                    None,
                )
                if cname is None:
                    break
                hops += 1
                if hops > MAX_CNAME_CHAIN:
                    raise _LookupProblem(f"CNAME chain from {name} longer than {MAX_CNAME_CHAIN}")
                ttls.append(cname.ttl)
                record = _payload(cname)
                # RRHeader checks the payload's type; a SimpleRecord's name is set in __init__.
                assert isinstance(record, dns.Record_CNAME) and record.name is not None
                target = _name(record.name)
            found = tuple(rr for rr in answers if rr.type == rtype and _name(rr.name) == target)
            if found:
                return _Answer(found, min(ttls + [rr.ttl for rr in found]))
            if target == queried:
                return _Answer((), min([*ttls, _negative_ttl(authority)]))
            # The answer ended at a CNAME whose target it did not resolve: ask for the target.
