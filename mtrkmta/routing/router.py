"""The router: picks the next hop for a recipient domain from the configured routes and DNS."""

from __future__ import annotations

import dataclasses
import random
from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.logger import Logger
from zope.interface import implementer

from mtrkmta.config import CAFile, Config, Route, select_route
from mtrkmta.delivery.interfaces import IRouter, NextHop, RouteFailure, Server
from mtrkmta.routing.mtasts import IPolicySource, Policy, apply_policy
from mtrkmta.routing.mtastsfetch import PolicyFetcher, PolicyFile
from mtrkmta.routing.mx import MXAnswer, MXResolver
from mtrkmta.smtp.client import TLSPolicy
from mtrkmta.tracking.interfaces import RecipientState

log = Logger()

POLICY_FILE = "mta-sts.json"
"""The MTA-STS policy cache, in the data directory."""

MAILDIR_HOP = NextHop(transport="maildir", destination="maildir", servers=())
"""Where mail for local domains (and ``maildir`` routes) goes."""


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """Split a Twisted endpoint description into positional and keyword arguments.

    Arguments are separated by unescaped colons; a backslash escapes the next
    character. The first positional argument is the endpoint type.
    """
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for part in parts:
        key, equals, value = part.partition("=")
        if equals and args:
            kwargs[key] = value
        else:
            args.append(part)
    return args, kwargs


def endpoint_host(description: str, local_name: str) -> str:
    """The host a client endpoint description connects to; ``local_name`` for a Unix socket."""
    args, kwargs = split_description(description)
    if "host" in kwargs:
        return kwargs["host"]
    if args and args[0].lower() != "unix" and len(args) > 1 and args[1]:
        return args[1]
    return local_name


def _with_tls(
    result: NextHop | RouteFailure, tls: TLSPolicy, route: Route | None = None
) -> NextHop | RouteFailure:
    """``result`` with the TLS policy, and the route's CA file and credentials."""
    if not isinstance(result, NextHop):
        return result
    ca, auth = (route.ca, route.auth) if route is not None else (None, None)
    return dataclasses.replace(result, tls=tls, ca=ca, auth=auth)


class _ResultCache:
    """Recent MX results by domain, each kept no longer than its DNS TTL; least recent go first."""

    def __init__(self, clock: IReactorTime, size: int, max_ttl: float) -> None:
        self._clock = clock
        self._size = size
        self._max_ttl = max_ttl
        self._entries: OrderedDict[str, tuple[float, NextHop | RouteFailure]] = OrderedDict()

    def get(self, domain: str) -> NextHop | RouteFailure | None:
        entry = self._entries.get(domain)
        if entry is None:
            return None
        expires, result = entry
        if self._clock.seconds() >= expires:
            del self._entries[domain]
            return None
        self._entries.move_to_end(domain)
        return result

    def put(self, domain: str, resolution: MXAnswer) -> None:
        if resolution.ttl <= 0 or self._size <= 0:
            return
        lifetime = min(float(resolution.ttl), self._max_ttl)
        self._entries[domain] = (self._clock.seconds() + lifetime, resolution.result)
        self._entries.move_to_end(domain)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@implementer(IRouter)
