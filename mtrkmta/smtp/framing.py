"""Sans-IO framing of an SMTP/LMTP byte stream into command lines and DATA content."""

from __future__ import annotations

import re
from dataclasses import dataclass

CRLF = b"\r\n"


class LineTooLong:
    """Marker event: a command line exceeded the limit and was discarded up to its CRLF."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LineTooLong()"


OVERLONG = LineTooLong()


class LineFramer:
    """Split a byte stream into CRLF-terminated command lines, one line at a time.

    ``push`` appends received bytes; ``next_line`` frames the next complete line
    only when asked, so the bytes after a line that switches modes (DATA) are
    still exactly as received and ``take_buffer`` hands them over unchanged: a
    bare LF that would end a command line can never turn into a content CRLF.
    The partial-line buffer is bounded: a line longer than ``max_length`` octets
    (CRLF excluded) is discarded up to its LF and reported once as ``OVERLONG``;
    the lines after it are kept. A bare LF also ends a command line, as most
    servers accept.
    """

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._buffer = bytearray()
        self._start = 0  # bytes before this offset were already framed
        self._discarding = False

    def push(self, data: bytes) -> None:
        """Append received bytes."""
        self._buffer += data

    def next_line(self) -> bytes | LineTooLong | None:
        """The next complete line (without its line end), ``OVERLONG``, or None for now."""
        buffer = self._buffer
        end = buffer.find(b"\n", self._start)
        if end < 0:
            if len(buffer) - self._start > self.max_length + 1:
                # This line can no longer be legal: keep only a possible trailing CR.
                self._discarding = True
                del buffer[: len(buffer) - 1]
                self._start = 0
            self._compact()
            return None
        line = bytes(buffer[self._start : end])
        self._start = end + 1
        if self._start > 65536:
            self._compact()
        if self._discarding:
            self._discarding = False
            return OVERLONG
        if line.endswith(b"\r"):
            line = line[:-1]
        return OVERLONG if len(line) > self.max_length else line

    def feed(self, data: bytes) -> list[bytes | LineTooLong]:
        """``push`` then every complete line, in order (for a peer that never switches mode)."""
        self.push(data)
        lines: list[bytes | LineTooLong] = []
        while (line := self.next_line()) is not None:
            lines.append(line)
        return lines

    def take_buffer(self) -> bytes:
        """Remove and return every byte not framed yet, exactly as received (DATA starts)."""
        rest = bytes(self._buffer[self._start :])
        self.reset()
        return rest

    def reset(self) -> None:
        """Forget everything buffered (STARTTLS: nothing sent in clear may run encrypted)."""
        self._buffer = bytearray()
        self._start = 0
        self._discarding = False

    def _compact(self) -> None:
        del self._buffer[: self._start]
        self._start = 0


@dataclass(slots=True)
class DataResult:
    """The outcome of one DATA phase, available once the final ``.`` arrived."""

    content: bytes  # what ``take`` had not handed out yet; empty when refused
    size: int  # octets of content kept so far (dot-unstuffed, line ends normalised)
    line_too_long: bool
    size_exceeded: bool
    bare_line_ends: bool  # a CR or LF not part of a CRLF was seen (RFC 5321 §2.3.8)
    received_headers: int
    leftover: bytes  # bytes after the final ".\r\n": pipelined commands


_RECEIVED = re.compile(rb"(?:^|\n)received:", re.IGNORECASE)


class DataReader:
    """Stream DATA content up to the ``<CRLF>.<CRLF>`` terminator, in bounded memory.

    Only a line consisting of exactly ``.`` followed by CRLF ends DATA: a bare LF
    or CR never does (no SMTP smuggling), and an over-long line never makes us
    leave DATA early — it is read to the end and reported in ``DataResult``.

    ``feed`` decodes what it can (dot-unstuffing, and every bare CR and bare LF
    turned into CRLF, RFC 5321 §2.3.8) and keeps it until ``take`` hands it out:
    a caller that takes after every feed holds no more than one chunk. Nothing is
    kept per line; whole runs of lines are decoded at once. Once the content can
    no longer be accepted (``refused``: over ``max_size``, a line over
    ``max_line``, or a bare line end when ``reject_bare_line_ends``) it is read
    and thrown away up to the terminator.
    """

    # One per session receiving content (20,000 in bench/ (f)): no instance dictionary.
    __slots__ = (
        "_bare",
        "_in_headers",
        "_line_start",
        "_line_too_long",
        "_long_line",
        "_out",
        "_received",
        "_size",
        "_size_exceeded",
        "_tail",
        "max_line",
        "max_size",
        "reject_bare_line_ends",
    )

    def __init__(
        self, max_size: int, max_line: int = 998, *, reject_bare_line_ends: bool = False
    ) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.reject_bare_line_ends = reject_bare_line_ends
        self._long_line = re.compile(rb"[^\r\n]{%d}" % (max_line + 1))
        self._tail = b""  # the last, incomplete line (no LF in it)
        self._line_start = True  # the next byte starts a line (DATA start, or after CRLF)
        self._out: list[bytes] = []
        self._size = 0
        self._line_too_long = False
        self._size_exceeded = False
        self._bare = False
        self._in_headers = True
        self._received = 0

    @property
    def refused(self) -> bool:
        """True once the content will be refused whatever follows: nothing more is kept."""
        return (
            self._line_too_long
            or self._size_exceeded
            or (self._bare and self.reject_bare_line_ends)
        )

    @property
    def size_exceeded(self) -> bool:
        """True once more than ``max_size`` octets of content arrived."""
        return self._size_exceeded

    def feed(self, data: bytes) -> DataResult | None:
        """Consume ``data``; return the result once the terminator is seen, else None."""
        buffer = self._tail + data if self._tail else data
        if self._line_start and buffer[:3] == b".\r\n":
            self._tail = b""
            return self._finish(buffer[3:])
        end = buffer.find(b"\r\n.\r\n")
        if end >= 0:
            self._tail = b""
            self._decode(buffer[: end + 2])
            return self._finish(buffer[end + 5 :])
        last = buffer.rfind(b"\n")
        if last >= 0:
            self._tail = buffer[last + 1 :]
            self._decode(buffer[: last + 1])
        else:
            self._tail = buffer
        if len(self._tail) > self.max_line + 1:
            # Keep only a possible CR of a CRLF: this line is lost anyway.
            self._line_too_long = True
            self._out.clear()
            self._tail = self._tail[-1:]
            self._line_start = False
        return None

    def take(self) -> bytes:
        """The content decoded since the last call (CRLF line ends, dot-unstuffed)."""
        out, self._out = self._out, []
        return b"".join(out)

    def _decode(self, lines: bytes) -> None:
        """Decode a run of whole lines: it starts where a line starts and ends with LF."""
        line_start, self._line_start = self._line_start, lines.endswith(CRLF)
        if self.refused:
            return
        if len(lines) > self.max_line + 2 and self._long_line.search(lines) is not None:
            self._line_too_long = True
            self._out.clear()
            return
        if line_start and lines[:1] == b".":
            lines = lines[1:]
        if b"\r\n." in lines:
            lines = lines.replace(b"\r\n.", CRLF)
        crlf = lines.count(CRLF)
        if lines.count(b"\r") != crlf or lines.count(b"\n") != crlf:
            self._bare = True
            if self.reject_bare_line_ends:
                self._out.clear()
                return
            lines = normalize_line_ends(lines)
        if self._in_headers:
            end = 0 if lines[:2] == CRLF else lines.find(b"\r\n\r\n")
            header = lines if end < 0 else lines[: end + 2 if end else 0]
            self._received += len(_RECEIVED.findall(header))
            self._in_headers = end < 0
        self._size += len(lines)
        if self._size > self.max_size:
            self._size_exceeded = True
            self._out.clear()
            return
        self._out.append(lines)

    def _finish(self, leftover: bytes) -> DataResult:
        content = b"" if self.refused else self.take()
        return DataResult(
            content=content,
            size=self._size,
            line_too_long=self._line_too_long,
            size_exceeded=self._size_exceeded,
            bare_line_ends=self._bare,
            received_headers=self._received,
            leftover=leftover,
        )


def normalize_line_ends(data: bytes) -> bytes:
    """``data`` with every bare CR and every bare LF turned into CRLF; CRLF stays as is.

    RFC 5321 §2.3.8: CR and LF must only occur together as CRLF, and a bare CR
    or LF is the raw material of SMTP smuggling (a lenient receiver may end a
    line, or DATA, there). Pure and stateless: a CR at the very end of ``data``
    counts as bare, so a caller that works in chunks holds a trailing CR back
    until it knows the next byte.
    """
    if data.count(b"\r") == data.count(b"\n") == data.count(CRLF):
        return data  # the usual case: already only CRLF
    return data.replace(CRLF, b"\n").replace(b"\r", b"\n").replace(b"\n", CRLF)
