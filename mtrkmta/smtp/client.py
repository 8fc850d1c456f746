"""The outbound SMTP client core on Twisted: one connection, several mail transactions."""

from __future__ import annotations

import typing
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Literal, cast

from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred, fail, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPullProducer,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtrkmta.config import CAFile, RelayCredentials
from mtrkmta.eagerwrite import write_now
from mtrkmta.faults import IFaults, NoFaults
from mtrkmta.metrics import IMetrics, NoMetrics
from mtrkmta.smtp.clientauth import (
    choose_mechanism,
    failure_status,
    login_responses,
    plain_command,
    redact,
)
from mtrkmta.smtp.extensions import parse_ehlo
from mtrkmta.smtp.framing import CRLF, OVERLONG, LineFramer
from mtrkmta.smtp.outbound import (
    BDAT_CHUNK,
    END_OF_DATA,
    DotStuffer,
    bdat_chunks,
    offers_chunking,
)
from mtrkmta.smtp.reply import MalformedReply, Reply, ReplyReader
from mtrkmta.tls import VerifyingClientTLS

log = Logger()

TLSPolicy = Literal["none", "may", "encrypt", "verify"]
"""STARTTLS towards a next hop: never, when offered (``may``), required (``encrypt``), or
required with the server's certificate verified (``verify``)."""

MAX_REPLY_LINE = 4096
"""Longest reply line accepted (RFC 5321 §4.5.3.1.5 says 512; real servers exceed it)."""


def opportunistic_tls(server_name: str) -> ssl.CertificateOptions:
    """A client TLS context for opportunistic STARTTLS (RFC 7435): TLS 1.2 or later.

    It does NOT verify the server certificate: with policy ``may`` or ``encrypt``
    unauthenticated encryption beats plain text, and most MX hosts would fail
    verification. ``server_name`` is accepted so a verifying factory (e.g. one
    built on ``optionsForClientTLS``) can be passed in the settings instead.
    """
    return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    """Seconds to wait at each step; defaults from RFC 5321 §4.5.3.2.

    ``data_block`` bounds each chunk of content written (the peer must keep
    reading); ``data_end`` is the wait for the reply(ies) after the final dot.
    """

    connect: float = 30.0
    greeting: float = 300.0
    hello: float = 300.0
    starttls: float = 120.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    rset: float = 120.0
    quit: float = 60.0

    def scaled(self, factor: float) -> ClientTimeouts:
        """Every timeout multiplied by ``factor`` (tests use small values)."""
        return ClientTimeouts(**{f.name: getattr(self, f.name) * factor for f in fields(self)})


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What a client session needs: our EHLO name, timeouts, TLS context factory."""

    hostname: str
    timeouts: ClientTimeouts = field(default_factory=ClientTimeouts)
    tls_context: Callable[[str], Any] = opportunistic_tls
    data_chunk: int = 16 * 1024  # content octets per write while sending DATA or a BDAT chunk
    chunking: bool = True  # BDAT to a hop offering CHUNKING (RFC 3030); delivery.chunking
    bdat_chunk: int = BDAT_CHUNK  # content octets per BDAT chunk
    metrics: IMetrics = NoMetrics()  # told each TLS session set up (mtrkmta.metrics)


class SessionError(Exception):
    """A failure of the session as a whole, or a refusal before any transaction.

    ``status`` is the RFC 3463 code to defer with (always 4.x.x); ``reply`` the
    server's reply when one caused it (a 4xx/5xx greeting, EHLO or STARTTLS refusal).
    """

    def __init__(self, message: str, *, status: str = "4.4.2", reply: Reply | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reply = reply


def temporary_status(reply: Reply) -> str:
    """The reply's enhanced code as a 4.x.x (for deferring on a 5xx greeting), else 4.0.0."""
    if reply.enhanced is None:
        return "4.0.0"
    return "4" + reply.enhanced[1:]


