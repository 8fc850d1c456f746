"""Sans-IO framing of an SMTP/LMTP byte stream into command lines and DATA content."""

from __future__ import annotations

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

    content: bytes  # dot-unstuffed, CRLF line ends; empty when size_exceeded
    size: int  # octets of content as received after unstuffing
    line_too_long: bool
    size_exceeded: bool
    received_headers: int
    leftover: bytes  # bytes after the final ".\r\n": pipelined commands


class DataReader:
    """Read DATA content up to the ``<CRLF>.<CRLF>`` terminator.

    Only a line consisting of exactly ``.`` followed by CRLF ends DATA: a bare LF
    never does (no SMTP smuggling), and an over-long line never makes us leave
    DATA early — it is read to the end and reported in ``DataResult``. Content
    beyond ``max_size`` is counted but not kept, so memory stays bounded.
    Bare LFs inside a line are normalised to CRLF.
    """

    def __init__(self, max_size: int, max_line: int = 998) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self._partial = b""
        self._lines: list[bytes] = []
        self._size = 0
        self._line_too_long = False
        self._size_exceeded = False
        self._in_headers = True
        self._received = 0

    def feed(self, data: bytes) -> DataResult | None:
        """Consume ``data``; return the result once the terminator is seen, else None."""
        buffer = self._partial + data if self._partial else data
        lines = buffer.split(CRLF)
        self._partial = lines.pop()
        for index, line in enumerate(lines):
            if line == b".":
                leftover = CRLF.join([*lines[index + 1 :], self._partial])
                return self._finish(leftover)
            self._take(line)
        if len(self._partial) > self.max_line + 1:
            # Keep only a possible trailing CR of the over-long line; the rest is lost anyway.
            self._line_too_long = True
            self._partial = self._partial[-1:]
        return None

    def _take(self, line: bytes) -> None:
        if len(line) > self.max_line:
            self._line_too_long = True
        if line[:1] == b".":
            line = line[1:]
        if b"\n" in line:
            line = line.replace(b"\r\n", b"\n").replace(b"\n", CRLF)
        if self._in_headers:
            if not line:
                self._in_headers = False
            elif line[:9].lower() == b"received:":
                self._received += 1
        self._size += len(line) + 2
        if self._size_exceeded:
            return
        if self._size > self.max_size:
            self._size_exceeded = True
            self._lines = []
            return
        self._lines.append(line)

    def _finish(self, leftover: bytes) -> DataResult:
        lines, self._lines = self._lines, []
        content = CRLF.join(lines) + CRLF if lines else b""
        return DataResult(
            content=content,
            size=self._size,
            line_too_long=self._line_too_long,
            size_exceeded=self._size_exceeded,
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