class Router:
    """Decides where mail for a domain goes (IRouter).

    Local domains and ``maildir`` routes go to the Maildir transport; ``lmtp:`` and
    ``smtp:`` routes to their fixed endpoint; ``mx`` routes through MX resolution
    (see :class:`mtrkmta.routing.mx.MXResolver`). ``hostname`` is ours: it names
    Unix-socket servers and lets MX resolution refuse to send mail to ourselves.

    With a ``clock``, MX results (not temporary failures) are cached for their DNS
    TTL, at most ``max_cache_ttl`` seconds, for up to ``cache_size`` domains.

    With ``mta_sts`` (an IPolicySource), an ``mx`` route without its own ``tls``
    follows the domain's MTA-STS policy (RFC 8461 §5, see
    :func:`mtrkmta.routing.mtasts.apply_policy`); fixed routes and routes with ``tls``
    set are not affected.
    """

    def __init__(
        self,
        routes: Sequence[Route],
        local_domains: Collection[str],
        resolver: IResolver,
        *,
        hostname: str | None = None,
        smtp_port: int = 25,
        smtp_max_recipients: int = 50,
        lmtp_max_recipients: int = 50,
        tls: TLSPolicy = "may",
        rng: random.Random | None = None,
        prefer_ipv6: bool = False,
        max_mx_servers: int = 10,
        clock: IReactorTime | None = None,
        cache_size: int = 1000,
        max_cache_ttl: float = 3600.0,
        mta_sts: IPolicySource | None = None,
    ) -> None:
        for route in routes:
            if route.transport in ("lmtp", "smtp") and not route.endpoint:
                raise ValueError(f"route for {route.domain!r} ({route.transport}) has no endpoint")
        self._routes = tuple(routes)
        self._local_domains = frozenset(d.lower().removesuffix(".") for d in local_domains)
        self._hostname = hostname
        self._smtp_max_recipients = smtp_max_recipients
        self._lmtp_max_recipients = lmtp_max_recipients
        self._tls = tls
        self._mx = MXResolver(
            resolver,
            smtp_port=smtp_port,
            hostname=hostname,
            rng=rng,
            prefer_ipv6=prefer_ipv6,
            max_servers=max_mx_servers,
            max_recipients=smtp_max_recipients,
        )
        self._cache = None if clock is None else _ResultCache(clock, cache_size, max_cache_ttl)
        self._sts = mta_sts
        # Fixed routes' next hops, built once each: a configured route never changes.
        self._fixed: dict[tuple[object, ...], NextHop] = {}

    @classmethod
    def from_config(
        cls,
        config: Config,
        resolver: IResolver,
        *,
        clock: IReactorTime | None = None,
        rng: random.Random | None = None,
        reactor: Any = None,
        threadpool: Any = None,
    ) -> Router:
        """A router for ``config``'s routes and local domains, naming itself ``config.hostname``.

        ``config.delivery`` gives the MX port, the default TLS policy and the
        recipients per transaction, and whether MTA-STS applies (``delivery.mta_sts``; its
        policies are fetched over ``reactor``, so without one MTA-STS is off; with a
        ``threadpool`` the policy cache is kept in ``mta-sts.json`` in the data directory).
        """
        delivery = config.delivery
        sts: PolicyFetcher | None = None
        if delivery.mta_sts and reactor is not None:
            sts = PolicyFetcher(
                reactor,
                resolver,
                clock=clock,
                cache_size=delivery.mta_sts_cache_size,
                timeout=delivery.mta_sts_timeout,
                ca=delivery.mta_sts_ca_file,
                store=None
                if threadpool is None
                else PolicyFile(
                    config.data_dir / POLICY_FILE,
                    reactor,
                    threadpool,
                    fsync=config.durability.fsync,
                ),
            )
        return cls(
            config.routes,
            config.local_domains,
            resolver,
            hostname=config.hostname,
            smtp_port=delivery.smtp_port,
            smtp_max_recipients=delivery.max_recipients,
            lmtp_max_recipients=delivery.max_recipients,
            tls=cast(TLSPolicy, delivery.tls),
            rng=rng,
            clock=clock,
            mta_sts=sts,
        )

    def replace_routes(self, routes: Sequence[Route]) -> None:
        """Route by ``routes`` from now on (a reload); messages already routed keep their hop."""
        for route in routes:
            if route.transport in ("lmtp", "smtp") and not route.endpoint:
                raise ValueError(f"route for {route.domain!r} ({route.transport}) has no endpoint")
        self._routes = tuple(routes)
        self._fixed.clear()

    def route(self, domain: str) -> Deferred[NextHop | RouteFailure]:
        """The next hop for ``domain``, or why there is none (IRouter)."""
        known = self.known(domain)
        name = domain.lower().removesuffix(".")
        sts, route = self._sts, None
        if sts is not None:
            route = select_route(self._routes, self._local_domains, name)
            if route.transport != "mx" or route.tls is not None or name.startswith("["):
                sts = None  # MTA-STS is for MX routes without their own TLS setting
        if known is not None:
            if sts is None or not isinstance(known, NextHop):
                return succeed(known)
            return Deferred.fromCoroutine(self._under_sts(sts, name, succeed(known)))
        if route is None:
            route = select_route(self._routes, self._local_domains, name)
        tls = cast(TLSPolicy, route.tls or self._tls)
        found: Deferred[NextHop | RouteFailure] = self._route_mx(name).addCallback(
            _with_tls, tls, route
        )
        if sts is None:
            return found
        return Deferred.fromCoroutine(self._under_sts(sts, name, found))

    async def _under_sts(
        self, sts: IPolicySource, domain: str, found: Deferred[NextHop | RouteFailure]
    ) -> NextHop | RouteFailure:
        """The MX result for ``domain`` under its MTA-STS policy (looked up meanwhile)."""
        policy_lookup = cast("Deferred[Policy | None]", sts.policy(domain))
        result = await found
        policy = await policy_lookup
        applied = apply_policy(domain, result, policy, cast("CAFile | None", sts.ca))
        if applied.note is not None:
            log.warn("{note}", note=applied.note)
        return applied.result

    def known(self, domain: str) -> NextHop | RouteFailure | None:
        """What :meth:`route` decides for ``domain`` when that needs no DNS lookup, else None.

        Known are: no domain at all (fails 5.1.3), local domains and fixed routes,
        an address literal (fails 5.1.3 when it is not an IPv4 or IPv6 one), and an MX
        result still in the cache (e.g. a null MX, 5.1.10, or NXDOMAIN, 5.1.2). The
        receiver refuses at RCPT what is known to fail, so that the queue never
        bounces (to a sender who may be forged) what could have been refused.
        A cached MX next hop is returned as DNS gave it: :meth:`route` applies the
        domain's MTA-STS policy on top.
        """
        name = domain.lower().removesuffix(".")
        if not name:
            return RouteFailure(RecipientState.FAILED, "5.1.3", "no domain to route")
        route = select_route(self._routes, self._local_domains, name)
        if route.transport == "maildir":
            return MAILDIR_HOP
        tls = cast(TLSPolicy, route.tls or self._tls)
        if route.transport != "mx" and route.endpoint is not None:
            return self._fixed_hop(route.transport, route.endpoint, tls, route)
        if name.startswith("["):
            return _with_tls(self._mx.literal(name).result, tls, route)
        cached = self._cache.get(name) if self._cache is not None else None
        return None if cached is None else _with_tls(cached, tls, route)

    def _fixed_hop(self, transport: str, endpoint: str, tls: TLSPolicy, route: Route) -> NextHop:
        key = (transport, endpoint, tls, route.ca, route.auth)
        hop = self._fixed.get(key)
        if hop is None:
            server = Server(endpoint_host(endpoint, self._hostname or "localhost"), endpoint)
            lmtp = transport == "lmtp"
            hop = self._fixed[key] = NextHop(
                transport="lmtp" if lmtp else "smtp",
                destination=f"route:{transport}:{endpoint}",
                servers=(server,),
                tls=tls,
                max_recipients=self._lmtp_max_recipients if lmtp else self._smtp_max_recipients,
                ca=route.ca,
                auth=route.auth,
            )
        return hop

    def _route_mx(self, domain: str) -> Deferred[NextHop | RouteFailure]:
        cache = self._cache

        def done(resolution: MXAnswer) -> NextHop | RouteFailure:
            if cache is not None:
                cache.put(domain, resolution)
            return resolution.result

        return self._mx.resolve(domain).addCallback(done)