@dataclass(frozen=True, slots=True)
class OutgoingTransaction:
    """One message to send on a session: envelope, ready-made parameters and content.

    ``rcpt_parameters`` has one tuple per recipient, or is empty for none at all.
    ``content`` is the message as stored (CRLF lines, not dot-stuffed); ``binary``
    marks ``BODY=BINARYMIME`` content, sent with BDAT as it is (RFC 3030 §3).
    """

    sender: str
    recipients: tuple[str, ...]
    content: bytes
    mail_parameters: tuple[str, ...] = ()
    rcpt_parameters: tuple[tuple[str, ...], ...] = ()
    binary: bool = False

    def rcpt_line(self, index: int) -> str:
        params = self.rcpt_parameters[index] if self.rcpt_parameters else ()
        return _with_params(f"RCPT TO:<{self.recipients[index]}>", params)

    def mail_line(self) -> str:
        return _with_params(f"MAIL FROM:<{self.sender}>", self.mail_parameters)


def _with_params(command: str, params: tuple[str, ...]) -> str:
    return " ".join((command, *params))


@dataclass(frozen=True, slots=True)
class RecipientReply:
    """What decided one recipient: the reply, or None with ``unknown`` when none came.

    ``unknown`` is True when the final dot went out and no reply came back (the
    message may have been delivered); otherwise a None reply means the session
    failed before this recipient's fate was decided (see ``TransactionResult.error``).
    """

    reply: Reply | None
    unknown: bool = False


@dataclass(frozen=True, slots=True)
class TransactionResult:
    """The replies of one transaction, per step; ``error`` when the session failed.

    ``final`` has one entry per recipient: the reply after the dot for accepted ones
    (the same reply for every recipient in SMTP, its own in LMTP), None otherwise.
    """

    mail: Reply | None
    rcpt: tuple[Reply | None, ...]
    data: Reply | None
    final: tuple[Reply | None, ...]
    dot_sent: bool
    error: SessionError | None

    def per_recipient(self) -> tuple[RecipientReply, ...]:
        """The deciding reply of each recipient, in order.

        A refused MAIL decides for all; then a refused RCPT; then a refused DATA
        for the accepted ones; then the reply after the final dot.
        """
        out: list[RecipientReply] = []
        for index, rcpt in enumerate(self.rcpt):
            if self.mail is not None and not self.mail.is_positive:
                out.append(RecipientReply(self.mail))
            elif rcpt is not None and not rcpt.is_positive:
                out.append(RecipientReply(rcpt))
            elif rcpt is None or self.mail is None:
                out.append(RecipientReply(None))
            elif self.data is not None and not self.data.is_intermediate:
                out.append(RecipientReply(self.data))
            elif self.final[index] is not None:
                out.append(RecipientReply(self.final[index]))
            else:
                out.append(RecipientReply(None, unknown=self.dot_sent))
        return tuple(out)


@dataclass(slots=True)
class _Progress:
    mail: Reply | None = None
    rcpt: list[Reply | None] = field(default_factory=list)
    data: Reply | None = None
    final: list[Reply | None] = field(default_factory=list)
    dot_sent: bool = False
    error: SessionError | None = None

    def accepted(self) -> list[int]:
        if self.mail is None or not self.mail.is_positive:
            return []
        return [i for i, reply in enumerate(self.rcpt) if reply is not None and reply.is_positive]

    def result(self) -> TransactionResult:
        return TransactionResult(
            mail=self.mail,
            rcpt=tuple(self.rcpt),
            data=self.data,
            final=tuple(self.final),
            dot_sent=self.dot_sent,
            error=self.error,
        )


@dataclass(slots=True)
class _Waiter:
    what: str
    timeout: float
    deferred: Deferred[Reply | SessionError]


def _stuffed_pieces(content: bytes, chunk: int) -> Iterator[tuple[bytes, bool]]:
    """The DATA payload of ``content``, dot-stuffed, ``chunk`` content octets at a time."""
    step = max(1, chunk)
    stuffer = DotStuffer()
    offset = 0
    while True:
        piece = stuffer.feed(content[offset : offset + step])
        offset += step
        if offset >= len(content):
            yield piece + stuffer.finish(), True
            return
        yield piece, False


def _slices(data: bytes, chunk: int) -> Iterator[tuple[bytes, bool]]:
    """``data`` in writes of at most ``chunk`` octets; the last one says so."""
    step = max(1, chunk)
    for start in range(0, max(len(data), 1), step):
        yield data[start : start + step], start + step >= len(data)


