"""Pure DSN rendering: a multipart/report delivery-status message as bytes (RFC 3464, 6522)."""

from __future__ import annotations

import quopri
import re
import secrets
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime
from types import MappingProxyType

from mtrkmta.dsn.policy import BATCH_ORDER, DSN_ACTIONS, is_null_sender
from mtrkmta.envelope import BINARYMIME
from mtrkmta.reportfields import (
    safe_address,
    safe_diagnostic,
    safe_human,
    safe_mta_name,
    safe_original_recipient,
    safe_text,
    safe_typed_mta,
    typed_mta,
)
from mtrkmta.tracking.interfaces import RecipientUpdate, StoredMessage, StoredRecipient

FOLD_AT = 78
"""Header and report fields are folded at spaces to keep lines at most this long."""

SUBJECTS: Mapping[str, str] = MappingProxyType(
    {
        "failed": "Undelivered Mail Returned to Sender",
        "delayed": "Delayed Mail (still being retried)",
        "delivered": "Successful Mail Delivery Report",
        "expanded": "Successful Mail Delivery Report",
        "relayed": "Relayed Mail Report",
    }
)
"""The Subject of a DSN, by the first of its Actions in :data:`BATCH_ORDER`."""

_FALLBACK_STATUS: Mapping[str, str] = MappingProxyType(
    {
        "failed": "5.0.0",  # 3461 §6.3 (g)
        "delayed": "4.0.0",  # 3461 §6.3 (g)
        "delivered": "2.1.5",  # project decision, doc/conformance.rst 3886-P3
        "expanded": "2.1.5",
        "relayed": "2.1.9",  # 3886 §3.3.4
    }
)
_STATUS_CLASSES: Mapping[str, str] = MappingProxyType(
    {"failed": "45", "delayed": "4", "delivered": "2", "expanded": "2", "relayed": "2"}
)
_STATUS = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]")  # RFC 2046
_LINE_END = re.compile(rb"\r\n|\r|\n")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_BOUNDARY_TRIES = 8

# RFC 3463 wording (and RFC 3886 §3.3.4, RFC 7505 §4.2) for the human-readable part.
_DETAILS: Mapping[str, str] = MappingProxyType(
    {
        "0.0": "other undefined status",
        "1.0": "other address status",
        "1.1": "bad destination mailbox address",
        "1.2": "bad destination system address",
        "1.3": "bad destination mailbox address syntax",
        "1.5": "destination mailbox address valid",
        "1.9": "message relayed to non-compliant mailer",
        "1.10": "recipient address has null MX",
        "2.0": "other or undefined mailbox status",
        "2.1": "mailbox disabled, not accepting messages",
        "2.2": "mailbox full",
        "2.3": "message length exceeds administrative limit",
        "3.0": "other or undefined mail system status",
        "3.4": "message too big for system",
        "4.0": "other or undefined network or routing status",
        "4.1": "no answer from host",
        "4.2": "bad connection",
        "4.3": "directory server failure",
        "4.4": "unable to route",
        "4.7": "delivery time expired",
        "5.0": "other or undefined protocol status",
        "6.0": "other or undefined media error",
        "7.0": "other or undefined security status",
        "7.1": "delivery not authorized, message refused",
    }
)
_SUBJECT_CLASSES: Mapping[str, str] = MappingProxyType(
    {
        "1": "addressing problem",
        "2": "mailbox problem",
        "3": "mail system problem",
        "4": "network or routing problem",
        "5": "mail delivery protocol problem",
        "6": "message content problem",
        "7": "security or policy problem",
    }
)
_INTRODUCTIONS: Mapping[str, str] = MappingProxyType(
    {
        "failed": "Your message could not be delivered to {who}. The mail system has given"
        " up and will not try again.",
        "delayed": "Your message has not been delivered yet to {who}. The mail system is"
        " still trying; you do not need to send the message again.",
        "delivered": "Your message was delivered to {who}.",
        "expanded": "Your message was delivered to {who}. {alias}: the message was passed on"
        " to every address behind it, and no further success reports will follow.",
        "relayed": "Your message was passed on for {who} to a mail system that does not send"
        " delivery reports. No further reports will follow.",
    }
)
_OUTCOMES: Mapping[str, str] = MappingProxyType(
    {
        "failed": "delivery failed",
        "delayed": "delivery delayed",
        "delivered": "delivered",
        "expanded": "delivered to an alias and passed on to its addresses",
        "relayed": "relayed",
    }
)


