"""A real authoritative twisted.names DNS server on loopback, and a leak-free client resolver."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IConnector, IDelayedCall, IListeningPort
from twisted.internet.task import deferLater
from twisted.names import authority, client, dns, server

Record = dns.Record_A | dns.Record_AAAA | dns.Record_MX | dns.Record_CNAME | dns.Record_TXT

#: The TTL given to records (and the SOA negative-caching TTL) unless a zone says otherwise.
DEFAULT_TTL = 300

#: How many reactor turns closing waits for sockets to go before giving up.
_MAX_TURNS = 2000


def mx(preference: int, host: str, ttl: int | None = None) -> dns.Record_MX:
    """An MX record for ``host`` with ``preference``."""
    return dns.Record_MX(preference, host.encode("ascii"), ttl=ttl)


def null_mx(ttl: int | None = None) -> dns.Record_MX:
    """The null MX of RFC 7505: ``0 .``."""
    return dns.Record_MX(0, b"", ttl=ttl)


def a(address: str, ttl: int | None = None) -> dns.Record_A:
    """An A record."""
    return dns.Record_A(address, ttl=ttl)


def aaaa(address: str, ttl: int | None = None) -> dns.Record_AAAA:
    """An AAAA record."""
    return dns.Record_AAAA(address, ttl=ttl)


def cname(target: str, ttl: int | None = None) -> dns.Record_CNAME:
    """A CNAME record pointing at ``target``."""
    return dns.Record_CNAME(target.encode("ascii"), ttl=ttl)


@dataclass(frozen=True)
class Zone:
    """A zone served authoritatively: names under ``origin`` not in ``records`` are NXDOMAIN.

    ``records`` maps absolute owner names (``"mx1.example.test"``) to their records;
    records without a TTL get ``ttl``, which is also the SOA's negative-caching TTL.
    """

    origin: str
    records: Mapping[str, Sequence[Record]]
    ttl: int = DEFAULT_TTL


@dataclass(frozen=True)
class Query:
    """One question the server was asked: name, type (``dns.MX``...) and ``udp`` or ``tcp``."""

    name: str
    type: int
    transport: str


class _ZoneAuthority(authority.FileAuthority):
    """A FileAuthority loaded from a Zone instead of a file."""

    def __init__(self, zone: Zone) -> None:
        super().__init__(zone)

    def loadFile(self, zone: Zone) -> None:
        origin = zone.origin.lower().removesuffix(".").encode("ascii")
        soa = dns.Record_SOA(
            mname=b"ns." + origin,
            rname=b"hostmaster." + origin,
            serial=1,
            refresh=zone.ttl,
            retry=zone.ttl,
            expire=zone.ttl,
            minimum=zone.ttl,
            ttl=zone.ttl,
        )
        self.soa = (origin, soa)
        self.records = {origin: [soa]}
        for owner, records in zone.records.items():
            key = owner.lower().removesuffix(".").encode("ascii")
            self.records.setdefault(key, []).extend(records)


class _ServerFactory(server.DNSServerFactory):
    """A DNSServerFactory that logs queries, answers SERVFAIL for some names and truncates."""

    def __init__(self, authorities: list[_ZoneAuthority], servfail: Collection[str]) -> None:
        super().__init__(authorities=authorities, verbose=0)
        self.servfail = {name.lower().removesuffix(".") for name in servfail}
        self.queries: list[Query] = []

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> None:
        for query in message.queries:
            transport = "tcp" if isinstance(protocol, dns.DNSProtocol) else "udp"
            self.queries.append(Query(str(query.name).lower(), query.type, transport))
        if any(str(query.name).lower() in self.servfail for query in message.queries):
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return
        super().handleQuery(message, protocol, address)

    def sendReply(self, protocol: Any, message: dns.Message, address: Any) -> None:
        """Truncate UDP replies over 512 octets (RFC 1035 §4.2.1), as Twisted does not."""
        if address is not None:
            message.maxSize = 512
        super().sendReply(protocol, message, address)


class _TrackingReactor:
    """Stands in for the reactor of one client Resolver, remembering what it opened."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.udp_ports: list[Any] = []
        self.connectors: list[IConnector] = []
        self.calls: list[IDelayedCall] = []

    def listenUDP(self, port: int, protocol: Any, *args: Any, **kw: Any) -> IListeningPort:
        listening = self._reactor.listenUDP(port, protocol, *args, **kw)
        self.udp_ports.append(listening)
        return listening

    def connectTCP(self, host: str, port: int, factory: Any, *args: Any, **kw: Any) -> IConnector:
        connector = self._reactor.connectTCP(host, port, factory, *args, **kw)
        self.connectors.append(connector)
        return connector

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kw: Any) -> IDelayedCall:
        call = self._reactor.callLater(delay, f, *args, **kw)
        self.calls.append(call)
        return call

    def seconds(self) -> float:
        return float(self._reactor.seconds())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