@implementer(IPullProducer)
class _ContentProducer:
    """Writes prepared pieces (DATA content or one BDAT chunk) as the transport drains."""

    def __init__(self, client: SMTPClient, pieces: Iterator[tuple[bytes, bool]]) -> None:
        self._client = client
        self._pieces = pieces
        self.done = False
        self.finished: Deferred[SessionError | None] = Deferred()

    def resumeProducing(self) -> None:
        if self.done:
            return
        piece, last = next(self._pieces)
        if last:
            self.done = True
        self._client._content_written(self, piece, last)

    def stopProducing(self) -> None:
        self.done = True  # the connection went away; connectionLost reports it


class Wire(typing.Protocol):
    """What a session needs of its transport beyond ITransport. Twisted's TCP, UNIX and TLS
    transports all have these methods, though TLSMemoryBIOProtocol (a ``tls:`` endpoint)
    declares neither IConsumer nor ITCPTransport, so the interfaces cannot be adapted to."""

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


@implementer(IHandshakeListener)
class SMTPClient(Protocol):
    """One outbound SMTP session: greeting, EHLO/HELO, STARTTLS, then transactions.

    Built for one server (``server_name`` is what Remote-MTA reports) under one TLS
    policy. :meth:`when_ready` fires once the session can carry mail, or fails
    with :class:`SessionError`. :meth:`send` runs transactions one after the other
    (RSET before every one but the first) and never fails: a broken session is
    reported in the result. :meth:`close` says QUIT and waits for the connection
    to go. Every wait for the server is bounded by the settings' timeouts,
    measured on the injected clock.

    TLS policy: ``none`` never starts TLS; ``may`` starts it when offered and stays
    in plain text when STARTTLS is not offered or is refused with a 4xx/5xx (the
    connection is still in step, as Postfix does); ``encrypt`` fails the session
    with 4.7.4 in both cases, and so does ``verify``, which also checks the
    certificate chain (``ca``, else the system's CAs) and that it is for
    ``server_name`` (:class:`mtrkmta.tls.VerifyingClientTLS`). A failed handshake or
    verification is a connection failure (4.7.5): nothing more is sent.

    With ``auth``, after STARTTLS and the second EHLO, AUTH PLAIN (else LOGIN) with
    those credentials (RFC 4954); any refusal, or no AUTH offered, fails the session
    with a 4.7.x (the recipients wait, as Postfix's default soft bounce). Credentials
    go only over TLS, never into an error.
    """

    hello_verb = "EHLO"
    fallback_verb: str | None = "HELO"

    def __init__(
        self,
        settings: ClientSettings,
        clock: IReactorTime,
        *,
        server_name: str,
        tls: TLSPolicy = "may",
        faults: IFaults = NoFaults(),
        auth: RelayCredentials | None = None,
        ca: CAFile | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.faults = faults  # told each named step (mtrkmta.faults.POINTS)
        self.server_name = server_name
        self.tls_policy: TLSPolicy = tls
        self.auth = auth
        self.ca = ca
        self.authenticated = False
        self._verifier: VerifyingClientTLS | None = None
        self.greeting: Reply | None = None
        self.keywords: dict[str, str] = {}
        self.esmtp = False
        self.tls_active = False
        self._framer = LineFramer(MAX_REPLY_LINE)
        self._reader = ReplyReader()
        self._waiters: deque[_Waiter] = deque()
        self._timer: IDelayedCall | None = None
        self._awaiting: _Waiter | None = None  # what the timer waits for; None: content
        self._producer: _ContentProducer | None = None
        self._error: SessionError | None = None
        self._epoch = 0
        self._connected = False
        self._lost = False
        self._ready_ok = False
        self._setup_error: SessionError | None = None
        self._ready_waiters: list[Deferred[None]] = []
        self._refused = False
        self._tls_pending = False
        self._closing = False
        self._used = False
        self._lock = DeferredLock()
        self._lost_waiters: list[Deferred[None]] = []

    # -- state ---------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """True while the session is set up, connected, in step and not closing."""
        return (
            self._ready_ok
            and self._connected
            and self._error is None
            and not self._refused
            and not self._closing
        )

    def when_ready(self) -> Deferred[None]:
        """Fires once greeting, EHLO/HELO and STARTTLS are done; fails with SessionError."""
        if self._setup_error is not None:
            return fail(self._setup_error)
        if self._ready_ok:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ready_waiters.append(d)
        return d

    def when_lost(self) -> Deferred[None]:
        """Fires once the connection is gone (at once if it never came or already went)."""
        if self._lost or self.transport is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        return d

    # -- bytes in and out ------------------------------------------------------

    @property
    def wire(self) -> Wire:
        """The transport, from makeConnection on (Twisted sets it before connectionMade)."""
        assert self.transport is not None
        return cast(Wire, self.transport)

    def connectionMade(self) -> None:
        self._connected = True
        ensureDeferred(self._handshake()).addCallbacks(self._handshake_ok, self._handshake_failed)

    def dataReceived(self, data: bytes) -> None:
        epoch = self._epoch
        for line in self._framer.feed(data):
            if self._epoch != epoch or self._error is not None:
                return  # after STARTTLS, nothing received in clear may count
            if line is OVERLONG:
                self._die(
                    SessionError(f"{self.server_name} sent an over-long reply line", status="4.5.0")
                )
                return
            assert isinstance(line, bytes)
            try:
                reply = self._reader.feed(line)
            except MalformedReply as exc:
                self._die(SessionError(f"{self.server_name}: {exc}", status="4.5.0"))
                return
            if reply is not None:
                self._take_reply(reply)

    def handshakeCompleted(self) -> None:
        self._tls_pending = False
        self.settings.metrics.tls_session("out")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._connected = False
        self._lost = True
        problem = self._verifier.problem if self._verifier is not None else None
        if problem is not None:
            message = f"TLS certificate of {self.server_name} not verified: {problem}"
            self._die(SessionError(message, status="4.7.5"))
        elif self._tls_pending:
            message = f"TLS handshake with {self.server_name} failed: {reason.getErrorMessage()}"
            self._die(SessionError(message, status="4.7.5"))
        else:
            self._die(SessionError(f"connection to {self.server_name} lost", status="4.4.2"))
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    def _take_reply(self, reply: Reply) -> None:
        if not self._waiters:
            status = temporary_status(reply) if not reply.is_positive else "4.5.0"
            self._die(
                SessionError(
                    f"unexpected reply from {self.server_name}", status=status, reply=reply
                )
            )
            return
        waiter = self._waiters.popleft()
        self._arm()
        waiter.deferred.callback(reply)

    def _write(self, line: str) -> None:
        if self._error is None:
            write_now(self.wire, line.encode("utf-8", "surrogateescape") + CRLF)

    def _expect(self, what: str, timeout: float) -> Deferred[Reply | SessionError]:
        if self._error is not None:
            return succeed(self._error)
        d: Deferred[Reply | SessionError] = Deferred()
        self._waiters.append(_Waiter(what, timeout, d))
        if len(self._waiters) == 1 and self._producer is None:
            self._arm()
        return d

    def _command(self, line: str, what: str, timeout: float) -> Deferred[Reply | SessionError]:
        self._write(line)
        return self._expect(what, timeout)

    @staticmethod
    async def _reply(waiting: Deferred[Reply | SessionError]) -> Reply:
        result = await waiting
        if isinstance(result, SessionError):
            raise result
        return result

    # -- timeouts and failure --------------------------------------------------

    def _arm(self) -> None:
        """(Re)start the one timer: for sending content, else for the oldest awaited reply.

        A running timer is moved rather than replaced: a reply per command would
        otherwise leave a cancelled call per reply in the reactor's heap.
        """
        if self._error is not None or not self._connected:
            timeout = None
        elif self._producer is not None:
            timeout, self._awaiting = self.settings.timeouts.data_block, None
        elif self._waiters:
            timeout, self._awaiting = self._waiters[0].timeout, self._waiters[0]
        else:
            timeout = None
        if timeout is None:
            if self._error is None and self._connected:
                # Idle between transactions: the timer stays (when it fires it finds
                # nothing to time out), saving a new timer and a cancel per message.
                return
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
        elif self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self.clock.callLater(timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self._producer is None and not self._waiters:
            return  # idle: nothing awaited
        awaiting = self._awaiting
        what = (
            "the server to take the message"
            if awaiting is None
            else f"the reply to {awaiting.what}"
        )
        self._die(SessionError(f"timed out waiting for {what} from {self.server_name}"))

    def _die(self, error: SessionError) -> None:
        """The session is broken: drop the connection and fail everything waiting."""
        if self._error is not None:
            return
        self._error = error
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        producer, self._producer = self._producer, None
        if self._connected:
            if producer is not None:
                self.wire.unregisterProducer()
            self.wire.abortConnection()
        waiters, self._waiters = self._waiters, deque()
        if producer is not None:
            producer.done = True
            producer.finished.callback(error)
        for waiter in waiters:
            waiter.deferred.callback(error)

    # -- session set-up --------------------------------------------------------

    async def _handshake(self) -> None:
        timeouts = self.settings.timeouts
        self.greeting = await self._reply(self._expect("the greeting", timeouts.greeting))
        if not self.greeting.is_positive:
            raise SessionError(
                f"{self.server_name} refused the connection",
                status=temporary_status(self.greeting),
                reply=self.greeting,
            )
        await self._hello()
        if self.tls_policy == "none":
            return
        required = self.tls_policy in ("encrypt", "verify")
        if "STARTTLS" not in self.keywords:
            if required:
                raise SessionError(
                    f"TLS is required, but was not offered by {self.server_name}", status="4.7.4"
                )
            return
        reply = await self._reply(self._command("STARTTLS", "STARTTLS", timeouts.starttls))
        if reply.code != 220:
            if required:
                raise SessionError(
                    f"TLS is required, but {self.server_name} refused STARTTLS",
                    status="4.7.4",
                    reply=reply,
                )
            return
        self._start_tls()
        await self._hello()
        if self.auth is not None:
            await self._authenticate(self.auth)

    async def _authenticate(self, credentials: RelayCredentials) -> None:
        """AUTH with ``credentials``, only over a finished TLS handshake (RFC 4954 §4)."""
        if not self.tls_active or self._tls_pending:
            raise SessionError(
                f"no TLS with {self.server_name}: the credentials are not sent in clear",
                status="4.7.4",
            )
        mechanism = choose_mechanism(self.keywords)
        if mechanism is None:
            offered = self.keywords.get("AUTH")
            what = f"offers AUTH {offered}, not PLAIN or LOGIN" if offered else "offers no AUTH"
            raise SessionError(
                f"{self.server_name} {what}: the credentials are not sent", status="4.7.0"
            )
        timeout = self.settings.timeouts.hello
        if mechanism == "PLAIN":
            reply = await self._reply(self._command(plain_command(credentials), "AUTH", timeout))
        else:
            reply = await self._reply(self._command("AUTH LOGIN", "AUTH", timeout))
            for response in login_responses(credentials):
                if reply.code != 334:
                    break
                reply = await self._reply(self._command(response, "AUTH", timeout))
        if reply.code == 334:  # a challenge we have no answer to: cancel (RFC 4954 §4)
            reply = await self._reply(self._command("*", "AUTH", timeout))
        if reply.code != 235:
            raise SessionError(
                f"{self.server_name} refused AUTH {mechanism}",
                status=failure_status(reply),
                reply=redact(reply, credentials),
            )
        self.authenticated = True

    def _start_tls(self) -> None:
        # Forget everything read in clear: pipelined replies after 220 are injections.
        self._epoch += 1
        self._framer.reset()
        self._reader.reset()
        self.keywords = {}
        self.esmtp = False
        self._tls_pending = True
        if self.tls_policy == "verify":
            self._verifier = VerifyingClientTLS(
                self.server_name, self.ca.pem if self.ca is not None else None
            )
            context: Any = self._verifier
        else:
            context = self.settings.tls_context(self.server_name)
        ITLSTransport(self.transport).startTLS(context)
        self.tls_active = True

    async def _hello(self) -> None:
        timeouts = self.settings.timeouts
        hostname = self.settings.hostname
        verb = self.hello_verb
        reply = await self._reply(self._command(f"{verb} {hostname}", verb, timeouts.hello))
        if reply.is_positive:
            self.keywords = parse_ehlo(reply)
            self.esmtp = True
            return
        if reply.is_permanent and self.fallback_verb is not None:
            verb = self.fallback_verb
            reply = await self._reply(self._command(f"{verb} {hostname}", verb, timeouts.hello))
            if reply.is_positive:
                self.keywords = {}
                self.esmtp = False
                return
        raise SessionError(
            f"{self.server_name} refused {verb}", status=temporary_status(reply), reply=reply
        )

    def _handshake_ok(self, _: None) -> None:
        self._ready_ok = True
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(None)

    def _handshake_failed(self, failure: Failure) -> None:
        if failure.check(SessionError):
            error = failure.value
            assert isinstance(error, SessionError)
            if error is not self._error:
                self._refused = True  # a refusal by reply: still in step, QUIT is possible
        else:
            log.failure("SMTP client set-up failed", failure)
            error = SessionError(f"internal error talking to {self.server_name}", status="4.3.0")
            self._die(error)
        self._setup_error = error
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.errback(error)

    # -- transactions ------------------------------------------------------------

    def send(self, transaction: OutgoingTransaction) -> Deferred[TransactionResult]:
        """Run one mail transaction; fires with its result, never fails."""
        return self._lock.run(lambda: ensureDeferred(self._transaction(transaction)))

    async def _transaction(self, transaction: OutgoingTransaction) -> TransactionResult:
        count = len(transaction.recipients)
        progress = _Progress(rcpt=[None] * count, final=[None] * count)
        try:
            await self._run(transaction, progress)
        except SessionError as error:
            progress.error = error
            self._die(error)
        return progress.result()

    def _final_count(self, accepted: int) -> int:
        """How many replies follow the final dot: one in SMTP."""
        return 1

    async def _run(self, transaction: OutgoingTransaction, progress: _Progress) -> None:
        timeouts = self.settings.timeouts
        if not self._ready_ok and self._setup_error is None and self._error is None:
            await self.when_ready()
        if not self.usable:
            raise self._error or SessionError(f"session with {self.server_name} is not usable")
        if self._used:
            reply = await self._reply(self._command("RSET", "RSET", timeouts.rset))
            if not reply.is_positive:
                raise SessionError(
                    f"{self.server_name} refused RSET", status=temporary_status(reply), reply=reply
                )
        self._used = True
        if offers_chunking(self.keywords, self.settings.chunking):
            await self._envelope(transaction, progress)
            accepted = progress.accepted()
            if accepted:
                await self._send_chunks(transaction, accepted, progress)
            return
        data_reply = await self._envelope(transaction, progress, then_data=True)
        if data_reply is None:
            return
        if data_reply.is_positive:
            raise SessionError(
                f"{self.server_name} answered DATA with {data_reply.code}", status="4.5.0"
            )
        progress.data = data_reply
        if not data_reply.is_intermediate:
            return
        accepted = progress.accepted()
        if not accepted:
            # Pipelined DATA accepted although nothing else was (RFC 2920 §3.1): just end it.
            write_now(self.wire, END_OF_DATA)
            for _ in range(self._final_count(0)):
                await self._reply(self._expect("the end of data", timeouts.data_end))
            return
        await self._send_content(transaction.content, accepted, progress)

    async def _envelope(
        self, transaction: OutgoingTransaction, progress: _Progress, *, then_data: bool = False
    ) -> Reply | None:
        """MAIL and every RCPT, and their replies, then (``then_data``) DATA and its reply,
        which it returns; None when DATA was not sent (MAIL refused, or no RCPT accepted,
        without PIPELINING). With PIPELINING all go in one write (RFC 2920) and the
        replies are read in order.

        BDAT is never pipelined after the RCPTs (RFC 3030 §4.2 would allow it): had every
        RCPT been refused, a BDAT already sent would need its chunk sent anyway and its
        reply read before RSET (RFC 3030 §2). Waiting for the RCPT replies costs one round
        trip and leaves nothing to discard.
        """
        timeouts = self.settings.timeouts
        count = len(transaction.recipients)
        if "PIPELINING" in self.keywords:
            lines = [transaction.mail_line(), *map(transaction.rcpt_line, range(count))]
            if then_data:
                lines.append("DATA")
            write_now(
                self.wire,
                b"".join(line.encode("utf-8", "surrogateescape") + CRLF for line in lines),
            )
            mail = self._expect("MAIL", timeouts.mail)
            rcpts = [self._expect("RCPT", timeouts.rcpt) for _ in range(count)]
            data = self._expect("DATA", timeouts.data_init) if then_data else None
            progress.mail = await self._reply(mail)
            for index, waiting in enumerate(rcpts):
                progress.rcpt[index] = await self._reply(waiting)
            return None if data is None else await self._reply(data)
        progress.mail = await self._reply(
            self._command(transaction.mail_line(), "MAIL", timeouts.mail)
        )
        if not progress.mail.is_positive:
            return None
        for index in range(count):
            line = transaction.rcpt_line(index)
            progress.rcpt[index] = await self._reply(self._command(line, "RCPT", timeouts.rcpt))
        if not then_data or not progress.accepted():
            return None
        return await self._reply(self._command("DATA", "DATA", timeouts.data_init))

    async def _send_chunks(
        self, transaction: OutgoingTransaction, accepted: list[int], progress: _Progress
    ) -> None:
        """The content as BDAT chunks (RFC 3030 §2), each chunk's reply awaited before the next.

        A non-final chunk answered with anything but 2xx ends the transaction: no more
        chunks (RFC 3030 §2), and that reply decides every accepted recipient, as a
        refused DATA does. After ``BDAT ... LAST`` come the replies a final dot gets:
        one (SMTP) or one per accepted recipient (LMTP, RFC 2033 §4.2).
        """
        timeouts = self.settings.timeouts
        chunks = bdat_chunks(
            transaction.content, self.settings.bdat_chunk, binary=transaction.binary
        )
        for command, payload in chunks:
            last = command.endswith(b" LAST\r\n")
            if last:
                pieces = _slices(command + payload, self.settings.data_chunk)
                await self._write_content(pieces, accepted, progress)
                return
            waiting = self._expect("BDAT", timeouts.data_block)
            failed = await self._produce(_slices(command + payload, self.settings.data_chunk))
            if failed is not None:
                raise failed
            reply = await self._reply(waiting)
            if not reply.is_positive:
                progress.data = reply
                return

    async def _send_content(self, content: bytes, accepted: list[int], progress: _Progress) -> None:
        pieces = _stuffed_pieces(content, self.settings.data_chunk)
        await self._write_content(pieces, accepted, progress)

    async def _produce(self, pieces: Iterator[tuple[bytes, bool]]) -> SessionError | None:
        """Write ``pieces`` as the transport drains; None once all went, else the error."""
        producer = _ContentProducer(self, pieces)
        self._producer = producer
        self._arm()
        self.wire.registerProducer(producer, False)
        return await producer.finished

    async def _write_content(
        self, pieces: Iterator[tuple[bytes, bool]], accepted: list[int], progress: _Progress
    ) -> None:
        """Write the end of the content (DATA's, or the last BDAT chunk); read the final replies."""
        timeouts = self.settings.timeouts
        # Registered first, so that a reply arriving while we still send is not unexpected.
        finals = [
            self._expect("the end of data", timeouts.data_end)
            for _ in range(self._final_count(len(accepted)))
        ]
        failed = await self._produce(pieces)
        if failed is not None:
            raise failed
        progress.dot_sent = True
        self.faults.reached("transport.data_sent")
        if len(finals) == 1:  # SMTP: one reply for every accepted recipient
            reply = await self._reply(finals[0])
            for index in accepted:
                progress.final[index] = reply
            return
        for index, waiting in zip(accepted, finals, strict=True):
            progress.final[index] = await self._reply(waiting)

    def _content_written(self, producer: _ContentProducer, piece: bytes, last: bool) -> None:
        if not last:
            if piece:
                self.wire.write(piece)
            self._arm()
            return
        self._producer = None
        self.wire.unregisterProducer()
        if piece:  # no producer waits for the buffer to drain now: it may go at once
            write_now(self.wire, piece)
        self._arm()
        producer.finished.callback(None)

    # -- the end ---------------------------------------------------------------------

    def close(self) -> Deferred[None]:
        """Say QUIT when still in step, close, and fire once the connection is gone."""
        lost = self.when_lost()
        if not self._closing:
            self._closing = True
            self._lock.run(lambda: ensureDeferred(self._quit()))
        return lost

    async def _quit(self) -> None:
        if not self._ready_ok and self._setup_error is None and self._error is None:
            try:
                await self.when_ready()  # never QUIT in the middle of the handshake
            except SessionError:
                pass
        if self._connected and self._error is None:
            try:
                await self._reply(self._command("QUIT", "QUIT", self.settings.timeouts.quit))
            except SessionError:
                return  # _die already dropped the connection
        if self._connected:
            self.wire.loseConnection()
