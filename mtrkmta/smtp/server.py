"""The line-based ESMTP server core; LMTP is a thin variant of it (mtrkmta.lmtp.server)."""

from __future__ import annotations

import base64
import binascii
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IAddress, IReactorTime, ITLSTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from mtrkmta.auth import ChecksBusy
from mtrkmta.authlimits import guard_of
from mtrkmta.eagerwrite import write_now
from mtrkmta.envelope import BINARYMIME, ClientInfo, Envelope, MailParams, RcptParams, Recipient
from mtrkmta.faults import IFaults, NoFaults
from mtrkmta.metrics import IMetrics, NoMetrics, refusal_reason
from mtrkmta.sessionguard import COMMAND, DATA, SessionGuard
from mtrkmta.sessions import SessionTable
from mtrkmta.smtp.chunking import ChunkedContent, ChunkReader, parse_bdat
from mtrkmta.smtp.command import (
    DEFAULT_LIMITS,
    LINE_TOO_LONG,
    NOT_IMPLEMENTED,
    AddressLimits,
    parse_command,
    parse_helo,
    parse_mail,
    parse_rcpt,
    require_smtputf8,
)
from mtrkmta.smtp.deliverby import ehlo_line as deliverby_ehlo_line
from mtrkmta.smtp.extensions import advertised_keywords, render_ehlo
from mtrkmta.smtp.framing import OVERLONG, DataReader, DataResult, LineFramer
from mtrkmta.smtp.params import parse_mail_params, parse_rcpt_params
from mtrkmta.smtp.reply import Reply, SMTPError

log = Logger()

ReplyOrDeferred = Reply | Deferred[Reply]
# The end of DATA in LMTP answers once per recipient: a tuple of replies.
Answer = Reply | tuple[Reply, ...] | Deferred[Reply] | Deferred[tuple[Reply, ...]]


class ContentSink(typing.Protocol):
    """Where a message's content goes while it arrives (the spool's IIncoming)."""

    def write(self, data: bytes) -> Deferred[None] | None:
        """Append content; a Deferred asks the server to read nothing until it fires."""

    def discard(self) -> None:
        """The message will not be accepted: forget what was written."""


class IReceiver(Interface):
    """Policy and acceptance behind an SMTP/LMTP listener (the server core only parses).

    Every check returns None to allow, or the Reply to send instead; it may
    return a Deferred of either.
    """

    def check_sender(session: Session, sender: str, params: MailParams) -> Any:
        """Decide on MAIL FROM (free-space floor, rate limits, ...)."""

    def check_recipient(
        session: Session, address: str, params: RcptParams, mail: MailParams
    ) -> Any:
        """Decide on RCPT TO (relay policy, unknown local users, ...); ``mail`` is the
        transaction's MAIL parameters (a BINARYMIME body limits where it can go)."""

    def new_queue_id() -> str:
        """A fresh queue id for a message about to be received."""

    def incoming(queue_id: str) -> ContentSink:
        """Where the content of message ``queue_id`` goes as it arrives (DATA)."""

    def accept(envelope: Envelope, content: ContentSink) -> Deferred[None]:
        """Make the message whose content went to ``content`` durable; fires once it is
        fsync'd and its tracking record committed. Only then may the server say 250."""


class ICredentialsCheck(Interface):
    """What AUTH needs: a twisted.cred checker for UsernamePassword."""

    credentialInterfaces = Attribute("interfaces of credentials this checker accepts")

    def requestAvatarId(credentials: UsernamePassword) -> Deferred[bytes]:
        """Fire with the avatar id, or fail with UnauthorizedLogin."""


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What one listener needs to know; built from the configuration."""

    hostname: str
    listener: str = "smtp"  # smtp, submission or lmtp
    message_size: int = 35 * 1024 * 1024
    max_recipients: int = 1000
    command_line: int = 2048
    idle_timeout: float = 300.0  # to send one whole command line after the last reply
    data_timeout: float = 180.0  # longest pause within message content
    data_min_rate: float = 500.0  # octets per second, on average, after data_timeout
    session_time: float = 3600.0  # the whole session, whatever it does (0: no limit)
    bare_line_ends: str = "normalize"  # or "reject" (RFC 5321 §2.3.8)
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    max_received_headers: int = 100  # RFC 5321 §6.3: normally at least 100
    address_limits: AddressLimits = DEFAULT_LIMITS  # RFC 5321 §4.5.3.1 (limits.*_length)
    lenient_xtext: bool = False
    deliverby_min: int = 0  # RFC 2852 §2 min-by-time (limits.deliverby_min)
    require_auth: bool = False  # the submission listener
    tls: Any = None  # an IOpenSSLServerConnectionCreator, or None
    checker: Any = None  # an ICredentialsCheck, or None: no AUTH offered


@dataclass(slots=True)
class Session:
    """What the server knows about the client on this connection."""

    address: str
    port: int
    listener: str
    helo: str = ""
    esmtp: bool = False
    tls: bool = False
    authenticated_as: str | None = None

    @property
    def protocol_name(self) -> str:
        """The `with` keyword of the Received: header (RFC 3848)."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.authenticated_as else "")

    def client_info(self, protocol: str | None = None) -> ClientInfo:
        return ClientInfo(
            address=self.address,
            port=self.port,
            helo=self.helo,
            protocol=protocol or self.protocol_name,
            authenticated_as=self.authenticated_as,
            listener=self.listener,
        )


@dataclass(slots=True)
class IncomingTransaction:
    """The mail transaction between MAIL and the end of DATA."""

    sender: str
    params: MailParams
    recipients: list[Recipient] = field(default_factory=list)
    queue_id: str = ""  # given at DATA or the first BDAT
    chunks: ChunkedContent | None = None  # the content so far, once BDAT started (RFC 3030)


