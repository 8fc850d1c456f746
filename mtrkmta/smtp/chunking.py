"""Sans-IO CHUNKING (RFC 3030): the BDAT command's argument and the content of its chunks."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mtrkmta.smtp.framing import CRLF
from mtrkmta.smtp.reply import SMTPError

# RFC 3030 §2: bdat-cmd ::= "BDAT" SP chunk-size [ SP end-marker ] CR LF
# chunk-size ::= 1*DIGIT ; end-marker ::= "LAST"
_BDAT = re.compile(r"([0-9]{1,20})(?: (LAST))?", re.IGNORECASE)

_RECEIVED = re.compile(rb"(?:^|\n)received:", re.IGNORECASE)
_HEADER_END = b"\r\n\r\n"


@dataclass(frozen=True, slots=True)
class BdatCommand:
    """One parsed ``BDAT <size> [LAST]``."""

    size: int
    last: bool


def parse_bdat(argument: str) -> BdatCommand:
    """Parse the argument of BDAT (RFC 3030 §2); SMTPError 501 5.5.4 when malformed."""
    match = _BDAT.fullmatch(argument.strip(" "))
    if match is None:
        raise SMTPError(501, "5.5.4", "Syntax: BDAT <chunk-size> [LAST]")
    return BdatCommand(size=int(match.group(1)), last=match.group(2) is not None)


class ChunkReader:
    """Read exactly ``size`` octets of one chunk from a byte stream (RFC 3030 §2).

    The chunk is not dot-stuffed and has no terminator: whatever its bytes look
    like (``QUIT``, ``<CRLF>.<CRLF>``), they are content. ``feed`` returns the
    chunk octets in ``data`` and the bytes after the chunk (the next commands).
    Nothing is kept: memory stays bounded whatever ``size`` says.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.remaining = size

    @property
    def done(self) -> bool:
        """True once every octet of the chunk was read."""
        return self.remaining == 0

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """``(chunk octets, bytes after the chunk)`` of ``data``."""
        take = min(self.remaining, len(data))
        self.remaining -= take
        return data[:take], data[take:]


class ChunkedContent:
    """The content of one BDAT transaction, checked as its chunks arrive, in bounded memory.

    Counts the octets against ``max_size`` (SIZE, RFC 1870); turns every bare CR
    and bare LF into CRLF (RFC 5321 §2.3.8: the content is stored as CRLF lines and
    may be relayed with DATA), or marks the content refused when
    ``reject_bare_line_ends``; refuses a line over ``max_line`` octets (RFC 5321
    §4.5.3.1.6), as DATA does; counts the Received: header fields (RFC 5321 §6.3).
    A CR at the end of a chunk is held back until the next octet shows whether
    it is part of a CRLF.

    ``binary`` (``BODY=BINARYMIME``, RFC 3030 §3): the checks above hold for the header
    section only, which ends at the first empty line (CRLF CRLF). There a bare CR or LF
    refuses the content whatever ``reject_bare_line_ends`` says: making it CRLF could
    move the end of the header section and so change the body. The body's octets are
    stored as they are: NUL, bare CR and LF and long lines are binary data.
    """

    def __init__(
        self,
        max_size: int,
        max_line: int = 998,
        *,
        reject_bare_line_ends: bool = False,
        binary: bool = False,
    ) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.line_too_long = False
        self._line = 0  # octets of the line not ended yet
        self._long_line = re.compile(rb"[^\r\n]{%d}" % (max_line + 1))
        self.reject_bare_line_ends = reject_bare_line_ends
        self.size = 0  # octets announced so far (BDAT sizes)
        self.size_exceeded = False
        self.bare_line_ends = False
        self.received_headers = 0
        self._cr = False  # a CR held back from the last feed
        self._in_headers = True
        self._header_tail = b"\n"  # the last octet of header text seen (a line start)
        self.binary = binary
        self._raw_tail = b"\r\n"  # binary: the last raw header octets (CRLF: a line start)

    @property
    def refused(self) -> bool:
        """True once the content will be refused whatever follows."""
        return (
            self.size_exceeded
            or self.line_too_long
            or (self.bare_line_ends and (self.reject_bare_line_ends or self.binary))
        )

    def announce(self, size: int) -> bool:
        """A chunk of ``size`` octets is coming; False (and refused) when it breaks the limit."""
        self.size += size
        if self.size > self.max_size:
            self.size_exceeded = True
        return not self.size_exceeded

    def feed(self, data: bytes) -> bytes:
        """The content of ``data`` to store (line ends made CRLF); empty once refused."""
        if self.binary:
            return self._feed_binary(data)
        return self._feed_text(data)

    def _feed_binary(self, data: bytes) -> bytes:
        """Header octets through the checks, body octets as they are (RFC 3030 §3)."""
        if not self._in_headers:
            return b"" if self.refused else data
        seen = self._raw_tail + data
        end = seen.find(_HEADER_END)
        if end < 0:
            self._raw_tail = seen[-3:]
            return self._feed_text(data)
        cut = end + len(_HEADER_END) - len(self._raw_tail)
        header = self._feed_text(data[:cut])
        self._in_headers = False
        return b"" if self.refused else header + data[cut:]

    def _feed_text(self, data: bytes) -> bytes:
        if self._cr:
            data = b"\r" + data
        self._cr = data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        return self._check(data)

    def finish(self) -> bytes:
        """The last octets (a held-back CR, as CRLF) after the LAST chunk."""
        if not self._cr:
            return b""
        self._cr = False
        return self._check(b"\r")

    def _check(self, data: bytes) -> bytes:
        if not data:
            return b""
        crlf = data.count(CRLF)
        if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
            self.bare_line_ends = True
            data = data.replace(CRLF, b"\n").replace(b"\r", b"\n").replace(b"\n", CRLF)
        self._check_lines(data)
        if self.refused:
            return b""
        if self._in_headers:
            text = self._header_tail + data
            end = text.find(b"\n\r\n")
            header = text if end < 0 else text[: end + 1]
            self.received_headers += len(_RECEIVED.findall(header))
            self._in_headers = end < 0
            self._header_tail = text[-9:]  # shorter than any "\nreceived:"
        return data

    def _check_lines(self, data: bytes) -> None:
        """Carry the length of the current line across chunks; mark an over-long line."""
        first = data.find(b"\n")
        if first < 0:
            self._line += len(data)
        else:
            self._line += len(data[:first].rstrip(b"\r"))
            if self._line <= self.max_line and self._long_line.search(data, first) is not None:
                self._line = self.max_line + 1
            if self._line <= self.max_line:
                self._line = len(data) - data.rfind(b"\n") - 1
        if self._line > self.max_line:
            self.line_too_long = True
