"""SMTP and LMTP transports: connect to a next hop's servers, send, turn replies into outcomes."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from weakref import WeakKeyDictionary

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mtrkmta.delivery.interfaces import (
    Attempt,
    ITransport,
    NextHop,
    RecipientOutcome,
    Relay,
    Server,
    Timing,
)
from mtrkmta.envelope import BINARYMIME
from mtrkmta.faults import IFaults, NoFaults
from mtrkmta.lmtp.client import LMTPClient
from mtrkmta.metrics import IMetrics, NoMetrics
from mtrkmta.reportfields import dns_mta
from mtrkmta.smtp.client import (
    ClientSettings,
    ClientTimeouts,
    OutgoingTransaction,
    RecipientReply,
    SessionError,
    SMTPClient,
    opportunistic_tls,
)
from mtrkmta.smtp.outbound import (
    binarymime_status,
    deliver_by_relayed_dsn,
    deliverby_refusal,
    mail_parameters,
    n_mode_adds_delay,
    rcpt_parameters,
    smtputf8_status,
)
from mtrkmta.smtp.reply import Reply
from mtrkmta.tracking.interfaces import RecipientState

log = Logger()

DIAGNOSTIC_TYPE = "x-mtrkmta"
"""Diagnostic-Code type for failures without an SMTP reply (connection refused, timeout)."""


@dataclass(frozen=True, slots=True)
class SMTPTransportSettings:
    """What the SMTP/LMTP transports need.

    ``default_retention`` (seconds) is the base of the MTRK timeout sent on when
    none was requested (project decision, doc/conformance.rst 3885-P5); ``idle_keep`` how long an
    idle
    connection waits for the next attempt to the same destination;
    ``max_idle_sessions`` caps the idle connections kept over all destinations.
    ``tls_context`` maps a server name to a client TLS context (see
    :func:`~mtrkmta.smtp.client.opportunistic_tls`: no certificate check).
    """

    hostname: str
    default_retention: float
    timeouts: ClientTimeouts = field(default_factory=ClientTimeouts)
    tls_context: Callable[[str], Any] = opportunistic_tls
    idle_keep: float = 5.0
    max_idle_sessions: int = 20
    data_chunk: int = 16 * 1024
    metrics: IMetrics = NoMetrics()
    chunking: bool = True  # BDAT to a hop offering CHUNKING (delivery.chunking)

    def client_settings(self) -> ClientSettings:
        return ClientSettings(
            hostname=self.hostname,
            timeouts=self.timeouts,
            tls_context=self.tls_context,
            data_chunk=self.data_chunk,
            metrics=self.metrics,
            chunking=self.chunking,
        )


def diagnostic(reply: Reply) -> str:
    """``smtp; <reply>``: the reply transcribed, lines joined by a space (RFC 3461 §9.2)."""
    lines = reply.render().decode("utf-8", "replace").split("\r\n")
    return "smtp; " + " ".join(line for line in lines if line)


class _Unreachable(Exception):
    """No server of the next hop would take mail: why, as a deferral; ``relay`` the
    last server connected to, when one answered (a refused greeting, EHLO or TLS)."""

    def __init__(
        self, status: str, diagnostic: str, server: str | None, relay: Relay | None = None
    ) -> None:
        super().__init__(diagnostic)
        self.status = status
        self.diagnostic = diagnostic
        self.server = server
        self.relay = relay


@dataclass(slots=True)
class _Idle:
    key: tuple[Any, ...]
    session: SMTPClient
    timer: IDelayedCall | None = None


def host_name(server_name: str) -> str:
    """A server's name as the log writes it before ``[address]``: a domain literal
    (``[192.0.2.1]``) without its brackets, as Postfix writes it."""
    if server_name.startswith("[") and server_name.endswith("]"):
        return server_name[1:-1]
    return server_name


def relay_of(server_name: str, peer: IAddress) -> Relay:
    """The delivery log's ``relay=`` for a connection to ``peer``: ``host[address]:port``,
    a unix socket ``host[path]``."""
    host = host_name(server_name)
    if isinstance(peer, (IPv4Address, IPv6Address)):
        return Relay(host, peer.host, peer.port)
    if isinstance(peer, UNIXAddress) and peer.name is not None:
        path = peer.name.decode("utf-8", "replace") if isinstance(peer.name, bytes) else peer.name
        return Relay(host, path)
    return Relay(host, str(peer))


_UNESCAPED_COLON = re.compile(r"(?<!\\):")


def target(server: Server) -> str:
    """What a connection to ``server`` goes to, as a failure names it: ``host[address]:port``
    from its endpoint description (``tcp:host=127.0.0.1:port=2999`` of a server named
    ``127.0.0.1`` is ``127.0.0.1[127.0.0.1]:2999``), a unix socket ``host[path]``."""
    kind, _, rest = server.endpoint.partition(":")
    params: dict[str, str] = {}
    for part in _UNESCAPED_COLON.split(rest):
        key, sep, value = part.partition("=")
        if sep:
            params[key] = value.replace("\\:", ":").replace("\\\\", "\\")
    host = host_name(server.name)
    if kind == "unix" and "path" in params:
        return str(Relay(host, params["path"]))
    if "host" in params:
        port = params.get("port", "")
        return str(Relay(host, params["host"], int(port) if port.isdigit() else None))
    return host


def connect_failure(error: BaseException) -> str:
    """Why a connection failed, as the system says it (``Connection refused``)."""
    if isinstance(error, (DeferredTimeout, ConnectTimeout)):
        return "Connection timed out"
    if isinstance(error, ConnectError):
        if error.osError:
            return os.strerror(error.osError)
        if error.args and error.args[0]:
            return str(error.args[0])
    return str(error) or type(error).__name__


def _key(hop: NextHop) -> tuple[Any, ...]:
    return (hop.transport, hop.destination, hop.tls, hop.servers, hop.ca, hop.auth)


def _describe(error: SessionError) -> tuple[str, str]:
    """Status and diagnostic of a session failure: the reply that caused it, or what happened."""
    if error.reply is not None:
        return error.status, diagnostic(error.reply)
    return error.status, f"{DIAGNOSTIC_TYPE}; {error.message}"


def _error_outcome(
    index: int, error: SessionError | _Unreachable, server: str | None, *, unknown: bool = False
) -> RecipientOutcome:
    if isinstance(error, _Unreachable):
        status, text, server = error.status, error.diagnostic, error.server
    else:
        status, text = _describe(error)
    if unknown:
        status, text = "4.4.2", f"{text} after the final dot: the message may have been delivered"
    return RecipientOutcome(
        index=index,
        state=RecipientState.DEFERRED,
        status=status,
        diagnostic=text,
        remote_mta=dns_mta(server) if server else None,
        unknown=unknown,
    )


@implementer(ITransport)
class SMTPTransport:
    """Relays attempts over SMTP, trying the next hop's servers in order.

    A server is skipped on a connection failure or timeout, on a 4xx or 5xx greeting, on
    a refused EHLO+HELO, with TLS policy ``encrypt`` or ``verify`` when TLS cannot be
    had (or, with ``verify``, the certificate fails), and with the hop's ``auth`` when
    AUTH is not offered or refused (4.7.x); when every server fails, all recipients are
    DEFERRED with the last error. Recipients go in transactions of at most
    ``max_recipients`` on one connection. Outcomes per recipient (RFC 3885 §3.3, RFC
    3886 §3.3.3, RFC 2033 §4.2):

    * accepted with MTRK forwarded -> TRANSFERRED 2.4.0, ``certifier_forwarded``;
    * accepted otherwise -> RELAYED 2.1.9 (LMTP: DELIVERED 2.1.5);
    * 4xx -> DEFERRED with the reply's enhanced code or 4.0.0; 5xx -> FAILED with
      its enhanced code or 5.0.0; a refused MAIL decides for every recipient, a
      refused DATA for every accepted one;
    * connection lost (or timed out) after the final dot, before the reply ->
      DEFERRED 4.4.2 with ``unknown=True``: the next hop may have taken the
      message, so the retry may deliver it twice (RFC 1047); the alternative,
      treating it as delivered, could lose it;
    * a message that needs SMTPUTF8 (non-ASCII addresses or header) for a hop
      without it -> FAILED 5.6.7 / 5.6.9 (RFC 6531 §3.2).

    Diagnostics are ``smtp; <reply>``, or ``x-mtrkmta; <what happened>`` when no
    reply explains the failure; Remote-MTA is ``dns; <server name>``, an address as a
    domain-literal, ``dns; [192.0.2.1]`` (RFC 3461 §9.3).

    An idle connection is kept ``idle_keep`` seconds per destination and reused by
    the next attempt (RSET first); one that turns out dead before MAIL was
    answered is replaced by a fresh connection.
    """

    client_class: type[SMTPClient] = SMTPClient
    accepted_state = RecipientState.RELAYED
    accepted_status = "2.1.9"

    def __init__(
        self,
        reactor: Any,
        settings: SMTPTransportSettings,
        clock: IReactorTime | None = None,
        faults: IFaults = NoFaults(),
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.faults = faults  # told each named step (mtrkmta.faults.POINTS)
        self.clock: IReactorTime = clock if clock is not None else reactor
        self._client_settings = settings.client_settings()
        self._idle: list[_Idle] = []
        self._sessions: set[SMTPClient] = set()
        self._relays: WeakKeyDictionary[SMTPClient, Relay] = WeakKeyDictionary()
        self._in_flight: set[Deferred[list[RecipientOutcome]]] = set()
        self._closing = False

    # -- ITransport -------------------------------------------------------------

    def deliver(self, attempt: Attempt) -> Deferred[list[RecipientOutcome]]:
        if self._closing:
            error = _Unreachable("4.3.2", f"{DIAGNOSTIC_TYPE}; transport is shutting down", None)
            return succeed([_error_outcome(i, error, None) for i in attempt.recipients])
        d = ensureDeferred(self._deliver(attempt))
        self._in_flight.add(d)

        def done(result: list[RecipientOutcome]) -> list[RecipientOutcome]:
            self._in_flight.discard(d)
            return result

        return d.addCallback(done)

    def close(self) -> Deferred[None]:
        return ensureDeferred(self._close())

    async def _close(self) -> None:
        self._closing = True
        idle, self._idle = self._idle, []
        for entry in idle:
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
            entry.session.close()
        if self._in_flight:
            await DeferredList(list(self._in_flight), consumeErrors=True)
        closing = [session.close() for session in list(self._sessions)]
        if closing:
            await DeferredList(closing, consumeErrors=True)

    def abort(self) -> None:
        """Drop every connection now (shutdown): the attempts in flight end as deferrals."""
        for session in list(self._sessions):
            if session.transport is not None:
                session.wire.abortConnection()

    @property
    def idle_sessions(self) -> int:
        """How many idle connections are kept for reuse."""
        return len(self._idle)

    # -- one attempt --------------------------------------------------------------

    async def _deliver(self, attempt: Attempt) -> list[RecipientOutcome]:
        try:
            return await self._deliver_batches(attempt)
        except Exception:
            log.failure(
                "{queue_id}: {kind} delivery failed unexpectedly",
                queue_id=attempt.envelope.queue_id,
                kind=attempt.next_hop.transport,
            )
            return [
                RecipientOutcome(i, RecipientState.DEFERRED, "4.3.0", None)
                for i in attempt.recipients
            ]

    async def _deliver_batches(self, attempt: Attempt) -> list[RecipientOutcome]:
        hop = attempt.next_hop
        size = max(1, hop.max_recipients)
        recipients = attempt.recipients
        batches = [recipients[i : i + size] for i in range(0, len(recipients), size)]
        outcomes: list[RecipientOutcome] = []
        session: SMTPClient | None = None
        try:
            for number, batch in enumerate(batches):
                try:
                    session, found = await self._deliver_batch(attempt, batch, session)
                except _Unreachable as error:
                    rest = [i for later in batches[number:] for i in later]
                    tried = Timing(None, self.clock.seconds())
                    outcomes += [
                        replace(_error_outcome(i, error, None), relay=error.relay, timing=tried)
                        for i in rest
                    ]
                    break
                outcomes += found
        finally:
            if session is not None:
                self._release(hop, session)
        return outcomes

    async def _deliver_batch(
        self, attempt: Attempt, batch: tuple[int, ...], session: SMTPClient | None
    ) -> tuple[SMTPClient, list[RecipientOutcome]]:
        """Send one batch on ``session`` if still usable, else on an idle or a new one."""
        hop = attempt.next_hop
        reused = False
        if session is None or not session.usable:
            if session is not None:
                await session.close()
            session = self._take_idle(hop)
            reused = session is not None
            if session is None:
                session = await self._connect(hop)
        ready = self.clock.seconds()
        found, stale = await self._send_batch(session, attempt, batch, reused)
        if stale:  # an idle connection the server had dropped: nothing was sent
            session = await self._connect(hop)
            ready = self.clock.seconds()
            found, _ = await self._send_batch(session, attempt, batch, False)
        timing = Timing(ready, self.clock.seconds())
        relay = self._relays.get(session)
        return session, [replace(o, relay=relay, timing=timing) for o in found]

    async def _send_batch(
        self, session: SMTPClient, attempt: Attempt, batch: tuple[int, ...], reused: bool
    ) -> tuple[list[RecipientOutcome], bool]:
        """Outcomes of one transaction, and whether a reused session proved stale."""
        envelope = attempt.envelope
        remote = dns_mta(session.server_name)
        keywords = session.keywords
        if "SMTPUTF8" not in keywords:
            refusal = smtputf8_status(envelope, batch, attempt.content)
            if refusal is not None:
                return [
                    RecipientOutcome(i, RecipientState.FAILED, refusal, None, remote) for i in batch
                ], False
        refusal = binarymime_status(envelope, keywords, self.settings.chunking)
        if refusal is not None:  # RFC 3030 §3: BINARYMIME only with BDAT, to a hop offering it
            return [
                RecipientOutcome(i, RecipientState.FAILED, refusal, None, remote) for i in batch
            ], False
        # RFC 2852 §4.1.4 is about relaying: LMTP is final delivery, not a relay.
        relaying = attempt.next_hop.transport != "lmtp"
        by_refusal = deliverby_refusal(envelope, keywords, attempt.now) if relaying else None
        if by_refusal is not None:
            return [
                RecipientOutcome(i, RecipientState.FAILED, by_refusal, None, remote) for i in batch
            ], False
        add_delay = relaying and n_mode_adds_delay(envelope, keywords, attempt.now)
        mail, forwarded = mail_parameters(
            envelope,
            keywords,
            attempt.now,
            size=len(attempt.content),
            default_retention=self.settings.default_retention,
        )
        transaction = OutgoingTransaction(
            sender=envelope.sender,
            recipients=tuple(attempt.recipient(i).address for i in batch),
            content=attempt.content,
            mail_parameters=tuple(mail),
            rcpt_parameters=tuple(
                tuple(rcpt_parameters(attempt.recipient(i), keywords, add_delay=add_delay))
                for i in batch
            ),
            binary=envelope.params.body == BINARYMIME,
        )
        result = await session.send(transaction)
        self.faults.reached("transport.reply_received")
        if result.error is not None:
            await session.when_lost()
            if reused and result.mail is None and not result.dot_sent:
                return [], True
        dsn_passed = "DSN" in keywords
        outcomes = [
            self._outcome(index, decided, forwarded, dsn_passed, session.server_name, result.error)
            for index, decided in zip(batch, result.per_recipient(), strict=True)
        ]
        if relaying and envelope.params.deliver_by is not None:  # RFC 2852 §4.1.4
            outcomes = [
                replace(o, relayed_dsn=True)
                if o.state in (RecipientState.RELAYED, RecipientState.TRANSFERRED)
                and deliver_by_relayed_dsn(
                    envelope, attempt.recipient(o.index), keywords, attempt.now
                )
                else o
                for o in outcomes
            ]
        return outcomes, False

    def _outcome(
        self,
        index: int,
        decided: RecipientReply,
        forwarded: bool,
        dsn_passed: bool,
        server: str,
        error: SessionError | None,
    ) -> RecipientOutcome:
        reply = decided.reply
        if reply is None:
            failure = error or SessionError("no reply", status="4.4.2")
            return _error_outcome(index, failure, server, unknown=decided.unknown)
        remote = dns_mta(server)
        text = diagnostic(reply)
        if reply.is_positive:
            if forwarded:
                state, status = RecipientState.TRANSFERRED, "2.4.0"
            else:
                state, status = self.accepted_state, self.accepted_status
            return RecipientOutcome(
                index,
                state,
                status,
                text,
                remote,
                certifier_forwarded=forwarded,
                dsn_passed=dsn_passed,
            )
        if reply.is_permanent:
            return RecipientOutcome(
                index, RecipientState.FAILED, reply.enhanced or "5.0.0", text, remote
            )
        status = reply.enhanced if reply.is_transient and reply.enhanced else "4.0.0"
        return RecipientOutcome(index, RecipientState.DEFERRED, status, text, remote)

    # -- connections --------------------------------------------------------------

    async def _connect(self, hop: NextHop) -> SMTPClient:
        """A ready session with the first server of ``hop`` that takes one."""
        last = _Unreachable("4.4.4", f"{DIAGNOSTIC_TYPE}; next hop has no servers", None)
        for server in hop.servers:
            client = self.client_class(
                self._client_settings,
                self.clock,
                server_name=server.name,
                tls=hop.tls,
                faults=self.faults,
                auth=hop.auth,
                ca=hop.ca,
            )
            try:
                endpoint = clientFromString(self.reactor, server.endpoint)
                connecting = connectProtocol(endpoint, client)
                connecting.addTimeout(self.settings.timeouts.connect, self.clock)
                await connecting
                if client.transport is not None:
                    self._relays[client] = relay_of(server.name, client.transport.getPeer())
            except Exception as exc:  # refused, unreachable, timed out, bad description
                text = f"{DIAGNOSTIC_TYPE}; connect to {target(server)}: {connect_failure(exc)}"
                last = _Unreachable("4.4.1", text, server.name)
                continue
            self._sessions.add(client)
            client.when_lost().addCallback(lambda _, c: self._sessions.discard(c), client)
            try:
                await client.when_ready()
            except SessionError as error:
                last = _Unreachable(*_describe(error), server.name, self._relays.get(client))
                await client.close()
                continue
            return client
        raise last

    def _take_idle(self, hop: NextHop) -> SMTPClient | None:
        key = _key(hop)
        for entry in reversed(self._idle):
            if entry.key != key:
                continue
            self._idle.remove(entry)
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
            if entry.session.usable:
                return entry.session
            entry.session.close()
        return None

    def _release(self, hop: NextHop, session: SMTPClient) -> None:
        if self._closing or not session.usable or self.settings.idle_keep <= 0:
            session.close()
            return
        entry = _Idle(_key(hop), session)
        entry.timer = self.clock.callLater(self.settings.idle_keep, self._expire, entry)
        self._idle.append(entry)
        while len(self._idle) > max(0, self.settings.max_idle_sessions):
            oldest = self._idle.pop(0)
            if oldest.timer is not None and oldest.timer.active():
                oldest.timer.cancel()
            oldest.session.close()

    def _expire(self, entry: _Idle) -> None:
        if entry in self._idle:
            self._idle.remove(entry)
            entry.session.close()


class LMTPTransport(SMTPTransport):
    """Delivers attempts to an LMTP LDA (RFC 2033) with the same rules as SMTPTransport.

    After the final dot every accepted recipient gets its own reply, acted on
    independently (250/452/550 -> delivered/deferred/failed); recipients left
    without a reply when the connection drops are DEFERRED with ``unknown=True``
    (RFC 2033 §5). An LDA that advertised MTRK and got it -> TRANSFERRED 2.4.0;
    otherwise a 2xx is final delivery: DELIVERED 2.1.5 (project
    decision, doc/conformance.rst 2033-P1).
    """

    client_class = LMTPClient
    accepted_state = RecipientState.DELIVERED
    accepted_status = "2.1.5"