def _peer(address: IAddress) -> tuple[str, int]:
    host = getattr(address, "host", "")
    port = getattr(address, "port", 0)
    return str(host), int(port)


def _path(argument: str) -> str:
    """The address of a MAIL FROM:<a> or RCPT TO:<a> argument, as sent (for the log)."""
    return argument.partition(":")[2].strip().split(" ")[0].strip("<>")


def _reply_text(reply: Reply) -> str:
    """``554 5.7.1 Relay access denied``: a reply on one line, for the log."""
    return " ".join(str(part) for part in (reply.code, reply.enhanced, *reply.lines) if part)


# A session's count of one verb: total + REFUSED * refused. One small int per verb (the
# cached ones below 257 in a usual session), not a list of two (72 octets each).
REFUSED = 1 << 32


def _counts_text(counts: dict[str, int]) -> str:
    """``ehlo=1 mail=1 rcpt=0/1 quit=1 commands=3/4``: accepted/total per verb, as Postfix
    writes them (a count without ``/total`` had every command accepted)."""

    def one(name: str, accepted: int, total: int) -> str:
        return f"{name}={accepted}" + ("" if accepted == total else f"/{total}")

    pairs = [(verb, c % REFUSED - c // REFUSED, c % REFUSED) for verb, c in counts.items()]
    parts = [one(verb.lower(), a, t) for verb, a, t in pairs if t]
    accepted = sum(a for _, a, _ in pairs)
    return " ".join([*parts, one("commands", accepted, sum(t for _, _, t in pairs))])


def _chunks_result(chunks: ChunkedContent) -> DataResult:
    """What BDAT's chunks amount to, in the terms of DATA's checks (``_refuse_content``)."""
    return DataResult(
        content=b"",
        size=chunks.size,
        line_too_long=chunks.line_too_long,
        size_exceeded=chunks.size_exceeded,
        bare_line_ends=chunks.bare_line_ends,
        received_headers=chunks.received_headers,
        leftover=b"",
    )


HELD_REPLIES = 32
"""Replies to pipelined commands held for one write at most; more go to the transport,
whose buffer limit (``SessionGuard``) stops reading when the client does not read."""

R_OK = Reply(250, "2.0.0", ("Ok",))
R_BAD_SEQUENCE = Reply(503, "5.5.1", ("Bad sequence of commands",))
R_TOO_BIG = Reply(552, "5.3.4", ("Message size exceeds fixed maximum message size",))
R_BARE_BINARY_HEADER = Reply(
    550, "5.6.0", ("Bare CR or LF in the header section of a BINARYMIME message",)
)


@dataclass(slots=True)
class _Chunk:
    """The BDAT command being read (one attribute of the session: see SMTPServer)."""

    reader: ChunkReader
    last: bool  # BDAT ... LAST
    reply: Reply | None  # a refused BDAT: its reply once the chunk is read
    of: IncomingTransaction | None  # the transaction it was sent in, for the log


class SMTPServer(Protocol, SessionGuard):
    """One ESMTP session.

    Input is framed by the sans-IO framers, commands are parsed and replies
    rendered by the sans-IO toolkit, and policy is asked of the IReceiver.
    Commands are answered strictly in order: while a command waits for an
    asynchronous check, reading pauses and later pipelined commands wait.
    Message content streams into the receiver's sink as it arrives, so a
    session holds a bounded amount of memory whatever the client sends; time
    limits and unread replies are handled by ``SessionGuard``.

    A session has at most 29 attributes, its own and SessionGuard's, all set in
    ``__init__`` (and Twisted's ``connected`` and ``transport``, and ``session``, when
    the connection is made), so that CPython keeps every session's dictionary in the
    class's shared key table: 0.3 KiB, not 1.6 KiB, for each of 20,000 sessions. Group
    new state into an existing attribute, as ``_chunk`` does
    (tests/unit/test_session_memory.py).
    """

    hello_verbs: tuple[str, ...] = ("EHLO", "HELO")
    service_name = "ESMTP"

    def __init__(self, factory: SMTPServerFactory) -> None:
        self.factory = factory
        self.settings: ServerSettings = factory.settings
        self.receiver = factory.receiver
        self.framer = LineFramer(self.settings.command_line - 2)  # limit counts the CRLF
        self._data: DataReader | None = None
        self._sink: ContentSink | None = None
        self._data_answered = False  # the 552 went out while content still came
        self._chunk: _Chunk | None = None  # BDAT: the chunk being read (RFC 3030 §2)
        self._waiting = False
        self._closing = False
        self._shutting_down = False
        self._farewell: Reply | None = None
        self._line_handler: Callable[[bytes], ReplyOrDeferred | None] | None = None
        self.session: Session
        self.transaction: IncomingTransaction | None = None
        # For the log: total and refused per command verb (REFUSED), and the command
        # awaiting its reply.
        self._counts: dict[str, int] = {}
        self._replying_to: tuple[str, str, IncomingTransaction | None] | None = None
        # Replies held while one read's commands are answered, to leave in one write.
        self._held: list[bytes] | None = None
        self._guard_init()

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None  # set by makeConnection
        address, port = _peer(self.transport.getPeer())
        self.session = Session(address=address, port=port, listener=self.settings.listener)
        log.info(
            "{listener} connect from [{address}]:{port}",
            listener=self.session.listener,
            address=address,
            port=port,
        )
        refusal = self.factory.admit(self)
        if refusal is not None:
            self.factory.metrics.refused(
                self.session.listener, refusal_reason("CONNECT", refusal.code, refusal.enhanced)
            )
            log.info(
                "{listener} NOQUEUE: reject: CONNECT from unknown[{address}]: {reply}",
                listener=self.session.listener,
                address=address,
                reply=_reply_text(refusal),
            )
            self._send(refusal)
            self._close()
            return
        self._guard_start(self.settings.session_time)
        self._send(Reply(220, None, (f"{self.settings.hostname} {self.service_name} mtrkmta",)))
        self._expect_line(self.settings.idle_timeout)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._closing = True
        self._guard_lost()
        self._drop_content()
        self.factory.release(self)
        log.info(
            "{listener} disconnect from unknown[{address}] {counts}",
            listener=self.session.listener,
            address=self.session.address,
            counts=_counts_text(self._counts),
        )

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._data is not None and self._chunk is None:
            self._feed_data(data)
        else:
            self.framer.push(data)  # chunk octets too: _process reads them in order
        self._process()

    def shutdown(self, farewell: Reply | None = None) -> None:
        """Tell the client we are going away and close (service stop, session time).

        A command still being answered (a message being made durable) gets its
        real reply first: a client must never hear 421 for a message we keep.
        """
        if farewell is None:
            farewell = Reply(421, "4.3.2", (f"{self.settings.hostname} Service shutting down",))
        self._farewell = farewell
        self._shutting_down = True
        if not self._closing and not self._waiting:
            self._drop_content()
            self._send(farewell)
            self._close()

    # -- the command loop ---------------------------------------------------

    def _process(self) -> None:
        """Answer every complete command received; the replies to a pipelined group
        leave in one write when it is done or must wait (RFC 2920 §3.2)."""
        if self._held is not None:
            self._process_input()
            return
        self._held = []
        try:
            self._process_input()
        finally:
            self._release_replies()

    def _process_input(self) -> None:
        while not self._waiting and not self._closing and not self.output_blocked:
            if self._chunk is not None:
                # A BDAT chunk: exactly its octets are content, whatever they look like.
                rest = self.framer.take_buffer()
                if not rest:
                    return
                self._feed_chunk(rest)
                continue
            if self._data is not None:
                # Bytes received after the DATA line belong to the content (a client that
                # did not wait for 354): the framer hands them over exactly as received.
                rest = self.framer.take_buffer()
                if not rest:
                    return
                self._feed_data(rest)
                continue
            line = self.framer.next_line()
            if line is None:
                return
            if line is OVERLONG:
                if self._line_handler is not None:  # RFC 4954 §4: the SASL exchange ends
                    self._line_handler = None
                    self._send(Reply(500, "5.5.6", ("Authentication Exchange line is too long",)))
                else:
                    self._send(LINE_TOO_LONG)
                continue
            assert isinstance(line, bytes)
            handler = self._line_handler
            if handler is not None:
                self._line_handler = None
                self._answer(handler(line))
            else:
                self._answer(self._dispatch(line))
            if (
                self._data is None
                and self._chunk is None
                and not self._waiting
                and not self._closing
            ):
                self._expect_line(self.settings.idle_timeout)

    def _answer(self, result: Answer | None) -> None:
        if result is None:
            return
        if not isinstance(result, Deferred):
            self._send(result)
            return
        self._waiting = True
        self._stop_phase()  # the client waits for us now, not we for it
        self._pause_reading("answer")
        result.addCallbacks(self._answered, self._answer_failed)

    def _answer_failed(self, failure: Failure) -> None:
        self._answered(self._internal_error(failure))

    def _answered(self, reply: Reply | tuple[Reply, ...] | None) -> None:
        self._waiting = False
        if self._closing:
            return
        outer = self._held is None  # else fired at once, inside _process
        if outer:  # this reply and those to commands already received: one write
            self._held = []
        try:
            if reply is not None:
                self._send(reply)
            if self._shutting_down:
                self.shutdown(self._farewell)
                return
            self._expect_line(self.settings.idle_timeout)
            self._resume_reading("answer")
            self._process()
        finally:
            if outer:
                self._release_replies()

    def _output_drained(self) -> None:
        self._process()

    def _wake_step(self) -> float:
        """DATA starts with ``data_timeout``: the timer never sleeps longer (SessionGuard)."""
        return self.settings.data_timeout or math.inf

    def _internal_error(self, failure: Failure) -> Reply:
        log.failure("internal error in {listener} session", failure, listener=self.session.listener)
        return Reply(451, "4.3.0", ("Internal error; try again later",))

    def _dispatch(self, line: bytes) -> ReplyOrDeferred | None:
        self._replying_to = ("unknown", "", None)
        try:
            command = parse_command(line, self.settings.command_line)
            method = getattr(self, "smtp_" + command.verb, None)
            if method is None or not command.verb.isalpha():
                if command.verb in NOT_IMPLEMENTED:
                    return Reply(502, "5.5.1", (f"{command.verb} not implemented",))
                return Reply(500, "5.5.1", ("Command unrecognized",))
            self._replying_to = (command.verb, command.argument, None)
            return method(command.argument)
        except SMTPError as error:
            return error.reply

    def _send(self, reply: Reply | tuple[Reply, ...]) -> None:
        assert self.transport is not None
        if self._replying_to is not None:
            self._replied(self._replying_to, reply if isinstance(reply, Reply) else reply[0])
            self._replying_to = None
        if isinstance(reply, Reply):
            self._write(reply.render())
        else:
            self._write(b"".join(r.render() for r in reply))

    def _write(self, data: bytes) -> None:
        """Send ``data`` now, or after the commands being answered (``_process``)."""
        held = self._held
        if held is None:
            write_now(self.transport, data)
            return
        held.append(data)
        if len(held) >= HELD_REPLIES:  # the transport's buffer decides when reading stops
            self._flush_replies()

    def _release_replies(self) -> None:
        """Send the replies held so far; stop holding."""
        self._flush_replies()
        self._held = None

    def _flush_replies(self) -> None:
        """Send the replies held so far and go on holding (before TLS starts, or closing)."""
        held = self._held
        if held:
            data = b"".join(held)
            held.clear()
            write_now(self.transport, data)

    def _close(self) -> None:
        self._flush_replies()
        self._guard_close()

    def _replied(self, command: tuple[str, str, IncomingTransaction | None], reply: Reply) -> None:
        """Count ``command`` as accepted or not; log a refused MAIL, RCPT, DATA or content."""
        verb, argument, transaction = command
        last_chunk = verb == "END-OF-MESSAGE" and transaction is not None and transaction.chunks
        if verb != "END-OF-MESSAGE" or last_chunk:  # BDAT LAST counts with its final reply
            key = "BDAT" if last_chunk else verb
            self._counts[key] = self._counts.get(key, 0) + (1 if reply.code < 400 else 1 + REFUSED)
        if reply.code < 400 or verb not in ("MAIL", "RCPT", "DATA", "BDAT", "END-OF-MESSAGE"):
            return
        reason = refusal_reason(verb, reply.code, reply.enhanced)
        self.factory.metrics.refused(self.session.listener, reason)
        transaction = transaction or self.transaction
        sender = _path(argument) if verb == "MAIL" else transaction.sender if transaction else None
        details = "" if sender is None else f" from=<{sender}>"
        details += f" to=<{_path(argument)}>" if verb == "RCPT" else ""
        queue_id = (
            transaction.queue_id if transaction is not None and transaction.queue_id else "NOQUEUE"
        )
        log.info(
            "{listener} {queue_id}: reject: {verb} from unknown[{address}]: {reply};{details}"
            " proto={proto} helo=<{helo}>",
            listener=self.session.listener,
            queue_id=queue_id,
            verb=verb,
            address=self.session.address,
            reply=_reply_text(reply),
            details=details,
            proto=self._with_protocol(),
            helo=self.session.helo,
        )

    # -- time limits (SessionGuard) ----------------------------------------------

    def _deadline_passed(self, phase: str) -> None:
        if self._closing:
            return
        host = self.settings.hostname
        if phase == COMMAND:
            text = f"{host} Idle timeout, closing"
        elif phase == DATA:
            text = f"{host} Timeout: message content too slow, closing"
        else:
            text = f"{host} Session time limit reached, closing"
        log.info(
            "{listener} session from [{address}] ended: {phase} time limit",
            listener=self.session.listener,
            address=self.session.address,
            phase=phase,
        )
        self.shutdown(Reply(421, "4.4.2", (text,)))

    # -- greeting and session commands -----------------------------------------

    def keywords(self) -> list[str]:
        """The EHLO/LHLO keywords in force for this session, in advertising order."""
        words = [
            "PIPELINING",
            f"SIZE {self.settings.message_size}",
            "8BITMIME",
            "CHUNKING",  # RFC 3030
            "BINARYMIME",  # RFC 3030 §3: only with CHUNKING (BODY=BINARYMIME goes by BDAT)
            "ENHANCEDSTATUSCODES",
            "DSN",
            "MTRK",
            "SMTPUTF8",
        ]
        if self.settings.listener != "lmtp":  # RFC 2852: a relay's deadline, not LMTP's
            words.append(deliverby_ehlo_line(self.settings.deliverby_min))
        if self.settings.tls is not None and not self.session.tls:
            words.append("STARTTLS")
        if self._auth_offered():
            words.append("AUTH PLAIN LOGIN")
        return words

    def advertised(self) -> frozenset[str]:
        """Keywords whose MAIL/RCPT parameters this session accepts."""
        if not self.session.esmtp:
            return frozenset()
        return advertised_keywords(self.keywords())

    def _auth_offered(self) -> bool:
        return self.settings.checker is not None and self.session.tls

    def _hello(self, argument: str, esmtp: bool, verb: str) -> Reply:
        name = parse_helo(argument, verb=verb, max_length=self.settings.address_limits.helo)
        self.transaction = None
        self._drop_content()
        self.session.helo = name
        self.session.esmtp = esmtp
        if not esmtp:
            return Reply(250, None, (self.settings.hostname,))
        return render_ehlo(self.settings.hostname, self.keywords())

    def smtp_EHLO(self, argument: str) -> Reply:
        return self._hello(argument, esmtp=True, verb="EHLO")

    def smtp_HELO(self, argument: str) -> Reply:
        return self._hello(argument, esmtp=False, verb="HELO")

    def smtp_NOOP(self, argument: str) -> Reply:
        return R_OK

    def smtp_RSET(self, argument: str) -> Reply:
        if argument.strip():
            return Reply(501, "5.5.4", ("Syntax: RSET",))
        self.transaction = None
        self._drop_content()
        return R_OK

    def smtp_QUIT(self, argument: str) -> Reply | None:
        if argument.strip():  # RFC 5321 §4.1.1.10: QUIT takes no argument (§4.3.2: 501)
            return Reply(501, "5.5.4", ("Syntax: QUIT",))
        self._send(Reply(221, "2.0.0", (f"{self.settings.hostname} Bye",)))
        self._close()
        return None

    def smtp_VRFY(self, argument: str) -> Reply:
        if not argument.strip():
            return Reply(501, "5.5.4", ("Syntax: VRFY address",))
        return Reply(
            252, "2.5.0", ("Cannot VRFY user, but will accept message and attempt delivery",)
        )

    def smtp_HELP(self, argument: str) -> Reply:
        return self.factory.help

    @classmethod
    def help_reply(cls) -> Reply:
        """The answer to HELP: the verbs this kind of session knows."""
        verbs = " ".join(
            sorted(name[5:] for name in dir(cls) if name.startswith("smtp_") and name[5:].isupper())
        )
        return Reply(214, "2.0.0", (f"Commands: {verbs}", "See RFC 5321"))

    # -- STARTTLS (RFC 3207) ---------------------------------------------------

    def smtp_STARTTLS(self, argument: str) -> Reply | None:
        if self.settings.tls is None:
            return Reply(502, "5.5.1", ("STARTTLS not available",))
        if self.session.tls:
            return Reply(503, "5.5.1", ("TLS already active",))
        if argument.strip():
            return Reply(501, "5.5.4", ("Syntax: STARTTLS",))
        self._send(Reply(220, "2.0.0", ("Ready to start TLS",)))
        self._flush_replies()  # in clear, before TLS starts
        # Nothing the client sent in clear after STARTTLS may run under TLS.
        self.framer.reset()
        ITLSTransport(self.transport).startTLS(self.settings.tls)
        self.factory.metrics.tls_session("in")
        self.session = Session(
            address=self.session.address,
            port=self.session.port,
            listener=self.session.listener,
            tls=True,
        )
        self.transaction = None
        self._drop_content()
        return None

    # -- AUTH (RFC 4954) -------------------------------------------------------

    _auth_failures = 0  # failed AUTH attempts on this connection (STARTTLS keeps them)

    def smtp_AUTH(self, argument: str) -> ReplyOrDeferred | None:
        if self.settings.checker is None:
            return Reply(502, "5.5.1", ("AUTH not available",))
        if not self.session.tls:
            return Reply(
                538, "5.7.11", ("Encryption required for requested authentication mechanism",)
            )
        if not self.session.esmtp:
            return R_BAD_SEQUENCE
        if self.session.authenticated_as is not None:
            return Reply(503, "5.5.1", ("Already authenticated",))
        if self.transaction is not None:
            return Reply(503, "5.5.1", ("AUTH not permitted during a mail transaction",))
        words = argument.split()
        if not words or len(words) > 2:
            return Reply(501, "5.5.4", ("Syntax: AUTH mechanism [initial-response]",))
        mechanism = words[0].upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            return Reply(504, "5.5.4", ("Unrecognized authentication type",))
        initial: bytes | None = None
        if len(words) == 2:
            try:
                # RFC 4954 §4: the initial response is base64, hence ASCII.
                initial = words[1].encode("ascii")
            except UnicodeEncodeError:
                return Reply(501, "5.5.2", ("Cannot decode response",))
        # An address with too many recent failures is refused before any password check.
        d = guard_of(self.settings.checker).refused(
            self.session.address, self.factory.clock.seconds()
        )
        return self._auth_settled(d.addCallback(self._auth_admitted, mechanism, initial))

    def _auth_settled(self, d: Deferred[Any]) -> Any:
        """``d``'s result if it has one already (a store or checker that answers at once),
        else ``d``: a session closed on the spot must not be paused afterwards."""
        settled: list[Any] = []

        def keep(result: Any) -> Any:
            settled.append(result)
            return result

        d.addCallback(keep)
        return settled[0] if settled else d

    def _auth_admitted(
        self, refused: bool, mechanism: str, initial: bytes | None
    ) -> ReplyOrDeferred | None:
        if self._closing:  # gone while its address was looked up
            return None
        if refused:
            log.info(
                "{listener} AUTH refused from unknown[{address}]: too many failures",
                listener=self.session.listener,
                address=self.session.address,
            )
            self._auth_goodbye("Too many authentication failures from your address")
            return None
        if mechanism == "PLAIN":
            if initial is None:
                self._challenge(b"", self._auth_plain)
                return None
            return self._auth_plain(initial)
        if initial is None:
            self._challenge(b"Username:", self._auth_login_user)
            return None
        return self._auth_login_user(initial)

    def _auth_goodbye(self, text: str, *before: Reply) -> None:
        """Send ``before``, then 421 and close: this client may not try again now."""
        if not self._closing:
            self.factory.metrics.refused(self.session.listener, "auth")
            bye = Reply(421, "4.7.0", (f"{self.settings.hostname} {text}",))
            self._send((*before, bye))
            self._close()

    def _challenge(self, prompt: bytes, handler: Callable[[bytes], ReplyOrDeferred | None]) -> None:
        # RFC 4954 §4: continue-req = "334" SP [base64] CRLF, the space even when empty.
        self._write(b"334 " + base64.b64encode(prompt) + b"\r\n")
        self._line_handler = handler

    @staticmethod
    def _decode_response(line: bytes) -> bytes | Reply:
        if line.strip() == b"*":
            return Reply(501, "5.0.0", ("Authentication cancelled",))
        if line.strip() == b"=":
            return b""
        try:
            return base64.b64decode(line.strip(), validate=True)
        except (binascii.Error, ValueError):
            return Reply(501, "5.5.2", ("Cannot decode response",))

    def _auth_plain(self, line: bytes) -> ReplyOrDeferred | None:
        decoded = self._decode_response(line)
        if isinstance(decoded, Reply):
            return decoded
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            return Reply(501, "5.5.2", ("Malformed PLAIN response",))
        authzid, user, password = parts
        if authzid and authzid != user:
            return self._auth_failed("PLAIN", user)
        return self._check_credentials(user, password, "PLAIN")

    def _auth_login_user(self, line: bytes) -> ReplyOrDeferred | None:
        decoded = self._decode_response(line)
        if isinstance(decoded, Reply):
            return decoded

        def password(response: bytes) -> ReplyOrDeferred | None:
            secret = self._decode_response(response)
            if isinstance(secret, Reply):
                return secret
            return self._check_credentials(decoded, secret, "LOGIN")

        self._challenge(b"Password:", password)
        return None

    def _check_credentials(
        self, user: bytes, password: bytes, mechanism: str
    ) -> ReplyOrDeferred | None:
        guard = guard_of(self.settings.checker)
        d = maybeDeferred(guard.requestAvatarId, UsernamePassword(user, password))

        def ok(avatar_id: bytes) -> Reply:
            name = avatar_id.decode("utf-8") if isinstance(avatar_id, bytes) else str(avatar_id)
            self.session.authenticated_as = name
            return Reply(235, "2.7.0", ("Authentication successful",))

        def denied(failure: Failure) -> ReplyOrDeferred | None:
            if failure.check(ChecksBusy):
                # Too many checks waiting for the checker's threads: not the client's fault.
                return Reply(454, "4.7.0", ("Temporary authentication failure",))
            failure.trap(UnauthorizedLogin)
            return self._auth_failed(mechanism, user)

        return self._auth_settled(d.addCallbacks(ok, denied))

    def _auth_failed(self, mechanism: str, user: bytes) -> ReplyOrDeferred | None:
        """535, held for the delay of this failure; 421 and close after the last one allowed."""
        guard = guard_of(self.settings.checker)
        self._auth_failures += 1
        failures = self._auth_failures
        name = user.decode("utf-8", "backslashreplace")
        log.info(
            "{listener} AUTH failed from unknown[{address}]: 535 5.7.8 authentication failed;"
            " mechanism={mechanism} user=<{user}> failures={failures}",
            listener=self.session.listener,
            address=self.session.address,
            mechanism=mechanism,
            user=name,
            failures=failures,
        )
        clock = self.factory.clock
        d = guard.failed(self.session.address, clock.seconds(), failures)
        paused = d.addCallback(lambda delay: guard.pause(clock, delay))

        def reply(_: None) -> Reply | None:
            denied = Reply(535, "5.7.8", ("Authentication credentials invalid",))
            if failures < guard.limits.max_failures:
                return denied
            self._auth_goodbye("Too many authentication failures", denied)
            return None

        return self._auth_settled(paused.addCallback(reply))

    # -- the mail transaction --------------------------------------------------

    def smtp_MAIL(self, argument: str) -> ReplyOrDeferred:
        if not self.session.helo:
            return Reply(503, "5.5.1", (f"Send {self.hello_verbs[0]} first",))
        if self.transaction is not None:
            return Reply(503, "5.5.1", ("Nested MAIL command",))
        if self.settings.require_auth and self.session.authenticated_as is None:
            return Reply(530, "5.7.0", ("Authentication required",))
        sender, raw_params = parse_mail(argument, self.settings.address_limits)
        params = parse_mail_params(
            raw_params,
            advertised=self.advertised(),
            lenient_xtext=self.settings.lenient_xtext,
            min_by_time=self.settings.deliverby_min,
        )
        require_smtputf8(sender, params.smtputf8, what="sender")
        if params.size is not None and params.size > self.settings.message_size:
            return R_TOO_BIG

        def decided(refusal: Reply | None) -> Reply:
            if refusal is not None:
                return refusal
            self.transaction = IncomingTransaction(sender=sender, params=params)
            return Reply(250, "2.1.0", ("Ok",))

        return self._ask(self.receiver.check_sender(self.session, sender, params), decided)

    def smtp_RCPT(self, argument: str) -> ReplyOrDeferred:
        transaction = self.transaction
        if transaction is None:
            return Reply(503, "5.5.1", ("Need MAIL before RCPT",))
        address, raw_params = parse_rcpt(argument, self.settings.address_limits)
        params = parse_rcpt_params(
            raw_params, advertised=self.advertised(), lenient_xtext=self.settings.lenient_xtext
        )
        # RFC 6531 §3.5: judged by the SMTPUTF8 parameter of this transaction's MAIL.
        require_smtputf8(address, transaction.params.smtputf8, what="recipient")
        if len(transaction.recipients) >= self.settings.max_recipients:
            return Reply(452, "4.5.3", ("Too many recipients",))

        def decided(refusal: Reply | None) -> Reply:
            if refusal is not None:
                return refusal
            if self.transaction is transaction:
                transaction.recipients.append(Recipient(address=address, params=params))
            return Reply(250, "2.1.5", ("Ok",))

        check = self.receiver.check_recipient(self.session, address, params, transaction.params)
        return self._ask(check, decided)

    @staticmethod
    def _ask(check: Any, decided: Callable[[Reply | None], Reply]) -> ReplyOrDeferred:
        if isinstance(check, Deferred):
            return check.addCallback(decided)
        return decided(check)

    def smtp_DATA(self, argument: str) -> Reply:
        if argument.strip():
            return Reply(501, "5.5.4", ("Syntax: DATA",))
        transaction = self.transaction
        if transaction is None:
            return Reply(503, "5.5.1", ("Need MAIL command",))
        if not transaction.recipients:
            return Reply(503, "5.5.1", ("No valid recipients",))
        if transaction.chunks is not None:  # RFC 3030 §2: not both in one transaction
            return Reply(503, "5.5.1", ("DATA not allowed after BDAT; send RSET",))
        if transaction.params.body == BINARYMIME:  # RFC 3030 §3: MUST get 503
            return Reply(503, "5.5.1", ("BODY=BINARYMIME requires BDAT, not DATA",))
        try:
            queue_id = self.receiver.new_queue_id()
            sink = self.receiver.incoming(queue_id)
        except Exception:
            log.failure("cannot receive a message now")
            return Reply(451, "4.3.0", ("Could not queue the message; try again later",))
        transaction.queue_id = queue_id
        self._sink = sink
        self._data_answered = False
        self._data = DataReader(
            self.settings.message_size,
            reject_bare_line_ends=self.settings.bare_line_ends == "reject",
        )
        self._write_content(self._received_header(transaction, self.factory.clock.seconds()))
        self._expect_data(self.settings.data_timeout, self.settings.data_min_rate)
        return Reply(354, None, ("End data with <CR><LF>.<CR><LF>",))

    def smtp_BDAT(self, argument: str) -> None:
        """RFC 3030 §2: read the chunk that follows, then reply (the chunk is read even when
        the command is refused, so that the session stays in step with the client)."""
        command = parse_bdat(argument)  # 501 5.5.4, nothing read: its size is unknown
        of = self.transaction  # for the log, should the chunk be refused
        chunk = self._chunk = _Chunk(ChunkReader(command.size), command.last, None, of)
        chunk.reply = self._start_chunk(command.size)
        self._expect_data(self.settings.data_timeout, self.settings.data_min_rate)
        if chunk.reader.done:
            self._chunk_read()
        return None

    def _start_chunk(self, size: int) -> Reply | None:
        """None when the chunk is content of this transaction, else the reply to send after it."""
        transaction = self.transaction
        if not self.session.esmtp:  # CHUNKING is advertised in the EHLO/LHLO reply only
            self.transaction = None
            return Reply(503, "5.5.1", (f"Send {self.hello_verbs[0]} first: BDAT is CHUNKING",))
        if transaction is None:
            return Reply(503, "5.5.1", ("Need MAIL command",))
        if not transaction.recipients:
            return Reply(503, "5.5.1", ("No valid recipients",))
        chunks = transaction.chunks
        if chunks is None and size > self.settings.message_size:
            self.transaction = None  # too big at its first chunk: no queue id, no file
            return R_TOO_BIG
        if chunks is None:
            try:
                queue_id = self.receiver.new_queue_id()
                sink = self.receiver.incoming(queue_id)
            except Exception:
                log.failure("cannot receive a message now")
                self.transaction = None
                return Reply(451, "4.3.0", ("Could not queue the message; try again later",))
            transaction.queue_id = queue_id
            self._sink = sink
            chunks = transaction.chunks = ChunkedContent(
                self.settings.message_size,
                reject_bare_line_ends=self.settings.bare_line_ends == "reject",
                binary=transaction.params.body == BINARYMIME,
            )
            self._write_content(self._received_header(transaction, self.factory.clock.seconds()))
        if not chunks.announce(size):
            # RFC 1870 §6 / RFC 3030 §2: refused at the command; the chunk is read and dropped.
            self._drop_content()
            self.transaction = None
            return R_TOO_BIG
        return None

    def _feed_chunk(self, data: bytes) -> None:
        chunk = self._chunk
        assert chunk is not None
        reader = chunk.reader
        self._data_arrived(len(data))
        octets, rest = reader.feed(data)
        transaction = self.transaction
        if chunk.reply is None and transaction is not None and transaction.chunks:
            content = transaction.chunks.feed(octets)
            if transaction.chunks.refused:
                self._drop_content()
            else:
                self._write_content(content)
        if rest:
            self.framer.push(rest)
        if reader.done:
            self._chunk_read()

    def _chunk_read(self) -> None:
        """The whole chunk is in: the BDAT's reply (after LAST: once the message is durable)."""
        chunk = self._chunk
        assert chunk is not None
        self._chunk = None
        size = chunk.reader.size
        transaction = self.transaction
        reply = chunk.reply
        self._replying_to = ("BDAT", str(size), transaction or chunk.of)
        tail = b""
        if reply is None and transaction is not None and transaction.chunks is not None:
            chunks = transaction.chunks
            if chunk.last and not chunks.refused:
                tail = chunks.finish()
            if chunks.refused:
                # A bare CR/LF in the header section of a binary message is refused
                # whatever limits.bare_line_ends says (mtrkmta.smtp.chunking.ChunkedContent).
                reply = self._refuse_content(_chunks_result(chunks)) or R_BARE_BINARY_HEADER
            elif not chunk.last:
                reply = Reply(250, "2.0.0", (f"{size} octets received",))
        if reply is not None:
            if reply.code >= 400:
                self.transaction = None
                self._drop_content()
            self._send(reply)
            self._expect_line(self.settings.idle_timeout)
            return
        assert transaction is not None and transaction.chunks is not None
        chunks = transaction.chunks
        self._write_content(tail)
        self.transaction = None
        sink, self._sink = self._sink, None
        result = _chunks_result(chunks)
        self._replying_to = ("END-OF-MESSAGE", "", transaction)
        self._answer(self._answer_data(self._end_of_data(transaction, result, sink), transaction))
        self._resume_reading("spool")
        if not self._waiting and not self._closing:
            self._expect_line(self.settings.idle_timeout)

    def _feed_data(self, data: bytes) -> None:
        reader = self._data
        assert reader is not None
        self._data_arrived(len(data))
        result = reader.feed(data)
        if reader.refused:
            self._drop_content()
            if reader.size_exceeded and not self._data_answered:
                # Nothing more of an over-size message is kept: the client hears 552 now
                # (its one reply to the content) and the rest is read and thrown away.
                self._data_answered = True
                assert self.transaction is not None
                answer = self._answer_data(R_TOO_BIG, self.transaction)
                assert not isinstance(answer, Deferred)
                self._replying_to = ("END-OF-MESSAGE", "", self.transaction)
                self._send(answer)
        else:
            self._write_content(reader.take() if result is None else result.content)
        if result is None:
            return
        self._data = None
        self.framer.push(result.leftover)
        transaction, self.transaction = self.transaction, None
        assert transaction is not None
        if self._data_answered:
            self._drop_content()
            self._expect_line(self.settings.idle_timeout)
            return
        sink, self._sink = self._sink, None
        self._replying_to = ("END-OF-MESSAGE", "", transaction)
        self._answer(self._answer_data(self._end_of_data(transaction, result, sink), transaction))
        self._resume_reading("spool")
        if not self._waiting and not self._closing:
            self._expect_line(self.settings.idle_timeout)

    def _write_content(self, data: bytes) -> None:
        if not data or self._sink is None:
            return
        wait = self._sink.write(data)
        if wait is not None:
            self._pause_reading("spool")
            wait.addBoth(self._spool_caught_up)

    def _spool_caught_up(self, _: object) -> None:
        self._resume_reading("spool")

    def _drop_content(self) -> None:
        """Forget the content of the message being received (refused, or connection gone)."""
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.discard()
        self._resume_reading("spool")

    def _answer_data(
        self, result: Deferred[Reply] | Reply, transaction: IncomingTransaction
    ) -> Answer:
        """The answer to the end of DATA: one reply (LMTP overrides: one per recipient)."""
        return result

    def _refuse_content(self, result: DataResult) -> Reply | None:
        if result.line_too_long:
            return Reply(500, "5.5.2", ("Line too long (RFC 5321 limits lines to 998 octets)",))
        if result.size_exceeded:
            return R_TOO_BIG
        if result.bare_line_ends and self.settings.bare_line_ends == "reject":
            return Reply(550, "5.6.0", ("Bare CR or LF in message content (RFC 5321 §2.3.8)",))
        if result.received_headers > self.settings.max_received_headers:
            return Reply(554, "5.4.6", ("Too many Received: headers: mail loop detected",))
        return None

    def _end_of_data(
        self, transaction: IncomingTransaction, result: DataResult, sink: ContentSink | None
    ) -> Deferred[Reply] | Reply:
        refusal = self._refuse_content(result)
        if refusal is not None or sink is None:
            if sink is not None:
                sink.discard()
            return refusal or Reply(451, "4.3.0", ("Could not queue the message; try again later",))
        queue_id = transaction.queue_id
        envelope = Envelope(
            queue_id=queue_id,
            sender=transaction.sender,
            recipients=tuple(transaction.recipients),
            params=transaction.params,
            arrival=self.factory.clock.seconds(),
            client=self.session.client_info(self._with_protocol()),
        )
        # One callback pair: a session waiting for its 250 holds as few objects as it can
        # (20,000 final dots at once in bench/ (f)).
        return self.receiver.accept(envelope, sink).addCallbacks(
            self._accepted, self._not_accepted, (queue_id,), errbackArgs=(queue_id,)
        )

    def _accepted(self, _: object, queue_id: str) -> Reply:
        """The 250; tell the faults ``smtp.reply_sent`` once it has left: the reply is
        written right after this returns, and sent by the reactor's next pass over the
        socket, before the second round of timed calls. (Nothing is scheduled without a
        fault plan.)"""
        faults = self.factory.faults
        if not isinstance(faults, NoFaults):
            clock = self.factory.clock
            clock.callLater(0, clock.callLater, 0, faults.reached, "smtp.reply_sent")
        return Reply(250, "2.0.0", (f"Ok: queued as {queue_id}",))

    def _not_accepted(self, failure: Failure, queue_id: str) -> Reply:
        log.failure("{queue_id}: could not accept the message", failure, queue_id=queue_id)
        return Reply(451, "4.3.0", ("Could not queue the message; try again later",))

    def _with_protocol(self) -> str:
        return self.session.protocol_name

    def _received_header(self, transaction: IncomingTransaction, now: float) -> bytes:
        session = self.session
        recipients = transaction.recipients
        recipient = recipients[0].address if len(recipients) == 1 else None
        lines = [
            f"Received: from {session.helo} ([{session.address}])",
            f"\tby {self.settings.hostname} (mtrkmta) with {self._with_protocol()}"
            f" id {transaction.queue_id}",
        ]
        if recipient is not None:
            lines.append(f"\tfor <{recipient}>")
        lines[-1] += ";"
        # UTC as +0000: -0000 would say the local zone is unknown (RFC 5322 §3.3).
        lines.append("\t" + format_datetime(datetime.fromtimestamp(int(now), timezone.utc)))
        return "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n"


class SMTPServerFactory(Factory):
    """Builds sessions for one listener and enforces the connection limits."""

    protocol = SMTPServer
    noisy = False  # no "Starting factory" line in the log

    def __init__(
        self,
        settings: ServerSettings,
        receiver: Any,
        clock: IReactorTime,
        faults: IFaults = NoFaults(),
        metrics: IMetrics = NoMetrics(),
    ) -> None:
        self.settings = settings
        self.receiver = receiver
        self.clock = clock
        self.faults = faults  # told each named step (mtrkmta.faults.POINTS)
        self.metrics = metrics  # told each refusal and TLS session (mtrkmta.metrics)
        self.table = SessionTable(settings.max_connections, settings.max_connections_per_ip)
        self.help = self.protocol.help_reply()

    def buildProtocol(self, addr: IAddress | None) -> SMTPServer:
        return self.protocol(self)

    @property
    def sessions(self) -> set[SMTPServer]:
        return self.table.sessions

    def admit(self, session: SMTPServer) -> Reply | None:
        """Register a new session; return a 421 when a connection limit is reached."""
        refusal = self.table.admit(session, session.session.address)
        if refusal == "total":
            return Reply(421, "4.7.0", (f"{self.settings.hostname} Too many connections",))
        if refusal == "address":
            return Reply(421, "4.7.0", (f"{self.settings.hostname} Too many connections from you",))
        return None

    def release(self, session: SMTPServer) -> None:
        self.table.release(session, session.session.address)

    def shutdown(self) -> Deferred[None]:
        """Close every session; fires once all their connections are gone."""
        return self.table.drain()
