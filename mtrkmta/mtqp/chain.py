"""MTQP chaining at a gateway (RFC 3887 §2.4): ask the inner hops, merge their answers."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IResolver
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from mtrkmta.mtqp.client import (
    DEFAULT_CONNECT_TIMEOUT,
    TLSContextFactory,
    TLSMode,
    TrackingClient,
    default_tls_context,
    host_key,
    remote_host,
    trust_root_from_pem,
    verifying_tls_context,
)
from mtrkmta.tracking.status import (
    RecipientStatus,
    TrackingReport,
    TrackingStatusError,
    TypedValue,
    render_status,
)

if TYPE_CHECKING:
    from mtrkmta.config import Config

log = Logger()

MAX_CHAIN_TIMEOUT = 120.0
"""A chaining server answers within two minutes, with what it has (RFC 3887 §2.4)."""


class IHopAsker(Interface):
    """Asks one inner hop's MTQP server TRACK on the gateway's behalf."""

    def ask(host: str, envid: str, secret: str, tls: bool) -> Deferred[Sequence[TrackingReport]]:
        """The message/tracking-status parts ``host`` answers with, () when none.

        With ``tls`` the TRACK (and so the secret) goes only over TLS: a hop
        that cannot do it is not asked. May fail; the gateway then has no part
        from that hop.
        """


@implementer(IHopAsker)
class ClientAsker:
    """An :class:`IHopAsker` on :class:`TrackingClient`: ``require`` TLS when asked for it,
    else ``may`` (STARTTLS when the hop offers it)."""

    def __init__(self, make_client: Callable[[TLSMode], TrackingClient]) -> None:
        self._make_client = make_client

    def ask(
        self, host: str, envid: str, secret: str, tls: bool
    ) -> Deferred[Sequence[TrackingReport]]:
        client = self._make_client("require" if tls else "may")
        d = client.query(host, envid, secret)

        def reports(hop: Any) -> Sequence[TrackingReport]:
            if hop.error is not None:
                log.info(
                    "MTQP chaining: {host} gave no answer: {error}", host=host, error=hop.error
                )
            return tuple(hop.reports)

        return d.addCallback(reports)


@dataclass(frozen=True, slots=True)
class ChainSettings:
    """What a gateway may chain: the inner ``domains`` (a host is inner when it is one of
    them or below one), the time budget, the most inner hosts asked per TRACK, the most
    chained TRACKs at once per server, and whether inner host names are disguised."""

    domains: tuple[str, ...]
    timeout: float = MAX_CHAIN_TIMEOUT
    max_hops: int = 8
    concurrency: int = 8
    disguise: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.timeout <= MAX_CHAIN_TIMEOUT:
            raise ValueError(f"chain timeout must be above 0 and at most {MAX_CHAIN_TIMEOUT:g} s")
        if self.max_hops < 1 or self.concurrency < 1:
            raise ValueError("chain max hops and concurrency must be at least 1")

    def covers(self, host: str) -> bool:
        """True when ``host`` is one of the inner domains or a host below one."""
        name = host_key(host)
        return any(name == d or name.endswith("." + d) for d in self._keys())

    def _keys(self) -> Iterable[str]:
        return (host_key(domain) for domain in self.domains)


def inner_hosts(reports: Sequence[TrackingReport], settings: ChainSettings) -> list[str]:
    """The inner hosts ``transferred`` blocks of ``reports`` name and no later part answers
    for, in order, each once (RFC 3886 §3: a chained answer's parts follow the path)."""
    found: list[str] = []
    for index, report in enumerate(reports):
        covered = {host_key(r.reporting_mta.value) for r in reports[index + 1 :]}
        for status in report.recipients:
            remote = remote_host(status)
            if status.action.lower() != "transferred" or remote is None:
                continue
            key = host_key(remote)
            if key in covered or not settings.covers(remote) or key in found:
                continue
            found.append(key)
    return found


def _renders(report: TrackingReport) -> bool:
    try:
        render_status(report)
    except TrackingStatusError:
        return False
    return True


class Gatherer:
    """Collects, for one TRACK, the answers of the inner hops behind the gateway.

    Hops are asked one after the other, breadth first, each host once (the gateway
    itself counts as asked: loop protection), at most ``max_hops``, all within
    ``timeout`` on ``clock``: when it runs out the answer has what came in, and a
    recipient whose inner answer is missing keeps the gateway's ``transferred``
    block, RFC 3887 §2.4's "no further information".
    """

    def __init__(
        self, settings: ChainSettings, asker: IHopAsker, clock: IReactorTime, gateway: str
    ) -> None:
        self.settings = settings
        self.asker = asker
        self.clock = clock
        self.gateway = gateway

    def gather(
        self,
        local: TrackingReport,
        envid: str,
        secret: str,
        *,
        tls: bool,
        charge: Callable[[], bool] = lambda: True,
    ) -> Deferred[list[TrackingReport]]:
        """The local part first, then every inner hop's parts; never fails.

        ``tls``: the client used TLS, so inner hops are asked only under TLS.
        ``charge`` is called before each inner hop is asked; False stops the
        chaining there (the client's rate limit).
        """
        run = _Run(self, local, envid, secret, tls, charge)
        return run.start()


class _Run:
    """One gathering: its parts, the hosts asked, the deadline."""

    def __init__(
        self,
        gatherer: Gatherer,
        local: TrackingReport,
        envid: str,
        secret: str,
        tls: bool,
        charge: Callable[[], bool],
    ) -> None:
        self.settings = gatherer.settings
        self.asker = gatherer.asker
        self.clock = gatherer.clock
        self.gateway = gatherer.gateway
        self.envid = envid
        self.secret = secret
        self.tls = tls
        self.charge = charge
        self.parts: list[TrackingReport] = [local]
        self.asked = {host_key(gatherer.gateway), host_key(local.reporting_mta.value)}
        self.pending: deque[str] = deque(inner_hosts(self.parts, self.settings))
        self.hops = 0
        self.done = False
        self.result: Deferred[list[TrackingReport]] = Deferred()
        self.current: Deferred[Sequence[TrackingReport]] | None = None
        self.timer: IDelayedCall | None = None

    def start(self) -> Deferred[list[TrackingReport]]:
        self.timer = self.clock.callLater(self.settings.timeout, self._timed_out)
        self._next()
        return self.result

    def _next(self) -> None:
        while self.pending and not self.done:
            host = self.pending.popleft()
            if host in self.asked:
                continue  # a loop, or a host an earlier part already named
            if self.hops >= self.settings.max_hops or not self.charge():
                break
            self.asked.add(host)
            self.hops += 1
            current = maybeDeferred(self.asker.ask, host, self.envid, self.secret, self.tls)
            self.current = current
            current.addCallbacks(self._answered, self._failed, errbackArgs=(host,))
            return
        self._finish()

    def _answered(self, reports: Sequence[TrackingReport]) -> None:
        if self.done:
            return
        self.current = None
        fresh: list[TrackingReport] = []
        for report in reports:
            key = host_key(report.reporting_mta.value)
            known = {host_key(part.reporting_mta.value) for part in (*self.parts, *fresh)}
            if key in known or not _renders(report):
                continue  # a part of a host already answered for (a loop), or broken
            fresh.append(report)
        self.parts += fresh
        self.asked |= {host_key(part.reporting_mta.value) for part in fresh}
        self.pending.extend(inner_hosts(self.parts, self.settings))
        self._next()

    def _failed(self, failure: Failure, host: str) -> None:
        if self.done:
            return
        log.info(
            "MTQP chaining: asking {host} failed ({error})",
            host=host,
            error=failure.type.__name__ if failure.type is not None else "unknown error",
        )
        self.current = None
        self._next()

    def _timed_out(self) -> None:
        self.timer = None
        if self.current is not None:
            log.info("MTQP chaining: time limit reached, answering with what came in")
        self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        current, self.current = self.current, None
        if current is not None:
            current.cancel()
        parts = self.parts
        if self.settings.disguise:
            parts = disguise(parts, self.settings, self.gateway)
        self.result.callback(parts)


def disguise(
    parts: Sequence[TrackingReport], settings: ChainSettings, gateway: str
) -> list[TrackingReport]:
    """Inner host names replaced by ``hidden-N.<gateway>`` labels, numbered in the order
    they first appear: the Reporting-MTA of every part after the first, a Remote-MTA
    within the inner domains, and those names where they occur in extension fields.
    Addresses (Original-/Final-Recipient) are left as they are.
    """
    labels: dict[str, str] = {}
    gateway_key = host_key(gateway)

    def label(host: str) -> str:
        key = host_key(host)
        if key not in labels:
            labels[key] = f"hidden-{len(labels) + 1}.{gateway_key}"
        return labels[key]

    for index, part in enumerate(parts):
        if index:
            label(part.reporting_mta.value)
        for status in part.recipients:
            remote = remote_host(status)
            if remote is not None and settings.covers(remote) and host_key(remote) != gateway_key:
                label(remote)
    labels.pop(gateway_key, None)
    if not labels:
        return list(parts)
    pattern = re.compile(
        "|".join(re.escape(name) for name in sorted(labels, key=len, reverse=True)), re.IGNORECASE
    )

    def text(value: str) -> str:
        return pattern.sub(lambda match: labels[match.group(0).lower()], value)

    def mta(value: TypedValue) -> TypedValue:
        key = host_key(value.value)
        return TypedValue("dns", labels[key]) if key in labels else value

    def block(status: RecipientStatus) -> RecipientStatus:
        remote = status.remote_mta
        return replace(
            status,
            remote_mta=mta(remote) if remote is not None else None,
            extensions=tuple((name, text(value)) for name, value in status.extensions),
        )

    return [
        replace(
            part,
            reporting_mta=mta(part.reporting_mta) if index else part.reporting_mta,
            recipients=tuple(block(status) for status in part.recipients),
            extensions=tuple((name, text(value)) for name, value in part.extensions),
        )
        for index, part in enumerate(parts)
    ]


def chain_from_config(config: Config, reactor: Any, resolver: IResolver | None) -> Gatherer | None:
    """The gateway's :class:`Gatherer` from ``[mtqp]``, or None when ``chain`` is off.

    Inner hops are found as `mtrkmta track` finds servers (SRV, then the host on
    1038) with ``resolver``; each reply is awaited at most ``chain_timeout``. Their
    certificates are verified against ``chain_ca_file`` when set, else the system's
    trust store. Raises ValueError, one line, when ``chain_ca_file`` holds no
    certificate (read here, once, at start-up).
    """
    mtqp = config.mtqp
    if not mtqp.chain or resolver is None:
        return None
    settings = ChainSettings(
        domains=mtqp.chain_domains,
        timeout=mtqp.chain_timeout,
        max_hops=mtqp.chain_max_hops,
        concurrency=mtqp.chain_concurrency,
        disguise=mtqp.disguise,
    )

    tls_context: TLSContextFactory = default_tls_context
    if mtqp.chain_ca_file is not None:
        path = mtqp.chain_ca_file
        try:
            tls_context = verifying_tls_context(trust_root_from_pem(path.read_bytes()))
        except (OSError, ValueError) as error:
            raise ValueError(
                f"mtqp.chain_ca_file: cannot use {path} ({error}); give a PEM CA bundle"
            ) from None

    def make_client(tls: TLSMode) -> TrackingClient:
        return TrackingClient(
            reactor,
            resolver,
            tls=tls,
            tls_context=tls_context,
            reply_timeout=settings.timeout,
            connect_timeout=min(settings.timeout, DEFAULT_CONNECT_TIMEOUT),
            max_hops=1,
        )

    return Gatherer(settings, ClientAsker(make_client), reactor, config.hostname)
