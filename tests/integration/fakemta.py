"""A scriptable in-process SMTP/LMTP server that records everything a client sends.

Independent of mtrkmta's server and of twisted.mail: its own line handling and
its own un-stuffing, so client tests check the wire, not our own reader.

    fake = await FakeMTA(extensions=("PIPELINING", "DSN")).start()
    ... deliver to fake.endpoint (tcp:host=127.0.0.1:port=N) ...
    fake.transactions[0].mail_params      # ["ENVID=x", ...]
    fake.transactions[0].raw_data         # stuffed bytes after 354, ".\\r\\n" included
    await fake.stop()                     # listener closed, connections gone

Replies are raw wire text without the final CRLF; ``"\\n"`` separates the lines of
a multi-line reply (``"550-5.1.1 first\\n550 5.1.1 second"``). Attributes may be
changed between (or during) connections.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from certs import pem_pair
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, clientFromString, connectProtocol
from twisted.internet.interfaces import IListeningPort, IOpenSSLContextFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mtrkmta.smtp.client import ClientSettings, SMTPClient, TLSPolicy

ALL_EXTENSIONS = (
    "PIPELINING",
    "SIZE 10240000",
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
    "DSN",
    "MTRK",
    "SMTPUTF8",
)
"""What the fake advertises by default (STARTTLS is added when ``tls=True``)."""

DOT = "DOT"
"""Pseudo-verb for the end of DATA, in ``replies``, ``drop_at`` and ``hang_at``."""

GREETING = "GREETING"
"""Pseudo-verb for the greeting, in ``drop_at`` and ``hang_at``."""

_PARAM_EXTENSION = MappingProxyType(
    {
        "SIZE": "SIZE",
        "BODY": "8BITMIME",
        "ENVID": "DSN",
        "RET": "DSN",
        "NOTIFY": "DSN",
        "ORCPT": "DSN",
        "MTRK": "MTRK",
        "SMTPUTF8": "SMTPUTF8",
        "BY": "DELIVERBY",
    }
)
_PATH = re.compile(r"(?i)(MAIL FROM|RCPT TO):<([^>]*)>(.*)")
_ESMTP_VALUE = re.compile(r"[!-<>-~]+")  # RFC 5321 §4.1.2: 1*(%d33-60 / %d62-126)
CRLF = b"\r\n"


@dataclass
class FakeTransaction:
    """One MAIL..end-of-DATA exchange as the fake saw it."""

    mail: str  # the MAIL line as received, without CRLF
    sender: str
    mail_params: list[str]
    rcpts: list[str] = field(default_factory=list)  # RCPT lines as received
    recipients: list[str] = field(default_factory=list)  # every RCPT address, refused too
    rcpt_params: list[list[str]] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)  # addresses answered 2xx
    raw_data: bytes = b""  # after 354 up to and including ".\r\n", still dot-stuffed
    content: bytes | None = None  # un-stuffed; None until the final dot arrived
    chunks: list[tuple[str, bytes]] = field(default_factory=list)  # (BDAT line, its octets)


@dataclass
class FakeSession:
    """One connection: commands and reads in order, and its transactions."""

    hellos: list[str] = field(default_factory=list)  # "EHLO name", "HELO name", "LHLO name"
    commands: list[str] = field(default_factory=list)  # every command line received
    reads: list[bytes] = field(default_factory=list)  # each dataReceived chunk (after TLS: clear)
    transactions: list[FakeTransaction] = field(default_factory=list)
    tls: bool = False
    closed: bool = False

    @property
    def hello_name(self) -> str:
        """The name given in the last EHLO/HELO/LHLO."""
        return self.hellos[-1].split(" ", 1)[1] if self.hellos else ""


def unstuff(raw: bytes) -> bytes:
    """Content of a DATA payload that ends in ``.<CRLF>`` (RFC 5321 §4.5.2)."""
    if not raw.endswith(b".\r\n"):
        raise ValueError("DATA payload does not end in .CRLF")
    body = raw[:-3]
    if not body:
        return b""
    lines = body.split(CRLF)[:-1]  # the body before the dot ends in CRLF
    return b"".join((line[1:] if line.startswith(b".") else line) + CRLF for line in lines)


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """Server TLS context (TLS 1.2+) with a fresh self-signed EC P-256 certificate."""

    def __init__(self, hostname: str) -> None:
        cert_pem, key_pem = pem_pair(hostname)
        self.certificate = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        self._context = SSL.Context(SSL.TLS_METHOD)
        self._context.set_min_proto_version(SSL.TLS1_2_VERSION)
        self._context.use_certificate(self.certificate)
        self._context.use_privatekey(key)

    def getContext(self) -> SSL.Context:
        return self._context


class FakeMTA:
    """A loopback SMTP (or LMTP, ``lmtp=True``) server for client tests.

    Configuration (plain attributes):

    * ``extensions`` EHLO/LHLO lines advertised; ``tls`` adds STARTTLS (self-signed).
    * ``greeting`` the greeting reply; after a non-2xx greeting only QUIT works.
    * ``replies`` verb -> reply, overriding the default for ``EHLO``, ``HELO``,
      ``LHLO``, ``MAIL``, ``RCPT``, ``DATA``, ``RSET``, ``STARTTLS``... and for
      ``DOT`` (after the final dot; in LMTP the default per-recipient reply).
      ``BDAT`` is the reply to a non-final chunk (RFC 3030, with ``CHUNKING`` in
      ``extensions``); ``BDAT ... LAST`` gets the ``DOT`` replies, content in ``chunks``.
    * ``rcpt_replies`` address -> reply to its RCPT.
    * ``final_replies`` address -> its reply after the final dot (LMTP).
    * ``drop_at`` verb, ``DOT`` or ``GREETING``: close instead of replying;
      with ``DOT`` in LMTP, ``replies_before_drop`` per-recipient replies go first.
    * ``hang_at`` verb, ``DOT`` or ``GREETING``: never reply (for timeouts).
    * ``stall_at`` ``DATA``: answer 354, then stop reading (for the data-block timeout).
    * ``strict_values``: a MAIL/RCPT parameter whose esmtp-value is not
      ``1*(%d33-60 / %d62-126)`` (RFC 5321 §4.1.2: no ``=``, no space or control)
      gets ``501``, as go-smtp answers a padded ``MTRK=...=``.

    MAIL/RCPT parameters of extensions that are not advertised get ``555``, as
    Postfix and Dovecot answer.
    """

    def __init__(
        self,
        reactor: Any = None,
        *,
        lmtp: bool = False,
        hostname: str = "fake.example.test",
        extensions: Sequence[str] = ALL_EXTENSIONS,
        tls: bool = False,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.lmtp = lmtp
        self.hostname = hostname
        self.extensions = tuple(extensions)
        self.tls_options = ServerTLS(hostname) if tls else None
        self.greeting = f"220 {hostname} {'LMTP' if lmtp else 'ESMTP'} fake"
        self.replies: dict[str, str] = {}
        self.rcpt_replies: dict[str, str] = {}
        self.final_replies: dict[str, str] = {}
        self.drop_at: str | None = None
        self.hang_at: str | None = None
        self.stall_at: str | None = None
        self.strict_values = False
        self.replies_before_drop = 0
        self.sessions: list[FakeSession] = []
        self._port: IListeningPort | None = None
        self._open: set[_FakeProtocol] = set()
        self._lost: list[Deferred[None]] = []

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> FakeMTA:
        """Listen on 127.0.0.1, on a free port."""
        factory = Factory.forProtocol(lambda: _FakeProtocol(self))
        endpoint = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        self._port = await endpoint.listen(factory)
        return self

    @property
    def port(self) -> int:
        assert self._port is not None, "start() first"
        return int(self._port.getHost().port)

    @property
    def endpoint(self) -> str:
        """The client endpoint description to reach this server."""
        return f"tcp:host=127.0.0.1:port={self.port}"

    async def stop(self) -> None:
        """Stop listening, drop every open connection and wait until they are gone."""
        if self._port is not None:
            port, self._port = self._port, None
            await port.stopListening()
        await self.disconnect_all()

    def disconnect_all(self) -> Deferred[Any]:
        """Abort every open connection; fires once all are gone."""
        waiting = [protocol.when_lost() for protocol in list(self._open)]
        for protocol in list(self._open):
            protocol.transport.abortConnection()
        return DeferredList(waiting) if waiting else succeed(None)

    def say(self, reply: str) -> None:
        """Send ``reply`` unsolicited on every open connection."""
        for protocol in list(self._open):
            protocol.send(reply)

    def wait_all_closed(self) -> Deferred[Any]:
        """Fires once no connection is open (at once when none is)."""
        waiting = [protocol.when_lost() for protocol in list(self._open)]
        return DeferredList(waiting) if waiting else succeed(None)

    # -- what was seen ----------------------------------------------------------

    @property
    def transactions(self) -> list[FakeTransaction]:
        """Every transaction of every session, in order."""
        return [t for session in self.sessions for t in session.transactions]

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def keywords(self, tls_active: bool) -> list[str]:
        lines = list(self.extensions)
        if self.tls_options is not None and not tls_active:
            lines.append("STARTTLS")
        return lines


class _FakeProtocol(Protocol):
    def __init__(self, server: FakeMTA) -> None:
        self.server = server
        self.session = FakeSession()
        self.buffer = b""
        self.in_data = False
        self.chunk: tuple[int, bool] | None = None  # a BDAT's (size, last) still to be read
        self.greeted_ok = True
        self.hello_verb = ""
        self.transaction: FakeTransaction | None = None
        self.hanging = False
        self.lost = False
        self.lost_waiters: list[Deferred[None]] = []

    def when_lost(self) -> Deferred[None]:
        if self.lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.lost_waiters.append(d)
        return d

    # -- connection -----------------------------------------------------------

    def connectionMade(self) -> None:
        self.server.sessions.append(self.session)
        self.server._open.add(self)
        if self._act(GREETING):
            return
        self.greeted_ok = self.server.greeting[:1] == "2"
        self.send(self.server.greeting)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        self.session.closed = True
        self.server._open.discard(self)
        waiters, self.lost_waiters = self.lost_waiters, []
        for d in waiters:
            d.callback(None)

    def send(self, reply: str) -> None:
        self.transport.write(reply.replace("\n", "\r\n").encode("utf-8") + CRLF)

    def _act(self, verb: str) -> bool:
        """Drop or hang at ``verb`` when told to; True when no reply must follow."""
        if self.server.drop_at == verb:
            self.transport.loseConnection()
            self.hanging = True
            return True
        if self.server.hang_at == verb:
            self.hanging = True
            return True
        return False

    def dataReceived(self, data: bytes) -> None:
        self.session.reads.append(data)
        if self.hanging:
            return
        self.buffer += data
        while not self.hanging:
            if self.chunk is not None:
                if not self._take_chunk():
                    return
                continue
            if self.in_data:
                if not self._take_data():
                    return
                continue
            line, sep, rest = self.buffer.partition(CRLF)
            if not sep:
                return
            self.buffer = rest
            self._command(line.decode("utf-8", "replace"))

    # -- commands ---------------------------------------------------------------

    def _reply(self, verb: str, default: str) -> None:
        if self._act(verb):
            return
        self.send(self.server.replies.get(verb, default))

    def _command(self, line: str) -> None:
        self.session.commands.append(line)
        verb = line.split(" ", 1)[0].upper()
        if not self.greeted_ok and verb != "QUIT":
            self._reply(verb, "503 5.5.1 Error: go away")
            return
        handler = getattr(self, "do_" + verb, None)
        if handler is None:
            self._reply(verb, "500 5.5.1 Error: command not recognized")
        else:
            handler(verb, line)

    def _hello(self, verb: str, line: str) -> None:
        lmtp = self.server.lmtp
        if (verb == "LHLO") != lmtp:
            self._reply(verb, "500 5.5.1 Unknown command")
            return
        self.session.hellos.append(line)
        self.transaction = None
        self.hello_verb = verb
        name = self.server.hostname
        if verb == "HELO":
            self._reply(verb, f"250 {name}")
            return
        lines = [name, *self.server.keywords(self.session.tls)]
        text = "\n".join(f"250-{item}" for item in lines[:-1]) + f"\n250 {lines[-1]}"
        self._reply(verb, text.lstrip("\n"))

    do_EHLO = do_HELO = do_LHLO = _hello

    def _advertised(self) -> set[str]:
        if self.hello_verb == "HELO":
            return set()
        return {line.split(" ", 1)[0].upper() for line in self.server.keywords(self.session.tls)}

    def _unsupported(self, params: list[str]) -> str | None:
        advertised = self._advertised()
        for param in params:
            keyword, _, value = param.partition("=")
            if _PARAM_EXTENSION.get(keyword.upper()) not in advertised:
                return f"555 5.5.4 Unsupported option: {param}"
            if self.server.strict_values and value and _ESMTP_VALUE.fullmatch(value) is None:
                return f"501 5.5.4 Malformed parameter value: {param}"
        return None

    def do_STARTTLS(self, verb: str, line: str) -> None:
        if self.server.tls_options is None or self.session.tls:
            self._reply(verb, "502 5.5.1 Error: command not implemented")
            return
        if self._act(verb):
            return
        reply = self.server.replies.get(verb, "220 2.0.0 Ready to start TLS")
        self.send(reply)
        if reply[:3] != "220":
            return
        self.buffer = b""
        self.transport.startTLS(self.server.tls_options)
        self.session.tls = True
        self.hello_verb = ""
        self.transaction = None

    def do_MAIL(self, verb: str, line: str) -> None:
        match = _PATH.fullmatch(line)
        if match is None or not self.hello_verb:
            self._reply(verb, "503 5.5.1 Error: send HELO/EHLO first")
            return
        params = match.group(3).split()
        transaction = FakeTransaction(mail=line, sender=match.group(2), mail_params=params)
        self.session.transactions.append(transaction)
        reply = self._unsupported(params) or self.server.replies.get(verb, "250 2.1.0 Ok")
        if self._act(verb):
            return
        self.send(reply)
        if reply[:1] == "2":
            self.transaction = transaction

    def do_RCPT(self, verb: str, line: str) -> None:
        match = _PATH.fullmatch(line)
        transaction = self.transaction
        if match is None or transaction is None:
            self._reply(verb, "503 5.5.1 Error: need MAIL command")
            return
        address = match.group(2)
        params = match.group(3).split()
        transaction.rcpts.append(line)
        transaction.recipients.append(address)
        transaction.rcpt_params.append(params)
        reply = (
            self._unsupported(params)
            or self.server.rcpt_replies.get(address)
            or self.server.replies.get(verb, "250 2.1.5 Ok")
        )
        if self._act(verb):
            return
        self.send(reply)
        if reply[:1] == "2":
            transaction.accepted.append(address)

    def do_DATA(self, verb: str, line: str) -> None:
        transaction = self.transaction
        if transaction is None or not transaction.accepted:
            default = "554 5.5.1 Error: no valid recipients"
        else:
            default = "354 End data with <CR><LF>.<CR><LF>"
        reply = self.server.replies.get(verb, default)
        if self._act(verb):
            return
        self.send(reply)
        if reply[:1] == "3":
            self.in_data = True
            if self.server.stall_at == verb:
                self.hanging = True
                self.transport.pauseProducing()

    def _take_data(self) -> bool:
        """Look for the end of DATA; True once it was found and handled."""
        if self.buffer.startswith(b".\r\n"):
            end = 3
        else:
            found = self.buffer.find(b"\r\n.\r\n")
            if found < 0:
                return False
            end = found + 5
        raw, self.buffer = self.buffer[:end], self.buffer[end:]
        self.in_data = False
        transaction, self.transaction = self.transaction, None
        if transaction is None:  # DATA was forced to 354 after MAIL failed
            transaction = FakeTransaction(mail="", sender="", mail_params=[])
            self.session.transactions.append(transaction)
        transaction.raw_data = raw
        transaction.content = unstuff(raw)
        self._end_of_data(transaction)
        return True

    def _end_of_data(self, transaction: FakeTransaction) -> None:
        server = self.server
        if not server.lmtp:
            self._reply(DOT, "250 2.0.0 Ok: queued as FAKE")
            return
        replies = [
            server.final_replies.get(address)
            or server.replies.get(DOT, f"250 2.0.0 <{address}> Saved")
            for address in transaction.accepted
        ]
        if server.drop_at == DOT:
            for reply in replies[: server.replies_before_drop]:
                self.send(reply)
            self._act(DOT)
            return
        if self._act(DOT):
            return
        for reply in replies:
            self.send(reply)

    def do_BDAT(self, verb: str, line: str) -> None:
        """``BDAT n [LAST]`` (RFC 3030 §2): the next n octets are content, read as they are."""
        parts = line.split(" ")
        if "CHUNKING" not in self._advertised() or len(parts) not in (2, 3):
            self._reply(verb, "500 5.5.1 Error: command not recognized")
            return
        self.chunk = (int(parts[1]), len(parts) == 3 and parts[2].upper() == "LAST")
        if self.transaction is not None:
            self.transaction.chunks.append((line, b""))

    def _take_chunk(self) -> bool:
        """Read a BDAT chunk's octets; True once they all arrived and the reply went."""
        assert self.chunk is not None
        size, last = self.chunk
        if len(self.buffer) < size:
            return False
        payload, self.buffer = self.buffer[:size], self.buffer[size:]
        self.chunk = None
        transaction = self.transaction
        if transaction is None or not transaction.accepted:
            self._reply("BDAT", "503 5.5.1 Error: no valid recipients")  # octets discarded
            return True
        line, _ = transaction.chunks[-1]
        transaction.chunks[-1] = (line, payload)
        if not last:
            reply = self.server.replies.get("BDAT", f"250 2.0.0 {size} octets received")
            if reply[:1] != "2":
                self.transaction = None
            self._reply("BDAT", reply)
            return True
        self.transaction = None
        transaction.content = b"".join(octets for _, octets in transaction.chunks)
        self._end_of_data(transaction)
        return True

    def do_RSET(self, verb: str, line: str) -> None:
        self.transaction = None
        self._reply(verb, "250 2.0.0 Ok")

    def do_NOOP(self, verb: str, line: str) -> None:
        self._reply(verb, "250 2.0.0 Ok")

    def do_QUIT(self, verb: str, line: str) -> None:
        if self._act(verb):
            return
        self.send(self.server.replies.get(verb, "221 2.0.0 Bye"))
        self.transport.loseConnection()
        self.hanging = True