class DsnFieldError(ValueError):
    """A programming error: a value reached a DSN header or report field unescaped (CR, LF
    or another control). Stored values never cause it: they go through
    :mod:`mtrkmta.reportfields` first."""


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """What one DSN says about one recipient (RFC 3464 §2.3).

    ``original_recipient`` is the ORCPT value as received (``rfc822;addr``), None when
    no ORCPT came; ``remote_mta`` is ``dns; host`` (a bare host gets ``dns;``, an
    IP address is shown as a domain-literal, ``dns; [192.0.2.1]``);
    ``diagnostic`` is typed, e.g. ``smtp; 550 5.1.1 <u@x> User unknown`` with the lines
    of a multi-line reply joined by a space (see :func:`smtp_diagnostic`). Times are
    POSIX seconds. ``status`` None falls back to the Action's default code.
    """

    final_recipient: str
    action: str
    status: str | None = None
    original_recipient: str | None = None
    remote_mta: str | None = None
    diagnostic: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None

    @classmethod
    def from_stored(
        cls, recipient: StoredRecipient, action: str, update: RecipientUpdate | None = None
    ) -> RecipientReport:
        """The report on ``recipient``: from ``update`` when given (a QueueEvent's new
        state), otherwise from the stored state."""
        source: StoredRecipient | RecipientUpdate = update if update is not None else recipient
        return cls(
            final_recipient=recipient.final_recipient,
            action=action,
            status=source.status,
            original_recipient=str(recipient.orcpt) if recipient.orcpt is not None else None,
            remote_mta=source.remote_mta,
            diagnostic=source.diagnostic,
            last_attempt=source.last_attempt,
            will_retry_until=source.will_retry_until,
        )


def smtp_diagnostic(reply_lines: Sequence[str]) -> str:
    """``smtp; <reply>`` from the lines of an SMTP reply as received (RFC 3461 §9.2).

    ``reply_lines`` are the full lines (``550-5.1.1 first``, ``550 5.1.1 last``); they are
    joined with a single space (so are pieces of a line split by an embedded CR or LF),
    and the text is made safe by :func:`~mtrkmta.reportfields.safe_text`: the result holds
    no CR, LF or other control character, whatever the next hop sent.
    """
    lines = [piece for line in reply_lines for piece in _LINE_BREAK.split(line)]
    return "smtp; " + safe_text(" ".join(line for line in lines if line))


def random_boundary() -> str:
    """A fresh MIME boundary: 32 random hex digits after a fixed prefix."""
    return "=_dsn_" + secrets.token_hex(16)


def random_message_id(reporting_mta: str) -> str:
    """A fresh Message-ID in the reporting MTA's domain."""
    return f"<dsn.{secrets.token_hex(16)}@{reporting_mta}>"


def format_date(when: float) -> str:
    """RFC 5322 date-time in UTC with a numeric zone, ``+0000`` (RFC 3464 §2.2.5, §2.3.7)."""
    return format_datetime(datetime.fromtimestamp(int(when), timezone.utc))


