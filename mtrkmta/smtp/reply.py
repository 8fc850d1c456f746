"""SMTP replies: the Reply value, SMTPError, and an incremental reader for received replies."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
# Reply-code (RFC 5321 §4.2): first digit 2-5, the other two any digit (tolerant reading).
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)", re.DOTALL)
_LEADING_ENHANCED = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |$)")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: three-digit code, optional RFC 3463 enhanced code, text lines.

    ``enhanced`` (e.g. ``"5.5.4"``) must have the same class digit as ``code``; it is
    repeated on every rendered line, as RFC 2034 §3 requires. An empty ``lines``
    renders like a single empty line. Lines must not contain CR or LF.
    """

    code: int
    enhanced: str | None = None
    lines: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.code, int) or not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code!r}")
        if self.enhanced is not None:
            if not _ENHANCED.fullmatch(self.enhanced):
                raise ValueError(f"malformed enhanced status code: {self.enhanced!r}")
            if self.enhanced[0] != str(self.code)[0]:
                raise ValueError(f"enhanced code {self.enhanced} does not match {self.code}")
        lines = tuple(self.lines)
        for line in lines:
            if not isinstance(line, str) or "\r" in line or "\n" in line:
                raise ValueError(f"reply line must be a str without CR/LF: {line!r}")
        object.__setattr__(self, "lines", lines)

    @property
    def text(self) -> str:
        """All text lines joined with a newline (enhanced code not included)."""
        return "\n".join(self.lines)

    @property
    def is_positive(self) -> bool:
        """True for 2xx (completion) replies."""
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        """True for 3xx replies (e.g. 354 after DATA)."""
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        """True for 4xx (temporary failure) replies."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """True for 5xx (permanent failure) replies."""
        return 500 <= self.code < 600

    def render(self) -> bytes:
        """The reply on the wire: ``250-...`` continuation lines, CRLF-terminated, UTF-8."""
        lines = self.lines or ("",)
        out: list[str] = []
        last = len(lines) - 1
        for index, line in enumerate(lines):
            if self.enhanced is not None:
                text = f"{self.enhanced} {line}" if line else self.enhanced
            else:
                text = line
            if index < last:
                out.append(f"{self.code}-{text}\r\n")
            elif text:
                out.append(f"{self.code} {text}\r\n")
            else:
                out.append(f"{self.code}\r\n")
        return "".join(out).encode("utf-8")


class SMTPError(Exception):
    """A failure to be answered with ``.reply``; raised by every parser of this package."""

    def __init__(self, code: int, enhanced: str | None, *lines: str) -> None:
        super().__init__(code, enhanced, *lines)
        self.reply = Reply(code, enhanced, lines)

    @classmethod
    def from_reply(cls, reply: Reply) -> SMTPError:
        """Wrap an existing Reply."""
        return cls(reply.code, reply.enhanced, *reply.lines)

    def __str__(self) -> str:
        reply = self.reply
        head = f"{reply.code} {reply.enhanced}" if reply.enhanced else str(reply.code)
        return " ".join((head, *reply.lines)) if reply.lines else head


class MalformedReply(ValueError):
    """A received reply line that is not ``NNN``, ``NNN text`` or ``NNN-text``."""


class ReplyReader:
    """Assemble received reply lines into Replies (client side, sans-IO).

    Feed each received line (with or without its CRLF) to :meth:`feed`; it returns
    None while a multi-line reply continues and the complete :class:`Reply` when
    the last line (``NNN text``, ``NNN `` or bare ``NNN``) arrives. A leading
    enhanced status code whose class matches the reply code is extracted from the
    first line and stripped from every line that repeats it. On
    :class:`MalformedReply` the partial reply is discarded.
    """

    def __init__(self, max_lines: int = 1000) -> None:
        self._max_lines = max_lines
        self._code: int | None = None
        self._texts: list[str] = []

    @property
    def pending(self) -> bool:
        """True while a multi-line reply has started but not ended."""
        return self._code is not None

    def reset(self) -> None:
        """Discard any partially received reply."""
        self._code = None
        self._texts = []

    def feed(self, line: bytes) -> Reply | None:
        """Take one received line; return the Reply it completes, if any."""
        if line.endswith(b"\r\n"):
            line = line[:-2]
        elif line.endswith(b"\n"):
            line = line[:-1]
        match = _REPLY_LINE.fullmatch(line)
        if match is None or (match.group(2) == b"" and match.group(3) != b""):
            self.reset()
            raise MalformedReply(f"malformed reply line: {line[:80]!r}")
        text_bytes = match.group(3)
        if b"\r" in text_bytes or b"\n" in text_bytes:
            self.reset()
            raise MalformedReply(f"CR or LF inside a reply line: {line[:80]!r}")
        code = int(match.group(1))
        if self._code is None:
            self._code = code
        elif code != self._code:
            expected = self._code
            self.reset()
            raise MalformedReply(f"reply code changed from {expected} to {code} mid-reply")
        if len(self._texts) >= self._max_lines:
            self.reset()
            raise MalformedReply(f"reply longer than {self._max_lines} lines")
        self._texts.append(text_bytes.decode("utf-8", errors="replace"))
        if match.group(2) == b"-":
            return None
        texts = self._texts
        self.reset()
        return _build(code, texts)


def _build(code: int, texts: list[str]) -> Reply:
    first = _LEADING_ENHANCED.match(texts[0])
    if first is None or first.group(1)[0] != str(code)[0]:
        return Reply(code, None, tuple(texts))
    enhanced = first.group(1)
    lines: list[str] = []
    for text in texts:
        found = _LEADING_ENHANCED.match(text)
        if found is not None and found.group(1) == enhanced:
            text = text[found.end() :]
        lines.append(text)
    return Reply(code, enhanced, tuple(lines))
