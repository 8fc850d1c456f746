"""The MTQP client (RFC 3887): find a tracking server, ask TRACK, follow referrals hop by hop."""

from __future__ import annotations

import ipaddress
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

from twisted.internet import ssl
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
    IResolver,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure
from zope.interface import implementer

from mtrkmta.mtqp.protocol import (
    DEFAULT_PORT,
    MAX_LINE,
    Greeting,
    MalformedResponse,
    Quit,
    Response,
    ResponseReader,
    StartTLS,
    Track,
    parse_greeting,
)
from mtrkmta.smtp.framing import OVERLONG, LineFramer
from mtrkmta.tracking.status import (
    RecipientStatus,
    TrackingReport,
    TrackingStatusError,
    parse_related,
)

TLSMode = Literal["require", "may", "none"]
TLS_MODES: tuple[TLSMode, ...] = ("require", "may", "none")

MIN_REPLY_TIMEOUT = 120.0
"""A client's wait for a reply, if bounded, must be at least 2 minutes (3887 §2.5)."""

DEFAULT_CONNECT_TIMEOUT = 30.0
DEFAULT_MAX_HOPS = 16
SRV_PREFIX = "_mtqp._tcp."

FINAL_ACTIONS = frozenset({"delivered", "expanded", "relayed", "failed"})
"""Actions after which nothing more will happen to a recipient (RFC 3886 §3.3.3)."""

HostMap = Callable[[str, int | None], tuple[str, int] | None]

#: A lookup of an IResolver as used here: name in, (answers, authority, additional) out.
#: IResolver's annotations say each is one RRHeader and the timeout is required; its
#: documentation and every Twisted resolver give lists and default the timeout.
_Lookup = Callable[[str], Deferred[tuple[list[dns.RRHeader], ...]]]
"""Where the MTQP server of a host name, asked at a port (None: no port given), really
listens (an explicit override), or None."""

TLSContextFactory = Callable[[str, TLSMode], Any]
"""Client TLS context for (server FQDN, mode); see :func:`default_tls_context`."""


class TrackingError(Exception):
    """One tracking server could not be asked, or its answer could not be used."""


class LocateError(TrackingError):
    """No address for the MTQP server of a host (RFC 3887 §2)."""


# -- TLS ----------------------------------------------------------------------------------


def default_tls_context(name: str, mode: TLSMode) -> Any:
    """TLS 1.2 or later (RFC 8996). ``require`` verifies the certificate for ``name`` against
    the platform's trust store; ``may`` is opportunistic and verifies nothing (3887 §11:
    "best effort" security), like SMTP's opportunistic STARTTLS.
    """
    if mode == "require":
        return ssl.optionsForClientTLS(
            name, extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2}
        )
    return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)


def verifying_tls_context(trust_root: Any) -> TLSContextFactory:
    """Like :func:`default_tls_context`, but ``require`` trusts ``trust_root`` (e.g. a CA file)."""

    def context(name: str, mode: TLSMode) -> Any:
        if mode == "require":
            return ssl.optionsForClientTLS(
                name,
                trustRoot=trust_root,
                extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
            )
        return default_tls_context(name, mode)

    return context


def trust_root_from_pem(pem: bytes) -> Any:
    """A trust root of every certificate in a PEM file (a CA bundle or one self-signed cert)."""
    end = b"-----END CERTIFICATE-----"
    blocks = [part[part.find(b"-----BEGIN CERTIFICATE-----") :] + end for part in pem.split(end)]
    certificates = [ssl.Certificate.loadPEM(block) for block in blocks if b"-----BEGIN" in block]
    if not certificates:
        raise ValueError("no PEM certificate found")
    return ssl.trustRootFromCertificates(certificates)


# -- locating the server (3887 §2) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """One place to ask: an address, a port, and the FQDN to give STARTTLS and check TLS for."""

    address: str
    port: int
    name: str


def host_key(host: str) -> str:
    """A host as written in Remote-MTA or a URI, for comparing: lower case, no trailing dot,
    address literals without ``[...]`` and ``IPv6:``."""
    text = host.strip().lower().removesuffix(".")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text.startswith("ipv6:"):
            text = text[5:]
    return text


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host_key(host)))
    except ValueError:
        return None


