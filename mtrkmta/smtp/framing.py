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
    """Split a byte stream into CRLF-terminated command lines.

    The partial-line buffer is bounded: a line longer than ``max_length`` octets
    (CRLF excluded) is discarded up to its CRLF and reported once as
    ``OVERLONG``, and the lines pipelined after it are kept. A bare LF also
    ends a command line, as most servers accept.
    """

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._partial = b""
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | LineTooLong]:
        """Consume ``data``; return the complete lines (without line end) in order."""
        buffer = self._partial + data if self._partial else data
        pieces = buffer.split(b"\n")
        tail = pieces.pop()
        events: list[bytes | LineTooLong] = []
        for piece in pieces:
            if piece.endswith(b"\r"):
                piece = piece[:-1]
            if self._discarding:
                self._discarding = False
                events.append(OVERLONG)
            elif len(piece) > self.max_length:
                events.append(OVERLONG)
            else:
                events.append(piece)
        if len(tail) > self.max_length + 1:
            self._discarding = True
            tail = tail[-1:]
        elif self._discarding:
            tail = tail[-1:]
        self._partial = tail
        return events

    def take_buffer(self) -> bytes:
        """Remove and return the unconsumed partial line (used when DATA starts)."""
        tail, self._partial = self._partial, b""
        self._discarding = False
        return tail

    def reset(self) -> None:
        """Forget everything buffered (STARTTLS: nothing sent in clear may run encrypted)."""
        self._partial = b""
        self._discarding = False


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
