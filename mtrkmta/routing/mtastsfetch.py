"""MTA-STS discovery and fetch (RFC 8461 §3): the TXT record, the policy over HTTPS, the cache."""

from __future__ import annotations

import ipaddress
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IResolver, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.names import dns
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from mtrkmta.config import CAFile
from mtrkmta.routing.mtasts import (
    MAX_POLICY_SIZE,
    IPolicySource,
    Policy,
    PolicyCache,
    PolicyError,
    dump_cache,
    load_cache,
    next_step,
    parse_policy,
    txt_id,
)

log = Logger()

WELL_KNOWN = "/.well-known/mta-sts.txt"

RETRY_FETCH_AFTER = 300.0
"""Seconds before a policy whose fetch failed is fetched again (per domain and id)."""


class FetchError(Exception):
    """The policy could not be had over HTTPS: the text says why, for the log."""


def _pem_blocks(pem: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [block + marker for block in pem.split(marker) if b"-----BEGIN" in block]


class _ResolvingTLSEndpoint:
    """Connects to ``host`` (looked up on our IResolver, not the system's) over TLS."""

    def __init__(
        self, reactor: Any, resolver: IResolver, host: str, port: int, trust: Any, timeout: float
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._host = host
        self._port = port
        self._trust = trust
        self._timeout = timeout

    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        address = await self._address()
        tcp: IStreamClientEndpoint
        if ":" in address:
            tcp = TCP6ClientEndpoint(self._reactor, address, self._port, timeout=self._timeout)
        else:
            tcp = TCP4ClientEndpoint(self._reactor, address, self._port, timeout=self._timeout)
        creator = optionsForClientTLS(self._host, trustRoot=self._trust)
        return await wrapClientTLS(creator, tcp).connect(factory)

    async def _address(self) -> str:
        """The first IPv4 address of the host, else its first IPv6 one (CNAMEs followed)."""
        resolver: Any = self._resolver  # IResolver's annotations want a timeout; it has a default
        for lookup, rtype in (
            (resolver.lookupAddress, dns.A),
            (resolver.lookupIPV6Address, dns.AAAA),
        ):
            try:
                answers, _authority, _additional = cast(Any, await lookup(self._host))
            except Exception:
                continue
            for rr in answers:
                payload: Any = rr.payload
                if rr.type == rtype == dns.A:
                    return str(ipaddress.IPv4Address(payload.address))
                if rr.type == rtype == dns.AAAA:
                    return str(ipaddress.IPv6Address(payload.address))
        raise FetchError(f"{self._host} has no address")


@implementer(IAgentEndpointFactory)
class _Endpoints:
    def __init__(self, reactor: Any, resolver: IResolver, trust: Any, timeout: float) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._trust = trust
        self._timeout = timeout

    def endpointForURI(self, uri: URI) -> _ResolvingTLSEndpoint:
        host = uri.host.decode("ascii")
        return _ResolvingTLSEndpoint(
            self._reactor, self._resolver, host, uri.port, self._trust, self._timeout
        )


class _LimitedBody(Protocol):
    """Collects a response body, aborting the connection past ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred(lambda _: self._stop())

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.done.errback(FetchError(f"policy larger than {self._limit} bytes"))
            self._stop()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(FetchError(f"policy body cut short: {reason.getErrorMessage()}"))


class PolicyFile:
    """The policy cache on disk (RFC 8461 §5.1: a sender SHOULD cache), read and written in
    ``threadpool``: each write goes to a temporary file, fsync'd, renamed over ``path``, and
    the directory fsync'd, so a crash leaves the old file or the new one, never a mix. With
    several worker processes the last write wins (each keeps its own cache in memory)."""

    def __init__(self, path: Path, reactor: Any, threadpool: Any, *, fsync: bool = True) -> None:
        self.path = path
        self._reactor = reactor
        self._threadpool = threadpool
        self._fsync = fsync
        self._writing: Deferred[None] | None = None
        self._next: bytes | None = None
        self._idle: list[Deferred[None]] = []

    def load(self) -> Deferred[bytes | None]:
        """The file's bytes; None when there is no file."""
        return deferToThreadPool(self._reactor, self._threadpool, self._read)

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def save(self, data: bytes) -> None:
        """Write ``data`` soon; writes never overlap, and only the latest waiting one is made."""
        self._next = data
        if self._writing is None:
            self._write_next()

    def idle(self) -> Deferred[None]:
        """Fires once no write is waiting or under way."""
        if self._writing is None:
            return defer.succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        return waiter

    def _write_next(self) -> None:
        data, self._next = self._next, None
        if data is None:
            self._writing = None
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)
            return
        writing = deferToThreadPool(self._reactor, self._threadpool, self._write, data)
        self._writing = writing
        writing.addErrback(self._failed)
        writing.addCallback(lambda _: self._write_next())

    def _failed(self, failure: Failure) -> None:
        log.warn(
            "MTA-STS: cannot write the policy cache {path}: {why}; policies are fetched again "
            "after a restart",
            path=str(self.path),
            why=failure.getErrorMessage(),
        )

    def _write(self, data: bytes) -> None:
        # One temporary name per process: workers (server.workers) share the data directory.
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        with temporary.open("wb") as out:
            out.write(data)
            out.flush()
            if self._fsync:
                os.fsync(out.fileno())
        os.replace(temporary, self.path)
        if self._fsync:
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)