def order_srv(records: Sequence[dns.Record_SRV], rng: random.Random) -> list[dns.Record_SRV]:
    """SRV records in the order to try them: by priority, weighted-random within one (RFC 2782)."""
    ordered: list[dns.Record_SRV] = []
    for priority in sorted({record.priority for record in records}):
        group = [record for record in records if record.priority == priority]
        group.sort(key=lambda record: record.weight != 0)  # zero weights first
        while group:
            total = sum(record.weight for record in group)
            pick = rng.randint(0, total)
            running = 0
            for index, record in enumerate(group):
                running += record.weight
                if running >= pick:
                    ordered.append(group.pop(index))
                    break
    return ordered


class Locator:
    """Finds the MTQP server of a host: SRV ``_mtqp._tcp.<host>``, else the host itself on
    port 1038 (RFC 3887 §2). An explicit port skips SRV; an address literal is used as is.

    ``connect_to`` overrides all of that for the hosts it knows (for servers behind
    tunnels, and tests): it maps a host name and the port asked for (None when none
    was) to the address and port to connect to, and the host name stays the FQDN
    given to STARTTLS.
    """

    def __init__(
        self,
        resolver: IResolver,
        *,
        connect_to: HostMap | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._resolver = resolver
        self._connect_to = connect_to
        self._rng = rng if rng is not None else random.Random()

    def locate(self, host: str, port: int | None = None) -> Deferred[list[Target]]:
        """Where to ask about ``host``, in the order to try; fails with LocateError."""
        return ensureDeferred(self._locate(host, port))

    async def _locate(self, host: str, port: int | None) -> list[Target]:
        name = host_key(host)
        if not name:
            raise LocateError("empty host name")
        if self._connect_to is not None:
            override = self._connect_to(name, port)
            if override is not None:
                return [Target(override[0], override[1], name)]
        literal = _literal(name)
        if literal is not None:
            return [Target(literal, port or DEFAULT_PORT, literal)]
        if port is None:
            targets = await self._srv(name)
            if targets is not None:
                return targets
        addresses = await self._addresses(name)
        return [Target(address, port or DEFAULT_PORT, name) for address in addresses]

    async def _srv(self, name: str) -> list[Target] | None:
        """Targets from SRV records; None when there are none (use the host itself)."""
        try:
            lookup = cast(_Lookup, self._resolver.lookupService)
            answers, _authority, _additional = await lookup(SRV_PREFIX + name)
        except Exception:  # NXDOMAIN, SERVFAIL, timeout: fall back to the host itself
            return None
        records = [p for p in _payloads(answers) if isinstance(p, dns.Record_SRV)]
        if not records:
            return None
        usable = [record for record in records if str(record.target) not in ("", ".")]
        if not usable:
            raise LocateError(f"{name} publishes no MTQP service (SRV target '.')")
        targets: list[Target] = []
        problems: list[str] = []
        for record in order_srv(usable, self._rng):
            target = str(record.target).lower().removesuffix(".")
            try:
                addresses = await self._addresses(target)
            except LocateError as error:
                problems.append(str(error))
                continue
            targets += [Target(address, record.port, target) for address in addresses]
        if not targets:
            raise LocateError(f"no SRV target of {name} has an address: " + "; ".join(problems))
        return targets

    async def _addresses(self, name: str) -> list[str]:
        """IPv4 addresses of ``name``, else its IPv6 ones."""
        problems: list[str] = []
        for lookup, kind in (
            (cast(_Lookup, self._resolver.lookupAddress), dns.A),
            (cast(_Lookup, self._resolver.lookupIPV6Address), dns.AAAA),
        ):
            try:
                answers, _authority, _additional = await lookup(name)
            except DNSNameError:
                raise LocateError(f"{name}: no such host") from None
            except Exception as error:
                problems.append(f"{dns.QUERY_TYPES.get(kind, kind)} lookup failed ({error!r})")
                continue
            found = [_address(rr.payload) for rr in answers if rr.type == kind]
            if found:
                return found
        why = f": {'; '.join(problems)}" if problems else ""
        raise LocateError(f"{name} has no address{why}")


def _payloads(answers: list[dns.RRHeader]) -> list[object]:
    """The records of ``answers``, as objects: typed IEncodableRecord, mypy-zope cannot
    narrow them to a record class."""
    return [rr.payload for rr in answers]


def _address(record: Any) -> str:
    if isinstance(record, dns.Record_A):
        return str(record.dottedQuad())
    return str(ipaddress.IPv6Address(record.address))


# -- one session ------------------------------------------------------------------------------


@implementer(IHandshakeListener)
class MTQPClientProtocol(Protocol):
    """One MTQP connection, client side: responses in order, each bounded by a reply timeout.

    :meth:`next_response` returns the next response (the greeting first);
    :meth:`command` sends a command and returns its response. After
    :meth:`start_tls` everything received in clear is forgotten (3887 §6.2) and the
    next response is the new greeting. Failures (timeout, lost connection,
    malformed response) fail every waiting Deferred with TrackingError.
    """

    def __init__(self, clock: IReactorTime, reply_timeout: float, name: str) -> None:
        self.clock = clock
        self.reply_timeout = reply_timeout
        self.name = name
        self.tls_active = False
        self.handshake_done = False
        self._framer = LineFramer(MAX_LINE)
        self._reader = ResponseReader()
        self._received: deque[Response] = deque()
        self._waiters: deque[Deferred[Response]] = deque()
        self._timer: IDelayedCall | None = None
        self._error: TrackingError | None = None
        self._epoch = 0
        self._connected = False
        self._lost_waiters: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        self._connected = True
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        epoch = self._epoch
        for line in self._framer.feed(data):
            if self._epoch != epoch or self._error is not None:
                return  # read in clear before TLS: must not count (3887 §6.2)
            if line is OVERLONG:
                self._fail(TrackingError(f"{self.name} sent a line over {MAX_LINE} octets"))
                return
            assert isinstance(line, bytes)
            try:
                response = self._reader.feed(line)
            except MalformedResponse as error:
                self._fail(TrackingError(f"{self.name}: {error}"))
                return
            if response is not None:
                self._take(response)

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._connected = False
        if self.tls_active and not self.handshake_done:
            self._fail(TrackingError(f"TLS handshake with {self.name} failed"))
        else:
            self._fail(TrackingError(f"{self.name} closed the connection"))
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    # -- API ------------------------------------------------------------------------------

    def next_response(self) -> Deferred[Response]:
        """The next response not taken yet (the greeting first)."""
        if self._received:
            return succeed(self._received.popleft())
        d: Deferred[Response] = Deferred()
        if self._error is not None:
            d.errback(self._error)
            return d
        self._waiters.append(d)
        self._arm()
        return d

    def command(self, command: Track | StartTLS | Quit) -> Deferred[Response]:
        """Send ``command``; its response."""
        if self._error is None:
            assert self.transport is not None  # connected: set by makeConnection
            self.transport.write(command.render())
        return self.next_response()

    def start_tls(self, context: Any) -> Deferred[Response]:
        """Start the handshake now; the new greeting that follows it."""
        self._epoch += 1
        self._framer.reset()
        self._reader.reset()
        self._received.clear()
        self.tls_active = True
        ITLSTransport(self.transport).startTLS(context)
        return self.next_response()

    def close(self) -> Deferred[None]:
        """Drop the connection; fires once it is gone."""
        self._disarm()
        if not self._connected:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        assert self.transport is not None  # connected
        self.transport.loseConnection()
        return d

    # -- internals ------------------------------------------------------------------------

    def _take(self, response: Response) -> None:
        if self._waiters:
            waiter = self._waiters.popleft()
            self._arm()
            waiter.callback(response)
        else:
            self._received.append(response)

    def _arm(self) -> None:
        """(Re)start the reply timer while a response is awaited."""
        self._disarm()
        if self._error is None and self._connected and self._waiters:
            self._timer = self.clock.callLater(self.reply_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(TrackingError(f"no reply from {self.name} in {self.reply_timeout:g} s"))

    def _fail(self, error: TrackingError) -> None:
        if self._error is not None:
            return
        self._error = error
        self._disarm()
        if self._connected:  # over a TCP endpoint (TCP4/TCP6ClientEndpoint)
            ITCPTransport(self.transport).abortConnection()
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.errback(error)


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hop:
    """One tracking server asked, and what it said.

    ``host`` is the name asked about (the first server, or a Remote-MTA),
    ``referred_by`` the Reporting-MTA that named it (None for the first),
    ``server`` where the answer came from. ``response`` is the TRACK reply; its
    data is the multipart/related entity, read into ``reports``. ``error`` says
    why there are no reports (a negative reply, no server, a broken session).
    """

    host: str
    port: int | None = None
    referred_by: str | None = None
    server: Target | None = None
    tls: bool = False
    greetings: tuple[Greeting, ...] = ()
    response: Response | None = None
    reports: tuple[TrackingReport, ...] = ()
    error: str | None = None

    @property
    def answered(self) -> bool:
        """True when the server answered TRACK with tracking information."""
        return bool(self.reports)

    @property
    def refused(self) -> bool:
        """True when the server answered TRACK negatively (``noinfo``, ``tls-required``...)."""
        return self.response is not None and not self.response.is_positive

    @property
    def entity(self) -> bytes:
        """The MIME entity of a positive TRACK reply, as received (un-stuffed)."""
        return self.response.body if self.response is not None else b""


@dataclass(frozen=True, slots=True)
class Step:
    """One recipient block on a recipient's path: which hop, which report, what it said."""

    hop: int  # index into Trace.hops
    reporting_mta: str
    status: RecipientStatus


@dataclass(frozen=True, slots=True)
class RecipientPath:
    """What happened to one recipient, hop by hop, and where it ended.

    ``outcome`` is the last Action, or ``unknown`` (the next hop could not say) or
    ``loop`` (a referral led back to a hop already on the path); ``reason``
    explains an ``unknown``.
    """

    original_recipient: str
    steps: tuple[Step, ...]
    outcome: str
    reason: str | None = None

    @property
    def final(self) -> bool:
        """True when the recipient reached a state nothing will change (RFC 3886 §3.3.3)."""
        return self.outcome in FINAL_ACTIONS

    @property
    def last(self) -> Step | None:
        return self.steps[-1] if self.steps else None


@dataclass(frozen=True, slots=True)
class Trace:
    """Every hop asked about one message, and each recipient's path through them."""

    envid: str
    hops: tuple[Hop, ...]
    recipients: tuple[RecipientPath, ...] = ()

    @property
    def complete(self) -> bool:
        """True when every recipient reached a final state."""
        return bool(self.recipients) and all(path.final for path in self.recipients)


def remote_host(status: RecipientStatus) -> str | None:
    """The host a ``transferred`` block refers to (a ``dns`` Remote-MTA), else None."""
    remote = status.remote_mta
    if remote is None or remote.kind.lower() != "dns" or not remote.value.strip():
        return None
    return remote.value.strip()


def _same_recipient(candidate: RecipientStatus, previous: RecipientStatus) -> bool:
    wanted = {
        previous.original_recipient.value.lower(),
        previous.final_recipient.value.lower(),
    }
    return candidate.original_recipient.value.lower() in wanted


def recipient_paths(hops: Sequence[Hop]) -> tuple[RecipientPath, ...]:
    """Follow each recipient of the first answer through the later hops.

    A ``transferred`` block continues in a later part of the same chained answer
    whose Reporting-MTA is its Remote-MTA (3886 §3), else in the answer of the hop
    asked about that Remote-MTA, at the blocks with the same Original-Recipient
    (or whose Original-Recipient is its Final-Recipient).
    """
    if not hops or not hops[0].reports:
        return ()
    by_host: dict[tuple[str, int | None], int] = {}  # a referral is asked without a port
    for index, hop in enumerate(hops):
        by_host.setdefault((host_key(hop.host), hop.port), index)
    paths: list[RecipientPath] = []

    def walk(
        hop: int,
        part: int,
        status: RecipientStatus,
        steps: tuple[Step, ...],
        seen: frozenset[tuple[int, int]],
    ) -> None:
        report = hops[hop].reports[part]
        steps = (*steps, Step(hop, report.reporting_mta.value, status))
        original = steps[0].status.original_recipient.value
        action = status.action.lower()
        if action != "transferred":
            paths.append(RecipientPath(original, steps, action))
            return
        remote = remote_host(status)
        if remote is None:
            paths.append(RecipientPath(original, steps, "unknown", "no Remote-MTA to ask"))
            return
        key = host_key(remote)
        following: tuple[int, int] | None = None
        for later, other in enumerate(hops[hop].reports[part + 1 :], start=part + 1):
            if host_key(other.reporting_mta.value) == key:
                following = (hop, later)
                break
        if following is None:
            asked = by_host.get((key, None))
            if asked is None:
                paths.append(RecipientPath(original, steps, "unknown", f"{remote} was not asked"))
                return
            if not hops[asked].reports:
                reason = hops[asked].error or "no answer"
                paths.append(RecipientPath(original, steps, "unknown", f"{remote}: {reason}"))
                return
            following = (asked, 0)
        if following in seen:
            paths.append(RecipientPath(original, steps, "loop", f"{remote} was already asked"))
            return
        next_report = hops[following[0]].reports[following[1]]
        matches = [block for block in next_report.recipients if _same_recipient(block, status)]
        if not matches:
            reason = f"{remote} does not report this recipient"
            paths.append(RecipientPath(original, steps, "unknown", reason))
            return
        for block in matches:
            walk(following[0], following[1], block, steps, seen | {following})

    for block in hops[0].reports[0].recipients:
        walk(0, 0, block, (), frozenset({(0, 0)}))
    return tuple(paths)


# -- the client --------------------------------------------------------------------------------


class TrackingClient:
    """Asks MTQP servers about one message and follows their referrals (RFC 3886 §3.3.3).

    ``tls``: ``require`` sends TRACK only under TLS (STARTTLS offered, accepted and
    the certificate verified by ``tls_context``); ``may`` uses STARTTLS when
    offered and goes on in clear if it is refused; ``none`` never uses it.
    Every reply is awaited at most ``reply_timeout`` seconds (RFC 3887 §2.5
    wants at least 120 when bounded; tests use less), measured on ``clock``.
    """

    def __init__(
        self,
        reactor: Any,
        resolver: IResolver,
        *,
        tls: TLSMode = "may",
        tls_context: TLSContextFactory = default_tls_context,
        reply_timeout: float = MIN_REPLY_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        connect_to: HostMap | None = None,
        max_hops: int = DEFAULT_MAX_HOPS,
        clock: IReactorTime | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {tls!r}")
        if max_hops < 1:
            raise ValueError("max_hops must be at least 1")
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.tls: TLSMode = tls
        self.tls_context = tls_context
        self.reply_timeout = reply_timeout
        self.connect_timeout = connect_timeout
        self.max_hops = max_hops
        self.locator = Locator(resolver, connect_to=connect_to, rng=rng)

    # -- one server ----------------------------------------------------------------------

    def query(
        self,
        host: str,
        envid: str,
        secret: str,
        *,
        port: int | None = None,
        referred_by: str | None = None,
    ) -> Deferred[Hop]:
        """Ask ``host``'s MTQP server about the message; never fails (see ``Hop.error``).

        ``envid`` is the decoded unique-envid, ``secret`` the base64 secret A.
        """
        return ensureDeferred(self._query(host, envid, secret, port, referred_by))

    async def _query(
        self, host: str, envid: str, secret: str, port: int | None, referred_by: str | None
    ) -> Hop:
        hop = Hop(host=host, port=port, referred_by=referred_by)
        try:
            targets = await self.locator.locate(host, port)
        except LocateError as error:
            return replace(hop, error=str(error))
        problems: list[str] = []
        for target in targets:
            try:
                protocol = await self._connect(target)
            except Exception as error:
                problems.append(f"cannot connect to {target.address} port {target.port}: {error}")
                continue
            try:
                return await self._session(replace(hop, server=target), protocol, envid, secret)
            finally:
                await protocol.close()
        return replace(hop, error="; ".join(problems) or "no server to ask")

    async def _connect(self, target: Target) -> MTQPClientProtocol:
        protocol = MTQPClientProtocol(self.clock, self.reply_timeout, target.name)
        kind = TCP6ClientEndpoint if ":" in target.address else TCP4ClientEndpoint
        endpoint = kind(self.reactor, target.address, target.port, timeout=self.connect_timeout)
        await connectProtocol(endpoint, protocol)
        return protocol

    async def _session(
        self, hop: Hop, protocol: MTQPClientProtocol, envid: str, secret: str
    ) -> Hop:
        assert hop.server is not None
        name = hop.server.name
        greetings: list[Greeting] = []
        try:
            first = parse_greeting(await protocol.next_response())
            greetings.append(first)
            if not first.ok:
                return replace(hop, greetings=tuple(greetings), error=_refusal(first.response))
            tls = False
            if self.tls != "none":
                tls, problem = await self._starttls(protocol, first, name, greetings)
                if problem is not None:
                    return replace(hop, greetings=tuple(greetings), error=problem)
            response = await protocol.command(Track(envid, secret))
            hop = replace(hop, tls=tls, greetings=tuple(greetings), response=response)
            await self._quit(protocol)
        except (TrackingError, MalformedResponse) as error:
            return replace(hop, greetings=tuple(greetings), error=str(error))
        if not response.is_positive:
            return replace(hop, error=_refusal(response))
        if not response.data_lines:
            return replace(hop, error="positive TRACK reply without tracking information")
        try:
            reports = parse_related(response.body)
        except TrackingStatusError as error:
            return replace(hop, error=f"unreadable tracking information: {error}")
        return replace(hop, reports=tuple(reports))

    async def _starttls(
        self,
        protocol: MTQPClientProtocol,
        first: Greeting,
        name: str,
        greetings: list[Greeting],
    ) -> tuple[bool, str | None]:
        """STARTTLS as ``self.tls`` says; (TLS active, why the query must stop or None)."""
        if not first.starttls:
            if self.tls == "require":
                return False, f"TLS required, but {name} does not offer STARTTLS"
            return False, None
        reply = await protocol.command(StartTLS(name))
        if not reply.is_positive:
            if self.tls == "require":
                return False, f"TLS required, but STARTTLS was refused: {_refusal(reply)}"
            return False, None
        second = parse_greeting(await protocol.start_tls(self.tls_context(name, self.tls)))
        greetings.append(second)
        if not second.ok:
            return True, _refusal(second.response)
        if second.starttls:
            return True, f"{name} offered STARTTLS again under TLS (3887 §6.2)"
        return True, None

    async def _quit(self, protocol: MTQPClientProtocol) -> None:
        try:
            await protocol.command(Quit())
        except TrackingError:
            pass  # the answer is in; a server that drops the line at QUIT changes nothing

    # -- referrals ------------------------------------------------------------------------

    def follow(
        self, host: str, envid: str, secret: str, *, port: int | None = None
    ) -> Deferred[Trace]:
        """Ask ``host``, then the server of every Remote-MTA a ``transferred`` recipient names,
        with the same ENVID and secret (RFC 3886 §3.3.3); never the same host and port twice
        (a Remote-MTA names no port: its server is asked at the port SRV, ``connect_to`` or
        1038 gives, so nodes on one address with different MTQP ports can follow one
        another), and no more than ``max_hops`` servers. Never fails.
        """
        return ensureDeferred(self._follow(host, envid, secret, port))

    async def _follow(self, host: str, envid: str, secret: str, port: int | None) -> Trace:
        hops: list[Hop] = []
        asked: set[tuple[str, int | None]] = set()
        pending: deque[tuple[str, int | None, str | None]] = deque([(host, port, None)])
        while pending:
            name, name_port, referred_by = pending.popleft()
            key = (host_key(name), name_port)
            if key in asked:
                continue
            asked.add(key)
            if len(hops) >= self.max_hops:
                error = f"not asked: more than {self.max_hops} tracking servers"
                hops.append(Hop(host=name, referred_by=referred_by, error=error))
                continue
            hop = await self.query(name, envid, secret, port=name_port, referred_by=referred_by)
            hops.append(hop)
            for index, report in enumerate(hop.reports):
                covered = {host_key(r.reporting_mta.value) for r in hop.reports[index + 1 :]}
                for status in report.recipients:
                    remote = remote_host(status)
                    if status.action.lower() != "transferred" or remote is None:
                        continue
                    if host_key(remote) in covered:
                        continue  # the chained answer already tells (3886 §3.3.3)
                    pending.append((remote, None, report.reporting_mta.value))
        return Trace(envid=envid, hops=tuple(hops), recipients=recipient_paths(hops))


def _refusal(response: Response) -> str:
    return response.status_line().decode("ascii", "replace")
