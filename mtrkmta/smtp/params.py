"""Validate and decode MAIL/RCPT ESMTP parameters (SIZE, BODY, DSN, MTRK, SMTPUTF8, AUTH, BY)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from mtrkmta.envelope import (
    BINARYMIME,
    NOTIFY_KEYWORDS,
    NOTIFY_NEVER,
    DeliverBy,
    MailParams,
    Mtrk,
    OriginalRecipient,
    RcptParams,
)
from mtrkmta.smtp import xtext
from mtrkmta.smtp.deliverby import DeliverByError, parse_by
from mtrkmta.smtp.mtrk import MAX_ENVID, MtrkError, parse_mtrk
from mtrkmta.smtp.reply import SMTPError

MAX_ORCPT_VALUE = 500
"""Longest ORCPT value accepted, as received (RFC 3461 §5.4(c); RFC 3885 §2 item 5: +507)."""

DEFAULT_NOTIFY = frozenset({"FAILURE", "DELAY"})
"""What an absent NOTIFY means here (RFC 3461 §4.1; doc/conformance.rst 3461-P1)."""

MAIL_EXTENSIONS: Mapping[str, str] = MappingProxyType(
    {
        "SIZE": "SIZE",
        "BODY": "8BITMIME",
        "ENVID": "DSN",
        "RET": "DSN",
        "MTRK": "MTRK",
        "SMTPUTF8": "SMTPUTF8",
        "AUTH": "AUTH",
        "BY": "DELIVERBY",
    }
)
"""MAIL parameter keyword -> EHLO keyword that must be advertised for it."""

RCPT_EXTENSIONS: Mapping[str, str] = MappingProxyType({"NOTIFY": "DSN", "ORCPT": "DSN"})
"""RCPT parameter keyword -> EHLO keyword that must be advertised for it."""

_SIZE = re.compile(r"[0-9]{1,20}")  # RFC 1870: size-value = 1*20DIGIT
_BODY_TOKEN = re.compile(r"[A-Za-z0-9-]+")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")
_MAX_KEYWORD_ECHO = 40


def effective_notify(params: RcptParams) -> frozenset[str]:
    """NOTIFY as given, or FAILURE,DELAY when absent (RFC 3461 §4.1)."""
    return DEFAULT_NOTIFY if params.notify is None else params.notify


def _invalid(keyword: str) -> SMTPError:
    return SMTPError(501, "5.5.4", f"Invalid {keyword} parameter")


def _check_keyword(
    keyword: str, table: Mapping[str, str], advertised: frozenset[str], seen: set[str]
) -> str:
    """Upper-case ``keyword``; 555 when unknown or not advertised, 501 when repeated."""
    keyword = keyword.upper() if keyword.isascii() else keyword
    extension = table.get(keyword)
    if extension is None:
        shown = keyword if keyword.isascii() and keyword.isprintable() else "?"
        if len(shown) > _MAX_KEYWORD_ECHO:
            shown = shown[:_MAX_KEYWORD_ECHO] + "..."
        raise SMTPError(555, "5.5.4", f"Unsupported parameter {shown}")
    if extension not in advertised:
        raise SMTPError(555, "5.5.4", f"{keyword} not supported")
    if keyword in seen:
        if keyword == "MTRK":
            raise _invalid("MTRK")  # doc/conformance.rst 3885-P3 names a second MTRK
        raise SMTPError(501, "5.5.4", f"Duplicate {keyword} parameter")
    seen.add(keyword)
    return keyword


def _require_value(keyword: str, value: str | None) -> str:
    if not value:
        raise SMTPError(501, "5.5.4", f"{keyword} requires a value")
    return value


def _is_printable_ascii(text: str) -> bool:
    """RFC 3461 §4.4 (and doc/conformance.rst 3461-P5): graphic US-ASCII, space and HTAB only."""
    return all(char == "\t" or " " <= char <= "~" for char in text)


def _decode_xtext(keyword: str, value: str, lenient: bool) -> str:
    try:
        return xtext.decode(value, lenient=lenient)
    except xtext.XtextError:
        raise _invalid(keyword) from None


def parse_mail_params(
    params: Iterable[tuple[str, str | None]],
    *,
    advertised: frozenset[str],
    lenient_xtext: bool = False,
    min_by_time: int = 0,
) -> MailParams:
    """Validate MAIL parameters against the EHLO keywords in force;
    see RFC 3885 §3.1-§3.2, RFC 3461 §4-§5.1, RFC 5321 §4.1.1.11.

    Raises SMTPError: ``555 5.5.4`` for an unknown or not-advertised keyword
    (``555 5.5.4 MTRK not supported``), ``501 5.5.4`` for a repeated keyword, a
    missing/extra value or a malformed value, ``555 5.5.4 Unsupported BODY type``
    for a well-formed BODY other than 7BIT/8BITMIME (and BINARYMIME when advertised,
    RFC 3030 §3); for BY (RFC 2852 §4) ``501 5.5.4``
    when malformed or R with a by-time <= 0, ``555 5.5.4`` when R asks for less than
    ``min_by_time`` (RFC 2852 §3: a permanent 55z).
    """
    seen: set[str] = set()
    size: int | None = None
    body: str | None = None
    envid: str | None = None
    envid_xtext: str | None = None  # kept to relay the same esmtp-value (RFC 3461 §5.2.1(a))
    ret: str | None = None
    mtrk: Mtrk | None = None
    smtputf8 = False
    auth: str | None = None
    deliver_by: DeliverBy | None = None
    for raw_keyword, value in params:
        keyword = _check_keyword(raw_keyword, MAIL_EXTENSIONS, advertised, seen)
        if keyword == "SMTPUTF8":
            if value is not None:
                raise SMTPError(501, "5.5.4", "SMTPUTF8 takes no value")
            smtputf8 = True
        elif keyword == "MTRK":
            mtrk = _parse_mtrk(value)
        elif keyword == "SIZE":
            size = _parse_size(_require_value(keyword, value))
        elif keyword == "BODY":
            body = _parse_body(_require_value(keyword, value), advertised)
        elif keyword == "ENVID":
            envid_value = _require_value(keyword, value)
            envid = _parse_envid(envid_value, lenient_xtext)
            envid_xtext = xtext.noncanonical(envid_value, envid)
        elif keyword == "RET":
            ret = _parse_ret(_require_value(keyword, value))
        elif keyword == "BY":
            deliver_by = _parse_by(_require_value(keyword, value), min_by_time)
        else:
            auth = _parse_auth(_require_value(keyword, value), lenient_xtext)
    if mtrk is not None and not _is_unique_envid(envid):
        raise SMTPError(501, "5.5.4", "MTRK requires ENVID=local@host")
    return MailParams(
        size, body, envid, ret, mtrk, smtputf8, auth, envid_xtext, deliver_by
    )  # field order


def _parse_by(value: str, min_by_time: int) -> DeliverBy:
    """RFC 2852 §4: a syntax error is 501 5.5.4; RFC 2852 §3: R below the minimum is 55z."""
    try:
        deliver_by = parse_by(value)
    except DeliverByError:
        raise _invalid("BY") from None
    if deliver_by.mode == "R" and deliver_by.seconds < min_by_time:
        raise SMTPError(555, "5.5.4", f"BY time below the minimum of {min_by_time} seconds")
    return deliver_by


def _is_unique_envid(envid: str | None) -> bool:
    """unique-envid = local-envid "@" fqhn, split at the LAST ``@``, since
    ``@`` is itself an xchar (RFC 3885 §3.2, RFC 3461 §4)."""
    if envid is None:
        return False
    local, at, host = envid.rpartition("@")
    return bool(at and local and host)


def _parse_mtrk(value: str | None) -> Mtrk:
    """Any MTRK problem, a missing value included, is ``Invalid MTRK parameter``.

    See doc/conformance.rst 3885-P3.
    """
    if not value:
        raise _invalid("MTRK")
    try:
        return parse_mtrk(value)
    except MtrkError:
        raise _invalid("MTRK") from None


def _parse_size(value: str) -> int:
    if _SIZE.fullmatch(value) is None:
        raise _invalid("SIZE")
    return int(value)


def _parse_body(value: str, advertised: frozenset[str]) -> str:
    """7BIT or 8BITMIME (RFC 6152); BINARYMIME only where it is advertised (RFC 3030 §3)."""
    if _BODY_TOKEN.fullmatch(value) is None:
        raise _invalid("BODY")
    body = value.upper()
    if body not in ("7BIT", "8BITMIME") and (body != BINARYMIME or body not in advertised):
        raise SMTPError(555, "5.5.4", "Unsupported BODY type")
    return body


def _parse_envid(value: str, lenient: bool) -> str:
    envid = _decode_xtext("ENVID", value, lenient)
    if not _is_printable_ascii(envid):
        raise _invalid("ENVID")
    if len(envid) > MAX_ENVID:
        raise SMTPError(501, "5.5.4", "ENVID too long")
    return envid


def _parse_ret(value: str) -> str:
    ret = value.upper() if value.isascii() else value
    if ret not in ("FULL", "HDRS"):
        raise _invalid("RET")
    return ret


def _parse_auth(value: str, lenient: bool) -> str:
    auth = _decode_xtext("AUTH", value, lenient)
    if any(char < " " or char == "\x7f" for char in auth):
        raise _invalid("AUTH")
    return auth


def parse_rcpt_params(
    params: Iterable[tuple[str, str | None]],
    *,
    advertised: frozenset[str],
    lenient_xtext: bool = False,
) -> RcptParams:
    """Validate RCPT parameters (NOTIFY, ORCPT) against the EHLO keywords in force.

    Raises SMTPError ``555 5.5.4`` for unknown/not-advertised keywords and
    ``501 5.5.4`` for repeats, missing values and malformed values (RFC 3461 §4.1-§4.3,
    §5.1; doc/conformance.rst 3461-P3).
    """
    seen: set[str] = set()
    notify: frozenset[str] | None = None
    orcpt: OriginalRecipient | None = None
    for raw_keyword, value in params:
        keyword = _check_keyword(raw_keyword, RCPT_EXTENSIONS, advertised, seen)
        value = _require_value(keyword, value)
        if keyword == "NOTIFY":
            notify = _parse_notify(value)
        else:
            orcpt = _parse_orcpt(value, lenient_xtext)
    return RcptParams(notify=notify, orcpt=orcpt)


def _parse_notify(value: str) -> frozenset[str]:
    """``NEVER`` alone, or a comma list of SUCCESS/FAILURE/DELAY, any case (RFC 3461 §4.1)."""
    if not value.isascii():
        raise _invalid("NOTIFY")
    elements = value.upper().split(",")
    if elements == [NOTIFY_NEVER]:
        return frozenset(elements)
    if not all(element in NOTIFY_KEYWORDS for element in elements):
        raise _invalid("NOTIFY")
    return frozenset(elements)


def _parse_orcpt(value: str, lenient: bool) -> OriginalRecipient:
    """``addr-type ";" xtext``; type an atom, address printable US-ASCII (RFC 3461 §4.2)."""
    if len(value) > MAX_ORCPT_VALUE:
        raise SMTPError(501, "5.5.4", "ORCPT too long")
    addr_type, semicolon, encoded = value.partition(";")
    if not semicolon or _ATOM.fullmatch(addr_type) is None:
        raise _invalid("ORCPT")
    address = _decode_xtext("ORCPT", encoded, lenient)
    if not address or not _is_printable_ascii(address):
        raise _invalid("ORCPT")
    # RFC 3461 §5.2.1(d): a relay sends the identical original-recipient-address on.
    received = xtext.noncanonical(encoded, address)
    return OriginalRecipient(addr_type=addr_type, address=address, xtext=received)
