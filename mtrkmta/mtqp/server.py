"""The MTQP server (RFC 3887): a thin Twisted protocol answering TRACK from the tracking store."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography import x509
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IAddress, IHandshakeListener, IReactorTime, ITLSTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtrkmta.metrics import IMetrics, NoMetrics
from mtrkmta.mtqp.chain import Gatherer, inner_hosts
from mtrkmta.mtqp.protocol import (
    MAX_LINE,
    CommandError,
    Comment,
    Option,
    Quit,
    Response,
    SecretError,
    StartTLS,
    Track,
    greeting,
    parse_command,
    starttls_option,
)
from mtrkmta.queue.policy import RetryPolicy
from mtrkmta.sessionguard import SessionGuard
from mtrkmta.sessions import SessionTable
from mtrkmta.smtp.framing import OVERLONG, LineFramer
from mtrkmta.tracking.interfaces import Event, StoredMessage
from mtrkmta.tracking.status import (
    TrackingReport,
    TrackingStatusError,
    render_related,
    report_from_transactions,
)

if TYPE_CHECKING:
    from mtrkmta.config import Config

log = Logger()

MIN_IDLE_TIMEOUT = 600.0  # an autologout timer must be at least 10 minutes (3887 §2.5)
RATE_WINDOW = 60.0  # the rate limits count per minute

R_NOINFO = Response("-ERR", ("noinfo",), "No tracking information")
R_TLS_REQUIRED = Response("-ERR", ("tls-required",), "TLS required; use STARTTLS first")
R_UNAVAILABLE = Response("-TEMP", ("unavailable",), "Tracking information unavailable; try later")
R_RATE_LIMITED = Response("-TEMP", ("rate-limit",), "Too many TRACK commands; try again later")
R_LINE_TOO_LONG = Response("-BAD", (), f"Command line longer than {MAX_LINE} octets")
R_TLS_IN_PROGRESS = Response("-BAD", ("tls-in-progress",), "TLS is already active")
R_TLS_UNSUPPORTED = Response("-BAD", ("unsupported",), "STARTTLS is not available")
R_BAD_FQDN = Response("-BAD", ("bad-fqdn",), "No certificate for that name")
R_BEGIN_TLS = Response("+OK", (), "Begin TLS negotiation")
R_COMMENT = Response("+OK", (), "Ok")
R_BYE = Response("+OK", (), "Bye")
R_TOO_MANY = Response("-TEMP", ("MTQP", "unavailable"), "Too many connections; try again later")
R_TOO_MANY_FROM_YOU = Response(
    "-TEMP", ("MTQP", "unavailable"), "Too many connections from you; try again later"
)

Answer = Response | Deferred[Response] | None

_TRACK_RESULTS = {
    R_NOINFO: "not_found",
    R_TLS_REQUIRED: "tls_required",
    R_UNAVAILABLE: "unavailable",
    R_RATE_LIMITED: "rate_limited",
}


def track_result(response: Response) -> str:
    """The result label of a TRACK answer (mtrkmta.metrics.QUERY_RESULTS)."""
    if response.indicator.startswith("+OK"):
        return "found"
    return _TRACK_RESULTS.get(response, "bad_request")


@dataclass(frozen=True, slots=True)
class MTQPSettings:
    """What the MTQP listener needs; built from the configuration by :func:`settings_from_config`.

    ``tls`` is a server TLS context (None: no STARTTLS) and ``tls_names`` the
    subjectAltName dNSNames of its certificate, lower case, that STARTTLS accepts
    (RFC 3887 §6). ``track_rate`` and ``failure_rate`` limit, per client
    address and minute, TRACK commands and TRACKs answered ``noinfo``; 0 turns a
    limit off. ``retry`` gives Will-Retry-Until for recipients not tried yet.
    """

    hostname: str
    tls: Any = None
    tls_names: frozenset[str] = frozenset()
    tls_required: bool = False
    idle_timeout: float = MIN_IDLE_TIMEOUT
    session_time: float = 3600.0  # the whole session, whatever it does (0: no limit)
    track_rate: int = 60
    failure_rate: int = 10
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.idle_timeout < MIN_IDLE_TIMEOUT:
            raise ValueError(f"idle_timeout must be at least {MIN_IDLE_TIMEOUT:g} s (3887 §2.5)")
        if self.tls_required and self.tls is None:
            raise ValueError("tls_required needs a TLS context")
        if self.track_rate < 0 or self.failure_rate < 0:
            raise ValueError("rate limits must not be negative")


def certificate_names(pem: bytes) -> frozenset[str]:
    """The subjectAltName dNSNames of the first certificate in ``pem``, lower case."""
    certificate = x509.load_pem_x509_certificate(pem)
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return frozenset()
    names = extension.value.get_values_for_type(x509.DNSName)
    return frozenset(name.lower().removesuffix(".") for name in names)


def fqdn_matches(fqdn: str, names: frozenset[str]) -> bool:
    """Whether the STARTTLS FQDN is one of the certificate's dNSNames (3887 §6).

    Case-insensitive; a ``*.example.org`` name covers exactly one more label
    (RFC 6125 §6.4.3), never ``example.org`` itself.
    """
    wanted = fqdn.lower().removesuffix(".")
    if wanted in names:
        return True
    head, dot, rest = wanted.partition(".")
    return bool(head and dot and f"*.{rest}" in names)


def settings_from_config(config: Config, tls: Any) -> MTQPSettings:
    """The MTQP listener's settings; ``tls`` is the server context the mail listeners use.

    Reads the certificate file for its names (blocking, at start-up, as
    :func:`mtrkmta.tls.server_context` does).
    """
    names: frozenset[str] = frozenset()
    if tls is not None and config.tls.certificate is not None:
        names = certificate_names(config.tls.certificate.read_bytes())
    mtqp = config.mtqp
    return MTQPSettings(
        hostname=config.hostname,
        tls=tls,
        tls_names=names,
        tls_required=mtqp.tls_required,
        idle_timeout=mtqp.idle_timeout,
        session_time=mtqp.session_time,
        track_rate=mtqp.track_rate,
        failure_rate=mtqp.failure_rate,
        max_connections=config.limits.max_connections,
        max_connections_per_ip=config.limits.max_connections_per_ip,
        retry=RetryPolicy(
            first_retry=config.queue.first_retry,
            max_interval=config.queue.max_retry_interval,
            max_lifetime=config.queue.max_lifetime,
        ),
    )


class RateLimiter:
    """At most ``limit`` events per ``window`` seconds for each key (sliding window).

    ``limit`` 0 means no limit. Memory stays bounded: a key keeps at most
    ``limit`` timestamps, and keys idle for a whole window are swept out.
    """

    def __init__(self, limit: int, clock: IReactorTime, window: float = RATE_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._events: dict[str, deque[float]] = {}
        self._swept = clock.seconds()

    def allowed(self, key: str) -> bool:
        """True when one more event for ``key`` stays within the limit."""
        if not self.limit:
            return True
        events = self._events.get(key)
        if events is None:
            return True
        self._prune(events, self._clock.seconds())
        return len(events) < self.limit

    def record(self, key: str) -> float:
        """Count one event for ``key`` now; returns its time, for :meth:`forget`."""
        now = self._clock.seconds()
        if not self.limit:
            return now
        if now - self._swept >= self.window:
            self._sweep(now)
        events = self._events.setdefault(key, deque(maxlen=self.limit))
        self._prune(events, now)
        events.append(now)
        return now

    def forget(self, key: str, when: float) -> None:
        """Take back one event of ``key`` counted at ``when`` (gone already: nothing to do)."""
        events = self._events.get(key)
        if events is None:
            return
        try:
            events.remove(when)
        except ValueError:
            return
        if not events:
            del self._events[key]

    def __len__(self) -> int:
        return len(self._events)

    def _prune(self, events: deque[float], now: float) -> None:
        while events and events[0] <= now - self.window:
            events.popleft()

    def _sweep(self, now: float) -> None:
        self._swept = now
        for key in list(self._events):
            events = self._events[key]
            self._prune(events, now)
            if not events:
                del self._events[key]


def _peer(address: IAddress) -> tuple[str, int]:
    return str(getattr(address, "host", "")), int(getattr(address, "port", 0))


@implementer(IHandshakeListener)
class MTQPServer(Protocol, SessionGuard):
    """One MTQP session (RFC 3887).

    Lines are framed by the SMTP LineFramer (998 octets at most), parsed by the
    sans-IO grammar and answered strictly in order: while a TRACK waits for the
    tracking store, reading pauses and pipelined commands wait (3887 §8). After
    STARTTLS, input buffered in clear is dropped and, once the handshake is done,
    a fresh greeting without STARTTLS goes out (3887 §6.2). TRACK arguments are
    never logged (RFC 3885 §4.2, RFC 3887 §11).
    """

    def __init__(self, factory: MTQPServerFactory) -> None:
        self.factory = factory
        self.settings = factory.settings
        self.framer = LineFramer(MAX_LINE)
        self.address = ""
        self.port = 0
        self.tls_active = False
        self._handshaking = False
        self._waiting = False
        self._closing = False
        self._shutting_down = False

    # -- connection -----------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None  # set by makeConnection
        self.address, self.port = _peer(self.transport.getPeer())
        refusal = self.factory.admit(self)
        if refusal is not None:
            self._send(refusal)
            self._close()
            return
        self._guard_start(self.settings.session_time)
        self._send(self.greeting())
        self._expect_line(self.settings.idle_timeout)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._closing = True
        self._guard_lost()
        self.factory.release(self)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.framer.push(data)
        self._process()

    def handshakeCompleted(self) -> None:
        if not self._handshaking or self._closing:
            return
        self._handshaking = False
        self._send(self.greeting())
        self._expect_line(self.settings.idle_timeout)
        self._process()

    def shutdown(self) -> None:
        """Close the session (service stop); a TRACK being answered gets its answer first."""
        self._shutting_down = True
        if not self._closing and not self._waiting:
            self._close()

    def greeting(self) -> Response:
        """``+OK/MTQP``, or ``+OK+/MTQP`` listing STARTTLS while it is on offer (RFC 3887 §3)."""
        options: list[Option] = []
        if self.settings.tls is not None and not self.tls_active:
            options.append(starttls_option(required=self.settings.tls_required))
        return greeting(f"{self.settings.hostname} MTQP server ready", options=options)

    # -- the command loop -----------------------------------------------------------

    def _process(self) -> None:
        while not (self._waiting or self._closing or self._handshaking or self.output_blocked):
            line = self.framer.next_line()
            if line is None:
                return
            if line is OVERLONG:
                self._send(R_LINE_TOO_LONG)
                continue
            assert isinstance(line, bytes)
            self._answer(self._dispatch(line))
            if not (self._waiting or self._closing):
                self._expect_line(self.settings.idle_timeout)

    def _output_drained(self) -> None:
        self._process()

    def _dispatch(self, line: bytes) -> Answer:
        try:
            command = parse_command(line)
        except CommandError as error:
            return error.response
        if isinstance(command, Track):
            return self._counted(self._track(command))
        if isinstance(command, StartTLS):
            return self._starttls(command)
        if isinstance(command, Quit):
            self._send(R_BYE)
            self._close()
            return None
        assert isinstance(command, Comment)
        return R_COMMENT

    def _answer(self, answer: Answer) -> None:
        if answer is None:
            return
        if isinstance(answer, Response):
            self._send(answer)
            return
        self._waiting = True
        self._stop_phase()  # the client is waiting for us, not idle
        self._pause_reading("answer")
        answer.addCallback(self._answered)

    def _answered(self, response: Response) -> None:
        self._waiting = False
        if self._closing:
            return
        self._send(response)
        if self._shutting_down:
            self._close()
            return
        self._expect_line(self.settings.idle_timeout)
        self._resume_reading("answer")
        self._process()

    def _send(self, response: Response) -> None:
        assert self.transport is not None
        self.transport.write(response.render())

    def _close(self) -> None:
        self._guard_close()

    # -- TRACK (3887 §4) --------------------------------------------------------------

    def _track(self, command: Track) -> Answer:
        if self.settings.tls_required and not self.tls_active:
            return R_TLS_REQUIRED
        factory = self.factory
        if not factory.failures.allowed(self.address) or not factory.tracks.allowed(self.address):
            log.info("MTQP TRACK from {address} refused: rate limit", address=self.address)
            return R_RATE_LIMITED
        factory.tracks.record(self.address)
        # The attempt counts as a failure before the lookup, and is taken back only once
        # it succeeded: counted after the lookup instead, any number of concurrent TRACKs
        # would pass the check before the first of them failed (RFC 3887 §11: the
        # secret's strength is all that protects a message, so guessing is rate-limited).
        reserved = factory.failures.record(self.address)
        try:
            candidate = command.certifier()
        except SecretError:  # parse_command already checked it; never answered differently
            factory.failures.forget(self.address, reserved)
            return CommandError("mtrk-secret is not base64").response
        # The store compares in constant time and does the same work for an unknown
        # ENVID and a wrong secret: both find nothing, answered alike (RFC 3887 §4:
        # noinfo). It finds every transaction of the message (RFC 3885 §3.1).
        d: Deferred[list[StoredMessage]] = maybeDeferred(
            factory.tracking.lookup_transactions, command.envid, candidate
        )
        answered = d.addCallbacks(self._found, self._store_failed, callbackArgs=(command,))
        answered.addErrback(self._internal_error)
        return answered.addCallback(self._settle_failure, reserved)

    def _counted(self, answer: Answer) -> Answer:
        """Tell the metrics how a TRACK was answered, by the answer's kind."""

        def count(response: Response) -> Response:
            self.factory.metrics.mtqp_query(track_result(response))
            return response

        if answer is None or isinstance(answer, Response):
            return answer if answer is None else count(answer)
        return answer.addCallback(count)

    def _settle_failure(self, response: Response, reserved: float) -> Response:
        """Keep the failure counted for ``-ERR/noinfo``; anything else takes it back."""
        if response is not R_NOINFO:
            self.factory.failures.forget(self.address, reserved)
        return response

    def _found(self, transactions: list[StoredMessage], command: Track) -> Deferred[Response]:
        if not transactions:
            log.info("MTQP TRACK from {address}: no information", address=self.address)
            return succeed(R_NOINFO)
        # Each recipient's events go in its block as extension fields (RFC 3464 §2.4),
        # read in one query for every transaction of the message.
        d: Deferred[dict[str, list[Event]]] = maybeDeferred(
            self.factory.tracking.transaction_events, [m.queue_id for m in transactions]
        )
        return d.addCallbacks(
            self._report, self._store_failed, callbackArgs=(transactions, command)
        )

    def _report(
        self, events: dict[str, list[Event]], transactions: list[StoredMessage], command: Track
    ) -> Response | Deferred[Response]:
        now = self.factory.clock.seconds()
        message = transactions[0]
        retry = self.settings.retry
        try:
            report = report_from_transactions(
                transactions,
                now=now,
                retry_until=lambda m: retry.give_up_at(m.arrival),
                events=events,
            )
            chained = self._chain(report, command)
            if chained is not None:
                return chained.addCallback(self._render, transactions)
            response = Response.multiline(
                render_related([report]), text="Tracking information follows"
            )
        except (TrackingStatusError, ValueError) as error:
            log.error(
                "{queue_id}: MTQP cannot report on the message: {error}",
                queue_id=message.queue_id,
                error=str(error),
            )
            return R_UNAVAILABLE
        log.info(
            "MTQP TRACK from {address}: answered for message {queue_ids}",
            address=self.address,
            queue_ids=" ".join(m.queue_id for m in transactions),
        )
        return response

    def _chain(
        self, report: TrackingReport, command: Track
    ) -> Deferred[list[TrackingReport]] | None:
        """The inner hops' answers gathered behind ``report`` (RFC 3887 §2.4), or None when
        this server does not chain, nothing is transferred inside, or too many chained
        TRACKs are under way (the local answer alone then)."""
        factory = self.factory
        chain = factory.chain
        if chain is None or not inner_hosts([report], chain.settings):
            return None
        if factory.chaining >= chain.settings.concurrency:
            log.info(
                "MTQP TRACK from {address}: not chained, too many at once", address=self.address
            )
            return None
        factory.chaining += 1
        # The secret goes to the inner hops: under TLS only when the client used TLS.
        d = chain.gather(
            report, command.envid, command.secret, tls=self.tls_active, charge=self._charge
        )

        def release(parts: list[TrackingReport]) -> list[TrackingReport]:
            factory.chaining -= 1
            return parts

        return d.addCallback(release)

    def _charge(self) -> bool:
        """Count one inner hop asked for this client against its TRACK rate limit."""
        tracks = self.factory.tracks
        if not tracks.allowed(self.address):
            log.info(
                "MTQP TRACK from {address}: chaining stopped: rate limit", address=self.address
            )
            return False
        tracks.record(self.address)
        return True

    def _render(self, parts: list[TrackingReport], transactions: list[StoredMessage]) -> Response:
        try:
            response = Response.multiline(
                render_related(parts), text="Tracking information follows"
            )
        except (TrackingStatusError, ValueError) as error:
            log.error(
                "{queue_id}: MTQP cannot report on the message: {error}",
                queue_id=transactions[0].queue_id,
                error=str(error),
            )
            return R_UNAVAILABLE
        log.info(
            "MTQP TRACK from {address}: answered for message {queue_ids} with {n} chained part(s)",
            address=self.address,
            queue_ids=" ".join(m.queue_id for m in transactions),
            n=len(parts) - 1,
        )
        return response

    def _store_failed(self, failure: Failure) -> Response:
        # Only the exception's type: a database error may quote the query's parameters.
        log.error(
            "MTQP TRACK from {address}: tracking store unavailable ({error})",
            address=self.address,
            error=failure.type.__name__ if failure.type is not None else "unknown error",
        )
        return R_UNAVAILABLE

    def _internal_error(self, failure: Failure) -> Response:
        log.error(
            "MTQP TRACK from {address}: internal error ({error})",
            address=self.address,
            error=failure.type.__name__ if failure.type is not None else "unknown error",
        )
        return R_UNAVAILABLE

    # -- STARTTLS (3887 §6) -------------------------------------------------------------

    def _starttls(self, command: StartTLS) -> Answer:
        if self.tls_active:
            return R_TLS_IN_PROGRESS
        if self.settings.tls is None:
            return R_TLS_UNSUPPORTED
        if not fqdn_matches(command.fqdn, self.settings.tls_names):
            return R_BAD_FQDN
        self._send(R_BEGIN_TLS)
        # Nothing the client sent in clear after STARTTLS may count under TLS (3887 §6.2).
        self.framer.reset()
        self._handshaking = True
        self.tls_active = True
        ITLSTransport(self.transport).startTLS(self.settings.tls)
        self.factory.metrics.tls_session("in")
        return None

    # -- idle timeout (3887 §2.5) --------------------------------------------------------

    def _deadline_passed(self, phase: str) -> None:
        # As in POP3 (RFC 1939 §3), on which MTQP is modelled: the autologout just closes.
        if self._closing:
            return
        log.info(
            "MTQP session from {address}: {phase} time limit, closing",
            address=self.address,
            phase=phase,
        )
        if self._waiting:
            self._shutting_down = True  # the TRACK being answered gets its answer first
        else:
            self._close()


