"""The seam between the queue and the transports: next hops, attempts and outcomes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from twisted.internet.defer import Deferred
from zope.interface import Interface

from mtrkmta.config import CAFile, RelayCredentials
from mtrkmta.envelope import Envelope, Recipient
from mtrkmta.smtp.client import TLSPolicy
from mtrkmta.tracking.interfaces import RecipientState

TransportKind = Literal["smtp", "lmtp", "maildir"]


@dataclass(frozen=True, slots=True)
class Server:
    """One candidate server of a next hop.

    ``name`` is what tracking and DSNs report as Remote-MTA (``dns; <name>``, an
    address as ``[192.0.2.1]``): the MX host name, or the host of a fixed route.
    ``endpoint`` is the Twisted client endpoint description to connect to
    (``tcp:host=192.0.2.1:port=25``, ``unix:path=/run/dovecot/lmtp``).
    """

    name: str
    endpoint: str


@dataclass(frozen=True, slots=True)
class NextHop:
    """Where a group of recipients goes, as the router decided.

    ``destination`` names the hop for grouping and concurrency limits (e.g.
    ``mx:example.org`` or ``route:lmtp:unix:path=/run/dovecot/lmtp``). ``servers``
    are tried in order: on connection failure or a 4xx greeting the next one is
    tried (MX fallback). ``tls`` is the STARTTLS policy, ``ca`` what ``verify``
    trusts (None: the system's CAs), ``auth`` the credentials for AUTH, if any.
    """

    transport: TransportKind
    destination: str
    servers: tuple[Server, ...] = ()
    tls: TLSPolicy = "may"
    max_recipients: int = 50
    ca: CAFile | None = None
    auth: RelayCredentials | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt of some recipients of one message over one next hop.

    ``recipients`` are indices into ``envelope.recipients``; ``now`` is when the
    attempt starts (POSIX seconds), used to decrement the MTRK timeout.
    ``first`` is True only when no earlier attempt can have delivered any of these
    recipients: the message was accepted by this process and this is its first
    queue run. Otherwise an earlier attempt may have delivered and died before its
    outcome was committed, and a transport that can tell (Maildir) looks first.
    """

    envelope: Envelope
    content: bytes
    recipients: tuple[int, ...]
    next_hop: NextHop
    now: float
    first: bool = False

    def recipient(self, index: int) -> Recipient:
        return self.envelope.recipients[index]


@dataclass(frozen=True, slots=True)
class Relay:
    """Who an attempt handed the message to, as the delivery log's ``relay=`` names it:
    ``host[address]:port`` (the server's name and the peer actually connected to; a
    unix socket as ``host[path]``), or just ``host`` (``local`` for a Maildir)."""

    host: str
    address: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.address is None:
            return self.host
        port = "" if self.port is None else f":{self.port}"
        return f"{self.host}[{self.address}]{port}"


@dataclass(frozen=True, slots=True)
class Timing:
    """When, on the transport's clock, the connection an attempt used was ready to
    send on (``connected``; None when no connection was made) and when its outcome
    was known (``done``)."""

    connected: float | None
    done: float


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    """What happened to one recipient in one attempt.

    ``state`` is final (DELIVERED, TRANSFERRED, RELAYED, EXPANDED, FAILED) or
    DEFERRED for a temporary failure. ``status`` is the RFC 3463 code;
    ``diagnostic`` the remote reply as ``smtp; 550 5.1.1 ...`` (None when the
    failure was local); ``remote_mta`` the server that answered (``dns; host``,
    ``dns; [192.0.2.1]``).
    ``unknown`` marks an attempt whose result is not known (connection lost after
    the final dot): the recipient is retried, at the risk of a duplicate.
    ``dsn_passed`` is True when a next hop that advertised DSN accepted the
    recipient: DSN duties went with the message (no ``relayed`` DSN from us).
    ``list_expansion`` marks an EXPANDED recipient that was a mailing list.
    ``relay`` and ``timing`` are what the delivery log reports (None: no relay was
    reached; the queue's own times).
    """

    index: int
    state: RecipientState
    status: str
    diagnostic: str | None = None
    remote_mta: str | None = None
    certifier_forwarded: bool = False
    unknown: bool = False
    dsn_passed: bool = False
    list_expansion: bool = False  # EXPANDED by a mailing list (RFC 3461 §5.2.7.1: "delivered")
    relay: Relay | None = None
    timing: Timing | None = None
    produced: tuple[str, ...] = ()  # the addresses an alias expansion produced (its event)
    relayed_dsn: bool = False  # a "relayed" DSN owed whatever NOTIFY says (RFC 2852 §4.1.4)


class ITransport(Interface):
    """Delivers attempts of one kind (smtp, lmtp or maildir)."""

    def deliver(attempt: Attempt) -> Deferred[list[RecipientOutcome]]:
        """Try to deliver; fires with one outcome per recipient of the attempt, in order.

        Never fails: connection problems become DEFERRED outcomes.
        """

    def abort() -> None:
        """Drop every connection at once (shutdown); attempts in flight end as deferrals."""

    def close() -> Deferred[None]:
        """Close cached connections and wait for attempts in flight."""


@dataclass(frozen=True, slots=True)
class RouteFailure:
    """The router could not find a next hop: fail (e.g. null MX, 5.1.10) or retry later."""

    state: RecipientState  # FAILED or DEFERRED
    status: str  # e.g. "5.1.10", "5.1.2", "4.4.3"
    reason: str  # human-readable, for logs, tracking and DSNs


class IRouter(Interface):
    """Decides where mail for a domain goes."""

    def route(domain: str) -> Deferred[NextHop | RouteFailure]:
        """The next hop for ``domain`` (lower-cased, no trailing dot), or why there is none."""
