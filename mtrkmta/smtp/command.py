"""SMTP command lines: split into verb and argument, parse MAIL/RCPT paths and parameters."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mtrkmta.smtp.reply import Reply, SMTPError

MAX_COMMAND_LINE = 2048
"""Longest accepted command line in octets, CRLF included (doc/conformance.rst 3885-P2)."""

LINE_TOO_LONG = Reply(500, "5.5.2", ("Line too long",))

_VERB = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_WSP = re.compile(r"[ \t]+")
_FROM = re.compile(r"[Ff][Rr][Oo][Mm]:[ \t]*")
_TO = re.compile(r"[Tt][Oo]:[ \t]*")

# RFC 5321 §4.1.2 with RFC 6531 §3.3 (SMTPUTF8): non-ASCII characters join atext,
# qtextSMTP and sub-domains (UTF8-non-ascii; the C1 controls U+0080-U+009F are no
# part of it). The server decides whether non-ASCII is allowed (require_smtputf8).
_NONASCII = "\u00a0-\U0010ffff"
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_HELO_TEXT = re.compile("[\x21-\x7e]+")
_ATEXT = rf"[A-Za-z0-9!#$%&'*+\-/=?^_`{{|}}~{_NONASCII}]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED_STRING = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_NONASCII}]|\\[\x20-\x7e])*"')
_LET_DIG = rf"[A-Za-z0-9{_NONASCII}]"
_SUB_DOMAIN = rf"{_LET_DIG}(?:[A-Za-z0-9\-{_NONASCII}]*{_LET_DIG})?"
_DOMAIN = re.compile(rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*")
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_IPV6 = re.compile(r"[Ii][Pp][Vv]6:([0-9A-Fa-f:.]+)")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")


@dataclass(frozen=True, slots=True)
class AddressLimits:
    """The longest parts of what a client names, in octets (RFC 5321 §4.5.3.1; the
    defaults are the RFC's sizes, configured as ``limits.*_length``)."""

    local_part: int = 64  # §4.5.3.1.1
    domain: int = 255  # §4.5.3.1.2
    path: int = 256  # §4.5.3.1.3, "<" and ">" included
    helo: int = 255  # the HELO/EHLO/LHLO argument: a domain (§4.5.3.1.2) or address literal


DEFAULT_LIMITS = AddressLimits()

NOT_IMPLEMENTED: frozenset[str] = frozenset({"EXPN"})
"""Verbs of RFC 5321 that a server recognises but does not carry out: they get ``502``,
not ``500 Command unrecognized`` (RFC 5321 §3.5.2, §7.3: a site may disable EXPN)."""


# The verbs of RFC 5321, 2033 (LMTP) and their extensions as one shared string each: a
# session keeps the verbs it used (its per-verb counts for the log), and 20,000 sessions
# keeping their own copies of "MAIL" and "RCPT" would hold 4 MiB of them. Other verbs
# stay the client's own strings (never interned: a client could make that table grow).
_VERBS = {
    verb: verb
    for verb in (
        "EHLO", "HELO", "LHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT",
        "VRFY", "EXPN", "HELP", "STARTTLS", "AUTH",
    )
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Command:
    """One received command line: upper-cased verb and the argument text after it."""

    verb: str
    argument: str


def _syntax(text: str) -> SMTPError:
    return SMTPError(500, "5.5.2", text)


def parse_command(line: bytes, max_line: int = MAX_COMMAND_LINE) -> Command:
    """Split a command line (trailing CRLF optional) into verb and argument.

    The line is decoded as UTF-8 (SMTPUTF8). Raises SMTPError ``500 5.5.2`` when
    the line (CRLF counted) exceeds ``max_line``, is not UTF-8, contains CR/LF/NUL, or does
    not start with a well-formed verb. Trailing blanks of the argument are dropped.
    """
    if line.endswith(b"\r\n"):
        line = line[:-2]
    elif line.endswith(b"\n"):
        line = line[:-1]
    if len(line) + 2 > max_line:
        raise SMTPError.from_reply(LINE_TOO_LONG)
    if b"\r" in line or b"\n" in line or b"\x00" in line:
        raise _syntax("Syntax error: control character in command")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise _syntax("Syntax error: command is not valid UTF-8") from None
    verb, _, argument = text.partition(" ")
    if _VERB.fullmatch(verb) is None:
        raise _syntax("Syntax error: bad command")
    upper = verb.upper()
    return Command(verb=_VERBS.get(upper, upper), argument=argument.strip(" \t"))


def parse_mail(
    argument: str, limits: AddressLimits = DEFAULT_LIMITS
) -> tuple[str, list[tuple[str, str | None]]]:
    """Parse ``FROM:<reverse-path> [params]``; the null path ``<>`` gives ``""``.

    Source routes are stripped; angle brackets may be missing and blanks may follow
    the colon (as Postfix tolerates). Errors: ``501 5.5.2`` without ``FROM:``,
    ``501 5.1.7`` for a bad address, ``553 5.1.7`` for a control character or a part
    over ``limits`` (RFC 5321 §4.5.3.1), ``501 5.5.4`` for bad parameter syntax.
    """
    match = _FROM.match(argument)
    if match is None:
        raise SMTPError(501, "5.5.2", "Syntax: MAIL FROM:<address>")
    bad = SMTPError(501, "5.1.7", "Bad sender address syntax")
    path, rest = _path(argument[match.end() :], bad, "5.1.7", "sender")
    if path is None:
        raise SMTPError(501, "5.5.2", "Syntax: MAIL FROM:<address>")
    if path == "":
        return "", parse_params(rest)
    mailbox = _checked(path, bad, limits, "5.1.7", "sender", allow_postmaster=False)
    return mailbox, parse_params(rest)


def parse_rcpt(
    argument: str, limits: AddressLimits = DEFAULT_LIMITS
) -> tuple[str, list[tuple[str, str | None]]]:
    """Parse ``TO:<forward-path> [params]``; ``<postmaster>`` needs no domain.

    Errors: ``501 5.5.2`` without ``TO:``, ``501 5.1.3`` for a bad or null address,
    ``553 5.1.3`` for a control character, an empty local part (``""@domain``: no
    mailbox has that name) or a part over ``limits`` (RFC 5321 §4.5.3.1),
    ``501 5.5.4`` for bad parameter syntax.
    """
    match = _TO.match(argument)
    if match is None:
        raise SMTPError(501, "5.5.2", "Syntax: RCPT TO:<address>")
    bad = SMTPError(501, "5.1.3", "Bad recipient address syntax")
    path, rest = _path(argument[match.end() :], bad, "5.1.3", "recipient")
    if path is None:
        raise SMTPError(501, "5.5.2", "Syntax: RCPT TO:<address>")
    if path == "":
        raise SMTPError(501, "5.1.3", "Null recipient address not allowed")
    mailbox = _checked(path, bad, limits, "5.1.3", "recipient", allow_postmaster=True)
    if mailbox.startswith('""@'):
        raise SMTPError(553, "5.1.3", "Empty local part: no such mailbox")
    return mailbox, parse_params(rest)


def require_smtputf8(address: str, smtputf8: bool, *, what: str) -> None:
    """RFC 6531 §3.5: a non-ASCII address without the SMTPUTF8 parameter on MAIL is
    refused, ``553 5.6.7`` (``what``: sender or recipient)."""
    if not smtputf8 and not address.isascii():
        raise SMTPError(
            553, "5.6.7", f"Non-ASCII {what} address not permitted without SMTPUTF8 (RFC 6531)"
        )


def parse_params(text: str) -> list[tuple[str, str | None]]:
    """Split ``KEY=value KEY ...``: keywords upper-cased, values verbatim, None if no ``=``.

    ``KEY=`` gives an empty value (rejected later by the parameter parsers). Raises
    ``501 5.5.4`` for a malformed keyword or a control character in a value.
    """
    params: list[tuple[str, str | None]] = []
    for item in _WSP.split(text):
        if not item:
            continue
        keyword, equals, value = item.partition("=")
        if _KEYWORD.fullmatch(keyword) is None:
            raise SMTPError(501, "5.5.4", "Invalid parameter syntax")
        if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
            raise SMTPError(501, "5.5.4", f"Invalid {keyword.upper()} parameter")
        params.append((keyword.upper(), value if equals else None))
    return params


def parse_helo(argument: str, *, verb: str = "EHLO", max_length: int = DEFAULT_LIMITS.helo) -> str:
    """The client's HELO/EHLO/LHLO name: exactly one token, else ``501 5.5.4``.

    The name (a domain or an address literal) goes into our ``Received:`` field, so it
    must be printable ASCII and at most ``max_length`` octets (RFC 5321 §4.1.4,
    §4.5.3.1.2): ``501 5.5.2`` otherwise, before it can put a control character, a
    forged header line or an over-long line into a message.
    """
    if not argument or _WSP.search(argument):
        raise SMTPError(501, "5.5.4", f"Syntax: {verb} hostname")
    if _HELO_TEXT.fullmatch(argument) is None:
        raise SMTPError(
            501, "5.5.2", f"{verb} argument must be a domain or address literal in printable ASCII"
        )
    if len(argument) > max_length:
        raise SMTPError(501, "5.5.2", f"{verb} argument too long (RFC 5321 §4.5.3.1.2)")
    return argument


def parse_vrfy(argument: str, *, verb: str = "VRFY") -> str:
    """The VRFY/EXPN argument: non-empty, angle brackets removed, else ``501 5.5.4``."""
    if argument.startswith("<") and argument.endswith(">"):
        argument = argument[1:-1]
    if not argument:
        raise SMTPError(501, "5.5.4", f"Syntax: {verb} address")
    return argument


def require_no_argument(command: Command) -> None:
    """Raise ``501 5.5.4 Syntax: VERB`` when a command that takes no argument got one."""
    if command.argument:
        raise SMTPError(501, "5.5.4", f"Syntax: {command.verb}")


def _path(text: str, bad: SMTPError, enhanced: str, what: str) -> tuple[str | None, str]:
    """:func:`_split_path`, refusing (``553 enhanced``) a path with a C0 or C1 control
    or DEL in it, even one too broken to be split off the parameters."""
    control = SMTPError(553, enhanced, f"Control character in {what} address")
    try:
        path, rest = _split_path(text, bad)
    except SMTPError:
        if _CONTROL.search(text):
            raise control from None
        raise
    if path is not None and _CONTROL.search(path):
        raise control
    return path, rest


def _split_path(text: str, bad: SMTPError) -> tuple[str | None, str]:
    """Return (path without angle brackets, rest); None when there is no path at all."""
    if not text.startswith("<"):
        match = _WSP.search(text)
        end = match.start() if match else len(text)
        if end == 0:
            return None, text
        return text[:end], text[end:]
    quoted = literal = False
    index = 1
    while index < len(text):
        char = text[index]
        if quoted:
            if char == "\\":
                index += 1
            elif char == '"':
                quoted = False
        elif literal:
            if char == "]":
                literal = False
        elif char == '"':
            quoted = True
        elif char == "[":
            literal = True
        elif char == ">":
            rest = text[index + 1 :]
            if rest and rest[0] not in " \t":
                raise bad
            return text[1:index], rest
        index += 1
    raise bad


def _checked(
    path: str,
    bad: SMTPError,
    limits: AddressLimits,
    enhanced: str,
    what: str,
    *,
    allow_postmaster: bool,
) -> str:
    """The mailbox of ``path``, refused (``553 enhanced``) when a part is longer than
    RFC 5321 §4.5.3.1 (as configured in ``limits``) allows."""
    local, domain = _mailbox(path, bad, allow_postmaster=allow_postmaster)
    if len(local.encode("utf-8")) > limits.local_part:
        raise SMTPError(553, enhanced, "Local part too long (RFC 5321 §4.5.3.1.1)")
    if len(domain.encode("utf-8")) > limits.domain:
        raise SMTPError(553, enhanced, "Domain too long (RFC 5321 §4.5.3.1.2)")
    if len(path.encode("utf-8")) + 2 > limits.path:  # the angle brackets count
        raise SMTPError(553, enhanced, "Path too long (RFC 5321 §4.5.3.1.3)")
    return f"{local}@{domain}" if domain else local


def _mailbox(path: str, bad: SMTPError, *, allow_postmaster: bool) -> tuple[str, str]:
    """Validate a path's content, strip a source route; the mailbox's local part and
    domain (``""`` for ``<postmaster>``)."""
    if path.startswith("@"):
        route, colon, path = _partition_outside_literals(path, ":")
        if not colon or not all(
            hop.startswith("@") and _valid_domain(hop[1:]) for hop in route.split(",")
        ):
            raise bad
    if allow_postmaster and path.isascii() and path.lower() == "postmaster":
        return path, ""
    if path.startswith('"'):
        match = _QUOTED_STRING.match(path)
        if match is None:
            raise bad
        local, domain = path[: match.end()], path[match.end() :]
        if not domain.startswith("@"):
            raise bad
        domain = domain[1:]
    else:
        local, at, domain = path.partition("@")
        if not at or _DOT_STRING.fullmatch(local) is None:
            raise bad
    if not _valid_domain(domain):
        raise bad
    return local, domain


def _partition_outside_literals(text: str, separator: str) -> tuple[str, str, str]:
    depth = 0
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == separator and depth == 0:
            return text[:index], separator, text[index + 1 :]
    return text, "", ""


def _valid_domain(domain: str) -> bool:
    """Domain or address-literal (RFC 5321 §4.1.2, §4.1.3; U-labels allowed)."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return _DOMAIN.fullmatch(domain) is not None
    literal = domain[1:-1]
    if _IPV4.fullmatch(literal):
        return _valid_ip(literal, ipaddress.IPv4Address)
    ipv6 = _IPV6.fullmatch(literal)
    if ipv6:
        return _valid_ip(ipv6.group(1), ipaddress.IPv6Address)
    return _GENERAL_LITERAL.fullmatch(literal) is not None and not literal.lower().startswith(
        "ipv6:"
    )


def _valid_ip(text: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True
