"""Any stored value made safe for one field of a DSN or an MTSN (RFC 3464, 3886, 6533)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence

MAX_RUN = 900
"""An unbroken run of non-blank characters longer than this gets a space inserted, so a
folded field line stays within RFC 5322 §2.1.1's 998 octets."""

_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")
_REPLY_CODE = re.compile(r"[2-5][0-9][0-9](?:[ -]|$)")
_LONG_RUN = re.compile(r"[^ \t]{" + str(MAX_RUN + 1) + ",}")
# Values with nothing to escape (nearly all of them) pass on one regular expression
# instead of one Python step per character: printable US-ASCII, SP and HTAB; VCHAR
# without the ( ) \ ; of an MTA name; what an IP address can be made of.
_PLAIN_TEXT = re.compile(r"[\t -~]*")
_PLAIN_NAME = re.compile(r"[!-'*-:<-\[\]-~]*")
_MAYBE_IPV4 = re.compile(r"[0-9.]+")


def escape(char: str) -> str:
    """``\\x{HH}``: one character as RFC 6533 §3's EmbeddedUnicodeChar (at least two digits)."""
    return f"\\x{{{ord(char):02X}}}"


def join_within(pieces: Sequence[str], limit: int, ellipsis: str) -> str:
    """``pieces`` (each one character, or the escape of one) joined into at most ``limit``
    characters: when they do not all fit, as many whole pieces as fit before ``ellipsis``,
    so that an escape is never cut in two."""
    if sum(len(piece) for piece in pieces) <= limit:
        return "".join(pieces)
    kept: list[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) > limit - len(ellipsis):
            break
        kept.append(piece)
        used += len(piece)
    return "".join(kept) + ellipsis


def _break_runs(value: str) -> str:
    """A space after every :data:`MAX_RUN` characters of an unbroken run (RFC 5322 §2.1.1)."""
    if len(value) <= MAX_RUN:
        return value

    def split(match: re.Match[str]) -> str:
        run = match.group(0)
        return " ".join(run[i : i + MAX_RUN] for i in range(0, len(run), MAX_RUN))

    return _LONG_RUN.sub(split, value)


def _escaped(value: str, plain: re.Pattern[str], keeps: Callable[[str], bool]) -> str:
    """``value`` with every character that ``keeps`` refuses as :func:`escape` has it, and
    its long runs broken; a value that ``plain`` matches whole has nothing to escape."""
    if not plain.fullmatch(value):
        value = "".join(char if keeps(char) else escape(char) for char in value)
    return _break_runs(value)


def _text_char(char: str) -> bool:
    return char == "\t" or " " <= char <= "~"


def _human_char(char: str) -> bool:
    return _text_char(char) or (char >= "\xa0" and char.isprintable())


def _name_char(char: str) -> bool:
    return "!" <= char <= "~" and char not in "()\\;"


def safe_text(value: str) -> str:
    """A ``*text`` value (RFC 3464 §2.1.2: Diagnostic-Code, Original-Envelope-Id) as 7-bit
    single-line text: printable US-ASCII, SP and HTAB stay; every other character (CR,
    LF, NUL, other controls, DEL, non-ASCII) becomes ``\\x{HH}`` (RFC 6533 §3 notation);
    runs longer than :data:`MAX_RUN` get a space so that folding can keep lines short."""
    return _escaped(value, _PLAIN_TEXT, _text_char)


def safe_human(value: str) -> str:
    """A value for the human-readable part and unstructured headers: like :func:`safe_text`,
    but non-ASCII letters stay (that part is UTF-8 quoted-printable when needed)."""
    return _escaped(value, _PLAIN_TEXT, _human_char)


def safe_mta_name(value: str) -> str:
    """An MTA name (RFC 3464 §2.2.2 Reporting-MTA, §2.3.5 Remote-MTA, the name in
    Received-From-MTA): a host name, so every character outside VCHAR, and the ``(``,
    ``)``, ``\\`` and ``;`` that a reader would take for comments, escapes or a type
    separator, becomes ``\\x{HH}``. Empty stays empty."""
    return _escaped(value.strip(" \t"), _PLAIN_NAME, _name_char)


def mta_host(host: str) -> str:
    """A host as the name of a ``dns`` MTA: a domain name stays, an IP address becomes a
    domain-literal, ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 3461 §9.3 wants "a
    domain name or a domain-literal"; RFC 5321 §4.1.3 spells them). Blanks around it go."""
    name = host.strip(" \t")
    if ":" not in name and not _MAYBE_IPV4.fullmatch(name):
        return name  # neither IPv6 (which has a colon) nor dotted-decimal IPv4
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name
    if address.version == 6:
        return f"[IPv6:{address}]"
    return f"[{address}]"


def dns_mta(host: str) -> str:
    """``dns; <host>`` for a Remote-MTA (RFC 3464 §2.3.5), the host as :func:`mta_host` has it."""
    return f"dns; {mta_host(host)}"


def typed_mta(value: str) -> tuple[str, str]:
    """(type, name) of a stored MTA name that may already carry its type: ``dns`` when it
    does not, or when the type is not an atom; a ``dns`` name as :func:`mta_host` has it,
    so that records stored as ``dns; 127.0.0.1`` read as ``dns; [127.0.0.1]``."""
    kind, semicolon, name = value.partition(";")
    if not (semicolon and _ATOM.fullmatch(kind.strip())):
        kind, name = "dns", value
    kind = kind.strip()
    return kind, mta_host(name) if kind.lower() == "dns" else name.strip(" \t")


def safe_typed_mta(value: str) -> str:
    """``type; name`` for a stored MTA name that may already carry its type (see
    :func:`typed_mta`), the name made safe by :func:`safe_mta_name`."""
    kind, name = typed_mta(value)
    return f"{kind}; {safe_mta_name(name)}"


def safe_address(address: str) -> str:
    """``rfc822; addr`` for a 7-bit printable address (RFC 3464 §2.3.2), otherwise
    ``utf-8; addr`` in RFC 6533 §3's utf-8-addr-xtext form: every character outside
    VCHAR, and ``+``, ``=`` and ``\\``, as ``\\x{HH}`` (a space or control included)."""
    if address and all(" " <= char <= "~" for char in address):
        return f"rfc822; {_break_runs(address)}"
    escaped = "".join(
        char if "!" <= char <= "~" and char not in "+=\\" else escape(char) for char in address
    )
    return f"utf-8; {_break_runs(escaped)}"


def safe_original_recipient(value: str) -> str:
    """An Original-Recipient value as received (``type;addr``, RFC 3464 §2.3.1): kept when
    it is already 7-bit printable text with an atom type, else re-encoded by
    :func:`safe_address` from the part after the type."""
    kind, semicolon, address = value.partition(";")
    if semicolon and _ATOM.fullmatch(kind.strip()) and all(" " <= c <= "~" for c in value):
        return _break_runs(value)
    return safe_address(address if semicolon else value)


def safe_diagnostic(value: str) -> str:
    """A Diagnostic-Code value (RFC 3464 §2.3.6): ``type; text``. A value without an atom
    type gets ``smtp;`` when it starts with a reply code, else ``x-local;``; the text is
    made safe by :func:`safe_text`; a safe typed value comes back unchanged."""
    kind, semicolon, text = value.partition(";")
    kind = kind.strip(" ")
    if semicolon and _ATOM.fullmatch(kind):
        return f"{kind};{safe_text(text)}"  # the spaces around the type dropped
    untyped = "smtp" if _REPLY_CODE.match(value) else "x-local"
    return f"{untyped}; {safe_text(value)}"
