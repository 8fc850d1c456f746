"""EHLO/LHLO keywords: render the server's reply, read a server's reply as a client."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from mtrkmta.smtp.reply import Reply

# RFC 5321 §4.1.1.1: ehlo-line = ehlo-keyword *( SP ehlo-param ), ehlo-param = 1*(%d33-126)
_EHLO_LINE = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)((?: [!-~]+)*)")
_KEYWORD_AT_START = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?=[ \t]|$)")
_STATUS_PREFIX = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3} ")
_NO_PARAMETERS = frozenset({"MTRK", "DSN"})  # RFC 3885 §2, RFC 3461 §2


def keyword_of(line: str) -> str:
    """The upper-cased keyword of one EHLO line such as ``"SIZE 10240000"``."""
    return line.split(" ", 1)[0].upper()


def advertised_keywords(lines: Iterable[str]) -> frozenset[str]:
    """The set of keywords (parameters dropped) that ``parse_mail_params`` expects."""
    return frozenset(keyword_of(line) for line in lines)


def render_ehlo(hostname: str, keywords: Sequence[str], *, greeting: str = "") -> Reply:
    """The 250 reply to EHLO or LHLO: ``hostname [greeting]`` then one line per keyword.

    ``keywords`` are EHLO lines in advertising order (``"SIZE 10240000"``,
    ``"AUTH PLAIN LOGIN"``). Raises ValueError for a malformed or repeated
    keyword, for MTRK or DSN with parameters, and for MTRK without DSN
    (RFC 3885 §2; doc/conformance.rst 3885-P4). No enhanced status code: RFC 2034 §3 exempts
    EHLO replies.
    """
    if not hostname or " " in hostname:
        raise ValueError(f"bad hostname for EHLO reply: {hostname!r}")
    seen: set[str] = set()
    for line in keywords:
        match = _EHLO_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"malformed EHLO keyword line: {line!r}")
        keyword = match.group(1).upper()
        if keyword in seen:
            raise ValueError(f"EHLO keyword advertised twice: {keyword}")
        if keyword in _NO_PARAMETERS and match.group(2):
            raise ValueError(f"{keyword} is advertised without parameters")
        seen.add(keyword)
    if "MTRK" in seen and "DSN" not in seen:
        raise ValueError("MTRK must not be advertised without DSN")
    first = f"{hostname} {greeting}" if greeting else hostname
    return Reply(250, None, (first, *keywords))


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """A server's EHLO/LHLO extensions: upper-cased keyword -> parameter text ("" if none).

    The first line (the server's name) is skipped; a stray enhanced status code at
    the start of a line is dropped; lines that do not start with a well-formed
    keyword are ignored; of a repeated keyword the first line counts.
    Parameters are kept, so ``MTRK`` is recognised even when a future server
    appends some (RFC 3885 §2). Raises ValueError for a non-2xx reply.
    """
    if not reply.is_positive:
        raise ValueError(f"not a positive EHLO reply: {reply.code}")
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        prefix = _STATUS_PREFIX.match(line)  # tolerate servers that tag EHLO lines
        if prefix is not None:
            line = line[prefix.end() :]
        match = _KEYWORD_AT_START.match(line)
        if match is None:
            continue
        keyword = match.group(1).upper()
        if keyword not in extensions:
            extensions[keyword] = line[match.end() :].strip(" \t")
    return extensions