def render_dsn(
    *,
    message: StoredMessage,
    recipients: Sequence[RecipientReport],
    reporting_mta: str,
    original_content: bytes | None,
    ret: str | None,
    max_full_size: int,
    now: float,
    eight_bit_ok: bool = False,
    new_boundary: Callable[[], str] = random_boundary,
    new_message_id: Callable[[str], str] = random_message_id,
) -> bytes:
    """One DSN about some recipients of ``message``, to its envelope sender (RFC 3461 §6.1-§6.3,
    RFC 3464 §2, RFC 6522 §3-§4).

    A multipart/report of three parts: human-readable text/plain, message/delivery-status,
    and the returned content. That is ``message/rfc822`` (the whole original) for a DSN
    reporting a failure with RET=FULL or no RET, unless the original is larger than
    ``max_full_size`` octets or holds 8-bit octets while ``eight_bit_ok`` is False (the
    DSN's path is 7-bit); otherwise ``text/rfc822-headers``. When the header itself
    holds 8-bit octets on a 7-bit path, or ``original_content`` is None, the third part
    is left out. A ``BODY=BINARYMIME`` message (RFC 3030 §3) is returned as its header only,
    whatever RET says: its body is binary and could not travel in the DSN, which goes as
    8bit or 7bit (RFC 3461 §6.2 makes the full message a SHOULD; RFC 6522 §3 names
    text/rfc822-headers for content that cannot be returned as it is); the text part says
    so. Without ``eight_bit_ok`` the result is pure 7-bit, except for a
    non-ASCII sender address in To (SMTPUTF8, RFC 6532).

    Every stored value (HELO name, addresses, ENVID, remote MTA, diagnostic) is made safe
    for its field by :mod:`mtrkmta.reportfields`, so no value from the wire can make
    rendering fail; a malformed Status, or one that does not fit its Action, gives way to
    the Action's default code. Raises ValueError for a null sender (3461 §5.2), no
    recipients, or an Action a DSN cannot carry (transferred, opaque);
    :class:`DsnFieldError` only for a ``new_message_id`` that returns a control character.
    """
    if is_null_sender(message.sender):
        raise ValueError("no DSN may be sent for a null reverse-path (RFC 3461 §5.2)")
    if not recipients:
        raise ValueError("a DSN reports on at least one recipient")
    actions = [_check_action(report.action) for report in recipients]
    failure = "failed" in actions
    reporting_mta = safe_mta_name(reporting_mta) or "localhost"
    if ret is not None and ret.upper() not in ("FULL", "HDRS"):
        raise ValueError(f"RET must be FULL or HDRS, not {ret!r}")
    binary = message.body == BINARYMIME
    returned = _returned_part(
        _header_section(original_content) if binary and original_content else original_content,
        full=failure and (ret is None or ret.upper() == "FULL") and not binary,
        max_full_size=max_full_size,
        eight_bit_ok=eight_bit_ok,
    )
    status = _status_part(message, recipients, reporting_mta)
    text = _text_part(message, recipients, reporting_mta, returned, binary=binary)
    parts = [text, status] + ([returned[1]] if returned is not None else [])
    boundary = _pick_boundary(new_boundary, parts)
    message_id = new_message_id(reporting_mta)
    _check(message_id, "Message-ID")
    eight_bit = any(part.cte == "8bit" for part in parts)
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        _fold("To", f"<{safe_human(message.sender)}>"),
        f"Subject: {_subject(actions)}",
        f"Date: {format_date(now)}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        _fold(
            "Content-Type", f'multipart/report; report-type=delivery-status; boundary="{boundary}"'
        ),
    ]
    if eight_bit:
        headers.append("Content-Transfer-Encoding: 8bit")
    out = bytearray("\r\n".join(headers).encode("utf-8") + b"\r\n\r\n")
    out += b"This is a MIME-encapsulated message.\r\n"
    for part in parts:
        out += b"\r\n--" + boundary.encode("ascii") + b"\r\n" + part.render()
    out += b"\r\n--" + boundary.encode("ascii") + b"--\r\n"
    return bytes(out)


# -- parts --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Part:
    """One body part: its headers and its body (CRLF line ends, ending with CRLF or empty)."""

    content_type: str
    description: str
    cte: str
    body: bytes

    def render(self) -> bytes:
        head = (
            f"Content-Description: {self.description}\r\n"
            f"Content-Type: {self.content_type}\r\n"
            f"Content-Transfer-Encoding: {self.cte}\r\n\r\n"
        )
        return head.encode("ascii") + self.body


def _returned_part(
    content: bytes | None, *, full: bool, max_full_size: int, eight_bit_ok: bool
) -> tuple[str, _Part] | None:
    """The third part and how the text calls it ("message" or "header"), or None."""
    if content is None:
        return None
    content = _LINE_END.sub(b"\r\n", content)
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    end = content.find(b"\r\n\r\n")
    if content.startswith(b"\r\n"):
        header = b""
    elif end < 0:
        header = content
    else:
        header = content[: end + 2]
    content_8bit, header_8bit = _has_8bit(content), _has_8bit(header)
    if full and len(content) <= max_full_size and (eight_bit_ok or not content_8bit):
        cte = "8bit" if content_8bit else "7bit"
        return "message", _Part("message/rfc822", "Undelivered message", cte, content)
    if header_8bit and not eight_bit_ok:
        return None
    cte = "8bit" if header_8bit else "7bit"
    return "header", _Part("text/rfc822-headers", "Message header", cte, header)


def _header_section(content: bytes) -> bytes:
    """The header section of a binary message: up to its first empty line (CRLF CRLF)."""
    end = content.find(b"\r\n\r\n")
    return content if end < 0 else content[: end + 4]


