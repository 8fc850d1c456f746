"""Plain data for one message's envelope: sender, recipients and their ESMTP parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

NOTIFY_NEVER = "NEVER"
NOTIFY_KEYWORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
BINARYMIME = "BINARYMIME"
"""The BODY= value of binary content, which goes only with BDAT (RFC 3030 §3)."""


@dataclass(frozen=True, slots=True)
class Mtrk:
    """The MTRK= parameter of MAIL (RFC 3885 §3.1), decoded.

    ``certifier`` is B = SHA1(A) as raw octets (16 or 20 of them, RFC 3885 §3.1,
    doc/conformance.rst 3885-P1);
    ``timeout`` is the requested retention in seconds, or None when absent.
    """

    certifier: bytes
    timeout: int | None = None


@dataclass(frozen=True, slots=True)
class DeliverBy:
    """The BY= parameter of MAIL (RFC 2852 §4), decoded.

    ``seconds`` is the by-time as received (negative allowed with mode N);
    ``mode`` is "R" (return) or "N" (notify); ``trace`` is the by-trace "T".
    """

    seconds: int
    mode: str
    trace: bool = False


@dataclass(frozen=True, slots=True)
class OriginalRecipient:
    """The ORCPT= parameter of RCPT (RFC 3461 §4.2): address type and decoded address.

    ``xtext`` is the address part exactly as received, kept only when it is valid
    xtext but not the canonical xtext of ``address`` (``+41`` for ``A``): a relay
    sends "the identical original-recipient-address" on (RFC 3461 §5.2.1(d)).
    None for an ORCPT this MTA made or one received in canonical form.
    """

    addr_type: str
    address: str
    xtext: str | None = None

    def __str__(self) -> str:
        return f"{self.addr_type};{self.address}"


@dataclass(frozen=True, slots=True)
class MailParams:
    """The ESMTP parameters of one MAIL command, validated and decoded."""

    size: int | None = None
    body: str | None = None  # "7BIT", "8BITMIME" or "BINARYMIME" (RFC 3030 §3)
    envid: str | None = None  # xtext-decoded ENVID, case kept
    ret: str | None = None  # "FULL" or "HDRS"
    mtrk: Mtrk | None = None
    smtputf8: bool = False
    auth: str | None = None  # xtext-decoded AUTH= value (RFC 4954 §5)
    # The ENVID esmtp-value as received when it is not the canonical xtext of envid:
    # a relay sends "the same associated esmtp-value" on (RFC 3461 §5.2.1(a)).
    envid_xtext: str | None = None
    deliver_by: DeliverBy | None = None  # RFC 2852 §4 BY=


@dataclass(frozen=True, slots=True)
class RcptParams:
    """The ESMTP parameters of one RCPT command, validated and decoded.

    ``notify`` is None when NOTIFY was absent, ``frozenset({"NEVER"})`` for NEVER,
    otherwise a non-empty subset of SUCCESS/FAILURE/DELAY.
    """

    notify: frozenset[str] | None = None
    orcpt: OriginalRecipient | None = None


@dataclass(frozen=True, slots=True)
class Recipient:
    """One accepted recipient: the RCPT address as received and its parameters."""

    address: str
    params: RcptParams = field(default_factory=RcptParams)

    @property
    def original(self) -> OriginalRecipient:
        """ORCPT when given, else the RCPT address as received (doc/conformance.rst 3886-P2)."""
        return self.params.orcpt or OriginalRecipient("rfc822", self.address)


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who handed us the message: for Received: headers, DSNs and policy."""

    address: str  # peer IP address, "" for a local source
    port: int = 0
    helo: str = ""
    protocol: str = "ESMTP"  # ESMTP, ESMTPS, ESMTPA, ESMTPSA, LMTP, ...
    authenticated_as: str | None = None
    listener: str = "smtp"  # smtp, submission or lmtp


@dataclass(frozen=True, slots=True)
class Envelope:
    """Everything about an accepted message except its content."""

    queue_id: str
    sender: str  # "" for the null reverse-path <>
    recipients: tuple[Recipient, ...]
    params: MailParams = field(default_factory=MailParams)
    arrival: float = 0.0  # POSIX time of acceptance at this MTA
    client: ClientInfo = field(default_factory=lambda: ClientInfo(address=""))