@implementer(IPolicySource)
class PolicyFetcher:
    """Finds, fetches and caches domains' MTA-STS policies (RFC 8461 §3, §5.1).

    The TXT record ``_mta-sts.<domain>`` is asked for each time; a cached policy with the
    same id is used, otherwise ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` is
    fetched: the server's certificate verified for that name (``ca``, else the system's
    CAs), redirects not followed (§3.3), status 200 and ``text/plain`` required, at most
    64 KiB read, the whole fetch bounded by ``timeout`` seconds. A failed fetch falls back
    to the cached policy, if any, else to none (§3.3, §5.1), and is not tried again for
    that domain and id for ``RETRY_FETCH_AFTER`` seconds (deliveries meanwhile do as
    after the failure: a host that fails costs one attempt, not one per delivery). With
    ``store`` the cache is read from it at start (lookups wait for that) and written after
    each new policy.
    ``https_port`` is for tests.
    """

    def __init__(
        self,
        reactor: Any,
        resolver: IResolver,
        *,
        clock: IReactorTime | None = None,
        cache_size: int = 1000,
        timeout: float = 10.0,
        ca: CAFile | None = None,
        https_port: int = 443,
        store: PolicyFile | None = None,
    ) -> None:
        self.ca = ca
        self._reactor = reactor
        self._resolver = resolver
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._cache = PolicyCache(self._clock, cache_size)
        self._timeout = timeout
        self._port = https_port
        trust: Any = platformTrust()
        if ca is not None:
            trust = trustRootFromCertificates(
                [Certificate.loadPEM(block) for block in _pem_blocks(ca.pem)]
            )
        self._agent = Agent.usingEndpointFactory(
            reactor,
            _Endpoints(reactor, resolver, trust, timeout),
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        self._fetching: dict[tuple[str, str], Deferred[Policy | None]] = {}
        # (domain, id) -> when a failed fetch may be tried again; at most cache_size kept.
        self._failed: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._failed_size = cache_size
        self._store = store
        self._loaded: Deferred[None] | None = None
        if store is not None:
            self._loaded = store.load().addCallbacks(self._restore, self._unreadable)

    def _restore(self, data: bytes | None) -> None:
        if data is None or self._store is None:
            return
        try:
            entries = load_cache(data)
        except PolicyError as problem:
            log.warn(
                "MTA-STS: ignoring the policy cache {path}: {why}; it is rewritten "
                "with the next policy fetched",
                path=str(self._store.path),
                why=problem,
            )
            return
        for domain, entry in entries:
            self._cache.restore(domain, entry)
        log.info("MTA-STS: {n} cached policies read", n=len(self._cache))

    def _unreadable(self, failure: Failure) -> None:
        path = self._store.path if self._store is not None else None
        log.warn(
            "MTA-STS: cannot read the policy cache {path}: {why}",
            path=str(path),
            why=failure.getErrorMessage(),
        )

    @property
    def cache(self) -> PolicyCache:
        return self._cache

    def policy(self, domain: str) -> Deferred[Policy | None]:
        """The policy in force for ``domain`` (None: none); never fails."""
        name = domain.lower().removesuffix(".")
        return Deferred.fromCoroutine(self._policy(name)).addErrback(self._unexpected, name)

    def _unexpected(self, failure: Failure, domain: str) -> Policy | None:
        log.failure("MTA-STS: {domain}: policy lookup failed unexpectedly", failure, domain=domain)
        cached = self._cache.get(domain)
        return cached.policy if cached is not None else None

    def url(self, domain: str) -> str:
        port = "" if self._port == 443 else f":{self._port}"
        return f"https://mta-sts.{domain}{port}{WELL_KNOWN}"

    async def _policy(self, domain: str) -> Policy | None:
        if self._loaded is not None:
            await _shared_none(self._loaded)
            if self._loaded.called:
                self._loaded = None
        try:
            announced = await self._announced(domain)
        except PolicyError as problem:
            log.info("MTA-STS: {domain}: invalid TXT record ({why})", domain=domain, why=problem)
            announced = None
        cached = self._cache.get(domain)
        step = next_step(announced, cached)
        if step == "none":
            return None
        if step == "use-cached" or announced is None:
            return cached.policy if cached is not None else None
        key = (domain, announced)
        if self._failed.get(key, 0.0) > self._clock.seconds():
            return cached.policy if cached is not None else None  # failed lately: not again
        self._failed.pop(key, None)
        pending = self._fetching.get(key)
        if pending is None:  # one fetch per domain and id at a time
            pending = self._fetching[key] = Deferred.fromCoroutine(self._refresh(domain, announced))
            pending.addBoth(self._fetched, key)
        return await _shared(pending)

    def _fetched(self, result: Any, key: tuple[str, str]) -> Any:
        self._fetching.pop(key, None)
        return result

    async def _refresh(self, domain: str, announced: str) -> Policy | None:
        try:
            fetching = Deferred.fromCoroutine(self._fetch(domain))
            fetching.addTimeout(self._timeout, self._clock)
            policy = parse_policy(await fetching)
        except (FetchError, PolicyError, defer.TimeoutError) as problem:
            why = "timed out" if isinstance(problem, defer.TimeoutError) else str(problem)
            if isinstance(problem, PolicyError):
                why = f"invalid policy: {why}"
            return self._fetch_failed(domain, announced, why)
        except Exception as problem:  # TLS, connection refused, DNS: the fetch failed
            return self._fetch_failed(domain, announced, _describe(problem))
        self._cache.put(domain, announced, policy)
        if self._store is not None:
            self._store.save(dump_cache(list(self._cache.items())))
        log.info(
            "MTA-STS: {domain}: policy id {id} mode {mode}, max_age {max_age}",
            domain=domain,
            id=announced,
            mode=policy.mode,
            max_age=policy.max_age,
        )
        return policy

    def _fetch_failed(self, domain: str, announced: str, why: str) -> Policy | None:
        """Log the failure, hold off the next fetch, and fall back to the cached policy."""
        self._failed[(domain, announced)] = self._clock.seconds() + RETRY_FETCH_AFTER
        self._failed.move_to_end((domain, announced))
        while len(self._failed) > self._failed_size:
            self._failed.popitem(last=False)
        cached = self._cache.get(domain)
        then = "the cached policy stays in force" if cached else "delivering as without a policy"
        log.warn(
            "MTA-STS: {domain}: policy not fetched from {url}: {why}; {then} "
            "(next try in {after:.0f}s at the earliest)",
            domain=domain,
            url=self.url(domain),
            why=why,
            then=then,
            after=RETRY_FETCH_AFTER,
        )
        return cached.policy if cached is not None else None

    async def _announced(self, domain: str) -> str | None:
        """The id of the domain's TXT record, None without one; PolicyError when invalid."""
        try:
            resolver: Any = self._resolver
            answers, _authority, _additional = await resolver.lookupText(f"_mta-sts.{domain}")
        except Exception:  # NXDOMAIN, SERVFAIL, timeout: no announcement seen
            return None
        records = []
        for rr in answers:
            payload: Any = rr.payload
            if rr.type == dns.TXT:
                records.append(b"".join(payload.data).decode("ascii", "replace"))
        return txt_id(records)

    async def _fetch(self, domain: str) -> bytes:
        response = cast(IResponse, await self._agent.request(b"GET", self.url(domain).encode()))
        if response.code != 200:
            _discard(response)
            raise FetchError(f"HTTP status {response.code} (only 200 counts; no redirects)")
        types = response.headers.getRawHeaders(b"content-type") or [b""]
        media = types[0].split(b";")[0].strip().lower()
        if media != b"text/plain":
            _discard(response)
            raise FetchError(f"Content-Type {media.decode('ascii', 'replace')!r}, not text/plain")
        if isinstance(response.length, int) and response.length > MAX_POLICY_SIZE:
            _discard(response)
            raise FetchError(f"policy larger than {MAX_POLICY_SIZE} bytes (Content-Length)")
        body = _LimitedBody(MAX_POLICY_SIZE)
        response.deliverBody(body)
        return await body.done


def _discard(response: IResponse) -> None:
    """Read no body: the connection is dropped at the first byte."""
    body = _LimitedBody(0)
    body.done.addErrback(lambda _: None)
    response.deliverBody(body)


def _describe(problem: BaseException) -> str:
    """Why a fetch failed, in a few words: TLS verification, connection, or the exception."""
    reasons = getattr(problem, "reasons", None)  # ResponseNeverReceived and friends
    failures = [reason.value for reason in reasons] if reasons else [problem]
    texts = []
    for failure in failures:
        name = type(failure).__name__
        if name == "VerificationError":
            texts.append("the HTTPS certificate is not for the policy host")
        elif "certificate verify failed" in str(failure):
            texts.append("the HTTPS certificate is not trusted (unknown CA or expired)")
        else:
            texts.append(f"{name}: {failure}" if str(failure) else name)
    return "; ".join(texts)


def _shared(pending: Deferred[Policy | None]) -> Deferred[Policy | None]:
    """A Deferred with ``pending``'s result that does not take it from other waiters."""
    mine: Deferred[Policy | None] = Deferred()

    def give(result: Any) -> Any:
        if isinstance(result, Failure):
            mine.callback(None)
            return None
        mine.callback(result)
        return result

    pending.addBoth(give)
    return mine


def _shared_none(pending: Deferred[None]) -> Deferred[None]:
    """A Deferred that fires (with None) once ``pending`` has, leaving its result alone."""
    mine: Deferred[None] = Deferred()

    def give(result: Any) -> Any:
        mine.callback(None)
        return result

    pending.addBoth(give)
    return mine