class MTQPServerFactory(Factory):
    """Builds MTQP sessions; holds the connection counts and the per-address rate limits."""

    protocol = MTQPServer
    noisy = False  # no "Starting factory" line in the log

    def __init__(
        self,
        settings: MTQPSettings,
        tracking: Any,
        clock: IReactorTime,
        metrics: IMetrics = NoMetrics(),
        chain: Gatherer | None = None,
    ) -> None:
        """``tracking`` provides ``ITrackingStore.lookup_transactions``; ``clock`` times all;
        ``metrics`` is told how each TRACK was answered; ``chain`` (None: answer for this
        node only) gathers the inner hops' answers (RFC 3887 §2.4)."""
        self.chain = chain
        self.chaining = 0  # chained TRACKs under way (at most chain.settings.concurrency)
        self.metrics = metrics
        self.settings = settings
        self.tracking = tracking
        self.clock = clock
        self.tracks = RateLimiter(settings.track_rate, clock)
        self.failures = RateLimiter(settings.failure_rate, clock)
        self.table = SessionTable(settings.max_connections, settings.max_connections_per_ip)

    def buildProtocol(self, addr: IAddress | None) -> MTQPServer:
        return self.protocol(self)

    @property
    def sessions(self) -> set[MTQPServer]:
        return self.table.sessions

    def admit(self, session: MTQPServer) -> Response | None:
        """Register a new session; a negative greeting when a connection limit is reached."""
        refusal = self.table.admit(session, session.address)
        if refusal == "total":
            return R_TOO_MANY
        if refusal == "address":
            return R_TOO_MANY_FROM_YOU
        return None

    def release(self, session: MTQPServer) -> None:
        self.table.release(session, session.address)

    def shutdown(self) -> Deferred[None]:
        """Close every session; fires once all their connections are gone."""
        return self.table.drain()