class ClientHarness:
    """Fake servers and client sessions of one test; ``close()`` ends them all.

    ``settings`` are the default ClientSettings of :meth:`connect`.
    """

    def __init__(self, settings: ClientSettings, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.settings = settings
        self.fakes: list[FakeMTA] = []
        self.clients: list[SMTPClient] = []

    async def fake(self, **options: Any) -> FakeMTA:
        """Start a FakeMTA (keyword arguments as FakeMTA's)."""
        fake = await FakeMTA(self.reactor, **options).start()
        self.fakes.append(fake)
        return fake

    async def connect(
        self,
        fake: FakeMTA,
        *,
        tls: TLSPolicy = "none",
        settings: ClientSettings | None = None,
        client_class: type[SMTPClient] = SMTPClient,
    ) -> SMTPClient:
        """A client session connected to ``fake`` (its handshake may still be running)."""
        client = client_class(
            settings or self.settings, self.reactor, server_name=fake.hostname, tls=tls
        )
        self.clients.append(client)
        await connectProtocol(clientFromString(self.reactor, fake.endpoint), client)
        return client

    async def ready(self, fake: FakeMTA, **options: Any) -> SMTPClient:
        """A client session with ``fake`` that finished its handshake."""
        client = await self.connect(fake, **options)
        await client.when_ready()
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        for fake in self.fakes:
            await fake.stop()