def _status_part(
    message: StoredMessage, recipients: Sequence[RecipientReport], reporting_mta: str
) -> _Part:
    """The message/delivery-status part (RFC 3464 §2.2-2.3, RFC 3461 §6.3)."""
    fields: list[str] = []
    if message.envid is not None:
        fields.append(_field("Original-Envelope-Id", safe_text(message.envid)))
    mta_type = "dns" if "." in reporting_mta else "x-local-hostname"
    fields.append(_field("Reporting-MTA", f"{mta_type}; {reporting_mta}"))
    received_from = _received_from(message)
    if received_from is not None:
        fields.append(_field("Received-From-MTA", received_from))
    if message.arrival:
        fields.append(_field("Arrival-Date", format_date(message.arrival)))
    if message.deliver_by is not None:  # RFC 2852 §5: deliver-by-date-field
        fields.append(_field("Deliver-By-Date", format_date(message.deliver_by)))
    blocks = ["".join(fields)]
    for report in recipients:
        blocks.append(_recipient_fields(report))
    body = "\r\n".join(blocks).encode("ascii")
    return _Part("message/delivery-status", "Delivery report", "7bit", body)


def _received_from(message: StoredMessage) -> str | None:
    helo = safe_mta_name(message.client.helo)
    address = safe_mta_name(message.client.address)
    if helo and address:
        return f"dns; {helo} ([{address}])"
    if helo:
        return f"dns; {helo}"
    if address:
        return f"dns; [{address}]"
    return None


def _recipient_fields(report: RecipientReport) -> str:
    """One per-recipient block, fields in RFC 3464 order, each ending with CRLF."""
    fields: list[str] = []
    if report.original_recipient is not None:
        fields.append(
            _field("Original-Recipient", safe_original_recipient(report.original_recipient))
        )
    if not report.final_recipient:
        raise ValueError("Final-Recipient must not be empty")
    fields.append(_field("Final-Recipient", safe_address(report.final_recipient)))
    fields.append(_field("Action", report.action))
    fields.append(_field("Status", _status(report)))
    if report.remote_mta:
        fields.append(_field("Remote-MTA", safe_typed_mta(report.remote_mta)))
    if report.diagnostic:
        fields.append(_field("Diagnostic-Code", safe_diagnostic(report.diagnostic)))
    if report.last_attempt is not None:
        fields.append(_field("Last-Attempt-Date", format_date(report.last_attempt)))
    if report.action == "delayed" and report.will_retry_until is not None:
        fields.append(_field("Will-Retry-Until", format_date(report.will_retry_until)))
    return "".join(fields)


def _text_part(
    message: StoredMessage,
    recipients: Sequence[RecipientReport],
    reporting_mta: str,
    returned: tuple[str, _Part] | None,
    *,
    binary: bool = False,
) -> _Part:
    """The human-readable part: what happened to whom and why, in plain words."""
    paragraphs = [f"This is the mail system at host {reporting_mta}."]
    for action in BATCH_ORDER:
        reports = [report for report in recipients if report.action == action]
        if not reports:
            continue
        single = len(reports) == 1
        who = "the recipient below" if single else "the recipients below"
        alias = "This address is an alias" if single else "Each of these addresses is an alias"
        paragraphs.append(_wrap(_INTRODUCTIONS[action].format(who=who, alias=alias)))
        paragraphs.extend(_describe(report) for report in reports)
    if returned is not None:
        if returned[0] == "message":
            paragraphs.append("Your message is attached below.")
        else:
            paragraphs.append("The header of your message is attached below.")
    if binary:
        paragraphs.append(
            _wrap(
                "Your message was sent as binary MIME (BODY=BINARYMIME), so its body is"
                " not returned: only its header can be, when it fits the report."
            )
        )
    details = [
        "Details of your message:",
        f"    Queue ID:     {message.queue_id}",
    ]
    if message.envid is not None:
        details.append(f"    Envelope ID:  {safe_human(message.envid)}")
    details.append(f"    Sender:       <{safe_human(message.sender)}>")
    if message.arrival:
        details.append(f"    Arrived:      {format_date(message.arrival)}")
    paragraphs.append("\n".join(details))
    text = "\n\n".join(paragraphs) + "\n"
    if text.isascii():
        body = text.replace("\n", "\r\n").encode("ascii")
        return _Part("text/plain; charset=us-ascii", "Notification", "7bit", body)
    encoded = quopri.encodestring(text.encode("utf-8"))
    body = _LINE_END.sub(b"\r\n", encoded)
    return _Part("text/plain; charset=utf-8", "Notification", "quoted-printable", body)