async def _until(reactor: Any, done: Callable[[], bool], what: str) -> None:
    """Let the reactor turn until ``done()``; fail after _MAX_TURNS turns."""
    for _ in range(_MAX_TURNS):
        if done():
            return
        await deferLater(reactor, 0.001, lambda: None)
    raise RuntimeError(f"timed out waiting for {what}")


class LoopbackResolver(client.Resolver):
    """A twisted.names client Resolver for test servers that can be closed without leaks.

    ``close()`` aborts queries still in flight (their Deferreds fail with
    CancelledError), drops TCP connections and waits until every UDP port and
    connection the resolver opened is gone.
    """

    def __init__(
        self, reactor: Any, servers: Sequence[tuple[str, int]], timeout: Sequence[float] = (2,)
    ) -> None:
        self._tracking = _TrackingReactor(reactor)
        self._real_reactor = reactor
        super().__init__(servers=list(servers), timeout=tuple(timeout), reactor=self._tracking)

    def close(self) -> Deferred[None]:
        """Stop everything this resolver opened; fires once it is all closed."""
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        tracking = self._tracking
        for port in tracking.udp_ports:
            live = dict(getattr(port.protocol, "liveMessages", None) or {})
            for result, timeout in live.values():
                if timeout.active():
                    timeout.cancel()
                result.errback(CancelledError("resolver closed"))
        for connection in list(self.connections):
            connection.transport.loseConnection()
        for connector in tracking.connectors:
            if connector.state == "connecting":
                connector.stopConnecting()
        for call in tracking.calls:
            if call.active():
                call.cancel()
        await _until(
            self._real_reactor,
            lambda: (
                not any(port.connected for port in tracking.udp_ports)
                and all(c.state == "disconnected" for c in tracking.connectors)
            ),
            "the resolver's sockets to close",
        )


@dataclass
class DNSServer:
    """A running loopback DNS server: UDP and TCP on ``127.0.0.1:port``."""

    reactor: Any
    port: int
    factory: _ServerFactory
    tcp: IListeningPort
    udp: IListeningPort
    resolvers: list[LoopbackResolver]

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def queries(self) -> list[Query]:
        """Every question asked so far, in order of arrival."""
        return self.factory.queries

    def resolver(self, timeout: Sequence[float] = (2,)) -> LoopbackResolver:
        """A client resolver querying this server only; ``stop()`` closes it."""
        resolver = LoopbackResolver(self.reactor, [self.address], timeout)
        self.resolvers.append(resolver)
        return resolver

    def stop(self) -> Deferred[None]:
        """Close the resolvers made here, the server's connections and both ports."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await gatherResults([resolver.close() for resolver in self.resolvers])
        for connection in list(self.factory.connections):
            connection.transport.loseConnection()
        await _until(
            self.reactor, lambda: not self.factory.connections, "DNS server connections to close"
        )
        await gatherResults([maybeDeferred(port.stopListening) for port in (self.tcp, self.udp)])


async def start_dns_server(
    reactor: Any, zones: Sequence[Zone], *, servfail: Collection[str] = ()
) -> DNSServer:
    """Serve ``zones`` on 127.0.0.1, one ephemeral port number for both UDP and TCP.

    Queries for a name in ``servfail`` are answered SERVFAIL; names outside every
    zone get NXDOMAIN. UDP answers over 512 octets are truncated (TC set), so the
    client retries over TCP.
    """
    factory = _ServerFactory([_ZoneAuthority(zone) for zone in zones], servfail)
    for _ in range(20):
        tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
        port = tcp.getHost().port
        try:
            udp = reactor.listenUDP(
                port, dns.DNSDatagramProtocol(factory, reactor=reactor), interface="127.0.0.1"
            )
        except CannotListenError:
            await maybeDeferred(tcp.stopListening)
            continue
        return DNSServer(reactor, port, factory, tcp, udp, [])
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


@asynccontextmanager
async def serve_dns(
    reactor: Any, zones: Sequence[Zone], *, servfail: Collection[str] = ()
) -> AsyncIterator[DNSServer]:
    """``start_dns_server`` for the duration of an ``async with`` block, then ``stop()``."""
    dns_server = await start_dns_server(reactor, zones, servfail=servfail)
    try:
        yield dns_server
    finally:
        await dns_server.stop()