def _describe(report: RecipientReport) -> str:
    """One recipient's paragraph of the human-readable part."""
    status = _status(report)
    lines = [f"<{safe_human(report.final_recipient)}>: {_OUTCOMES[report.action]}"]
    if report.original_recipient is not None:
        lines.append(f"    You sent it to: {safe_human(report.original_recipient)}")
    lines.append(f"    Status: {status} ({_status_meaning(status)})")
    if report.remote_mta:
        remote = safe_mta_name(typed_mta(report.remote_mta)[1])
        lines.append(f"    Mail server: {remote}")
    if report.diagnostic:
        kind, _, said = safe_diagnostic(report.diagnostic).partition(";")
        label = "    The server said: " if kind.strip().lower() == "smtp" else "    Reason: "
        lines.append(
            textwrap.fill(
                said.strip(),
                width=76,
                initial_indent=label,
                subsequent_indent="        ",
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    if report.last_attempt is not None:
        lines.append(f"    Last attempt: {format_date(report.last_attempt)}")
    if report.action == "delayed" and report.will_retry_until is not None:
        lines.append(f"    Will keep trying until: {format_date(report.will_retry_until)}")
    return "\n".join(lines)


# -- values ---------------------------------------------------------------------------


def _check(value: str, what: str) -> str:
    """Refuse CR, LF and other control characters (HTAB aside) in a field value: a value
    that got here unescaped is a programming error (see :mod:`mtrkmta.reportfields`)."""
    if _CONTROL.search(value):
        raise DsnFieldError(f"{what}: control character in {value!r}")
    return value


def _check_action(action: str) -> str:
    if action not in DSN_ACTIONS:
        raise ValueError(
            f"Action {action!r} cannot appear in a DSN (RFC 3464 §2.3.3, RFC 3886 §3.3.3)"
        )
    return action


def _status(report: RecipientReport) -> str:
    """The Status code, without leading zeros; the Action's default when the stored code is
    missing, malformed or of a class that does not fit the Action (RFC 3464 §2.3.4)."""
    match = _STATUS.fullmatch(report.status.strip()) if report.status is not None else None
    if match is None or match.group(1) not in _STATUS_CLASSES[report.action]:
        return _FALLBACK_STATUS[report.action]
    return ".".join(str(int(group)) for group in match.groups())


def _status_meaning(status: str) -> str:
    kind, subject, detail = status.split(".")
    if kind == "2" and subject == detail == "0":
        return "success"
    return _DETAILS.get(f"{subject}.{detail}") or _SUBJECT_CLASSES.get(subject, "other status")


def _subject(actions: Sequence[str]) -> str:
    first = min(actions, key=BATCH_ORDER.index)
    return SUBJECTS[first]


def _ascii_text(value: str) -> str:
    """Non-ASCII characters as ``\\x{HHHH}`` (RFC 6533 style): report fields are 7-bit."""
    if value.isascii():
        return value
    return "".join(char if char.isascii() else f"\\x{{{ord(char):X}}}" for char in value)


def _field(name: str, value: str) -> str:
    """A report field, checked, made ASCII and folded; it ends with CRLF."""
    return _fold(name, _ascii_text(_check(value, name))) + "\r\n"


def _fold(name: str, value: str) -> str:
    """``Name: value`` folded before spaces so lines stay within :data:`FOLD_AT` where they
    can; unfolding (removing each CRLF) gives the value back unchanged."""
    words = value.split(" ")
    lines: list[str] = []
    current = f"{name}: {words[0]}"
    for word in words[1:]:
        if word and len(current) + 1 + len(word) > FOLD_AT and current.strip():
            lines.append(current)
            current = " " + word
        else:
            current += " " + word
    lines.append(current)
    return "\r\n".join(lines)


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=72, break_long_words=False, break_on_hyphens=False)


def _has_8bit(data: bytes) -> bool:
    return not data.isascii()


def _pick_boundary(new_boundary: Callable[[], str], parts: Sequence[_Part]) -> str:
    """A valid boundary that occurs in no part (RFC 2046 §5.1.1)."""
    for _ in range(_BOUNDARY_TRIES):
        boundary = new_boundary()
        if not _BOUNDARY.fullmatch(boundary):
            raise ValueError(f"not a valid MIME boundary: {boundary!r}")
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in part.body for part in parts):
            return boundary
    raise ValueError("could not find a boundary that occurs in no part")
