"""Sans-IO MTQP (RFC 3887): command parsing, responses, greetings and a response reader."""

from __future__ import annotations

import base64
import binascii
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from mtrkmta.smtp import xtext
from mtrkmta.smtp.mtrk import certifier_from_secret

MAX_LINE = 998  # octets before CRLF: commands, response lines, data lines (3887 §2.2-2.3)
DEFAULT_PORT = 1038  # 3887 §2, §10
INDICATORS = ("+OK", "+OK+", "-TEMP", "-ERR", "-BAD")
MULTILINE = "+OK+"
OPTION_WIDTH = 78  # greeting option lines are wrapped onto continuation lines beyond this
GREETING_TAG = "MTQP"  # the response information every greeting carries (3887 §3)

_COMMAND_LINE = re.compile(rb"[\t -~]*")  # printable ASCII, SP and HTAB (3887 §2.2)
_NAMECHARS = re.compile(r"[A-Za-z0-9_-]+")  # NAMECHAR = ALPHA / DIGIT / "-" / "_"
_OPT_TEXT = re.compile(r"(?:[!-~][\t -~]*)?")  # text after the separating WSP
_VCHARS = re.compile(r"[!-~]+")
_BASE64 = re.compile(r"([A-Za-z0-9+/]+)(={0,2})")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")  # sub-domain 1*("." sub-domain)
_STATUS_LINE = re.compile(
    rb"(\+OK\+|\+OK|-TEMP|-ERR|-BAD)((?:/[A-Za-z0-9_-]+)*)(?:[ \t]+(.*))?", re.IGNORECASE
)


class MtqpError(ValueError):
    """Base of the MTQP errors of this module."""


class SecretError(MtqpError):
    """An mtrk-secret that is not base64."""


class CommandError(MtqpError):
    """An unknown, unimplemented or malformed command; answer with ``.response`` (-BAD)."""

    def __init__(self, text: str, *codes: str) -> None:
        super().__init__(text)
        self.response = Response("-BAD", codes, text)


class MalformedResponse(MtqpError):
    """A received response that breaks the RFC 3887 §12 grammar."""


# --- commands ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Track:
    """TRACK: the decoded unique-envid and the base64 mtrk-secret A (3887 §4).

    Neither shows in ``repr``: TRACK arguments are never logged (RFC 3885 §4.2, RFC 3887 §11).
    """

    envid: str = field(repr=False)
    secret: str = field(repr=False)

    def certifier(self) -> bytes:
        """SHA1(A): what the tracking store compares with its B (RFC 3887 §4)."""
        return secret_certifier(self.secret)

    def render(self) -> bytes:
        """The command line, the envid xtext-encoded as in ENVID=."""
        return f"TRACK {xtext.encode(self.envid)} {self.secret}\r\n".encode("ascii")


@dataclass(frozen=True, slots=True)
class StartTLS:
    """STARTTLS with the FQDN the client believes it is talking to (3887 §6)."""

    fqdn: str

    def render(self) -> bytes:
        """The command line."""
        return f"STARTTLS {self.fqdn}\r\n".encode("ascii")


@dataclass(frozen=True, slots=True)
class Quit:
    """QUIT (3887 §7)."""

    def render(self) -> bytes:
        """The command line."""
        return b"QUIT\r\n"


@dataclass(frozen=True, slots=True)
class Comment:
    """COMMENT with its (ignored) text (3887 §5)."""

    text: str = ""

    def render(self) -> bytes:
        """The command line."""
        return f"COMMENT {self.text}\r\n".encode("ascii") if self.text else b"COMMENT\r\n"


Command: TypeAlias = Track | StartTLS | Quit | Comment
"""Any parsed MTQP command."""


def parse_command(line: bytes) -> Command:
    """Parse one command line, with or without its CRLF (RFC 3887 §2.2-§2.3, §4-§7, §12).

    Keywords are case-insensitive and arguments separated by 1+ SP/HTAB; trailing
    blanks are ignored. TRACK takes the unique-envid (xtext, an ``@`` in it; one
    surrounding ``<...>`` pair is stripped: project decision,
    doc/conformance.rst 3887-P2) and a base64
    secret; STARTTLS one FQDN; QUIT nothing; COMMENT any text. Anything else, a
    line over 998 octets or with octets outside printable ASCII raises
    :class:`CommandError` (-BAD).
    """
    if line.endswith(b"\r\n"):
        line = line[:-2]
    elif line.endswith(b"\n"):
        line = line[:-1]
    if len(line) > MAX_LINE:
        raise CommandError(f"command line longer than {MAX_LINE} octets")
    if not _COMMAND_LINE.fullmatch(line):
        raise CommandError("command line is not printable ASCII")
    text = line.decode("ascii")
    word = re.split(r"[ \t]", text, maxsplit=1)[0]
    keyword, rest = word.upper(), text[len(word) :]
    args = rest.split()
    if keyword == "TRACK":
        if len(args) != 2:
            raise CommandError("TRACK needs a unique-envid and an mtrk-secret")
        return Track(decode_envid(args[0]), _track_secret(args[1]))
    if keyword == "STARTTLS":
        if len(args) != 1:
            raise CommandError("STARTTLS needs exactly one FQDN")
        if not _DOMAIN.fullmatch(args[0]) or len(args[0]) > 253:
            raise CommandError("STARTTLS argument is not a fully qualified domain name")
        return StartTLS(args[0])
    if keyword == "QUIT":
        if args:
            raise CommandError("QUIT takes no argument")
        return Quit()
    if keyword == "COMMENT":
        return Comment(rest.lstrip(" \t"))
    if not keyword:
        raise CommandError("empty command")
    raise CommandError("unknown command")


def decode_envid(word: str) -> str:
    """The unique-envid of a TRACK argument: one ``<...>`` pair stripped, xtext-decoded.

    Lower-case hex after ``+`` is accepted; the result must contain ``@`` and only
    printable ASCII, SP or HTAB (RFC 3461 §4.4, RFC 3887 §2.2). Raises :class:`CommandError`.
    """
    if len(word) >= 2 and word[0] == "<" and word[-1] == ">":
        word = word[1:-1]
    try:
        envid = xtext.decode(word, lenient=True)
    except xtext.XtextError:
        raise CommandError("unique-envid is not xtext") from None
    if "@" not in envid:
        raise CommandError("unique-envid has no '@'")
    if any(not (" " <= char <= "~" or char == "\t") for char in envid):
        raise CommandError("unique-envid decodes to control or non-ASCII characters")
    return envid


def _track_secret(word: str) -> str:
    try:
        decode_secret(word)
    except SecretError:
        raise CommandError("mtrk-secret is not base64") from None
    return word


def decode_secret(text: str) -> bytes:
    """The secret A from its base64 form, padded or not; raises :class:`SecretError`."""
    match = _BASE64.fullmatch(text)
    if match is None:
        raise SecretError("mtrk-secret is not base64")
    body, padding = match.group(1), match.group(2)
    needed = -len(body) % 4
    if needed == 3 or (padding and len(padding) != needed):
        raise SecretError("mtrk-secret has bad base64 padding")
    try:
        return base64.b64decode(body + "=" * needed, validate=True)
    except binascii.Error:
        raise SecretError("mtrk-secret is not base64") from None


def secret_certifier(secret_b64: str) -> bytes:
    """SHA1(base64-decode(secret)): the certifier B for a TRACK secret (RFC 3887 §4,
    RFC 3885 §3.1).

    Padded and unpadded base64 are accepted; anything else raises :class:`SecretError`.
    """
    return certifier_from_secret(decode_secret(secret_b64))


# --- responses ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    """One MTQP response (3887 §2.3, §12).

    ``codes`` are the ``/`` response-information groups (NAMECHARs, compared
    case-insensitively), ``text`` the log text, ``data_lines`` the lines of a
    ``+OK+`` response before dot-stuffing. Only ``+OK+`` carries data lines.
    """

    indicator: str
    codes: tuple[str, ...] = ()
    text: str = ""
    data_lines: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if self.indicator not in INDICATORS:
            raise ValueError(f"unknown status indicator {self.indicator!r}")
        codes = tuple(self.codes)
        for code in codes:
            if not isinstance(code, str) or not _NAMECHARS.fullmatch(code):
                raise ValueError(f"malformed response code {code!r}")
        if not isinstance(self.text, str) or not _OPT_TEXT.fullmatch(self.text):
            raise ValueError(f"response text must be printable ASCII: {self.text!r}")
        lines = tuple(self.data_lines)
        if lines and self.indicator != MULTILINE:
            raise ValueError(f"{self.indicator} carries no data lines")
        for data in lines:
            if not isinstance(data, bytes) or b"\r" in data or b"\n" in data:
                raise ValueError(f"data line must be bytes without CR/LF: {data[:40]!r}")
            if len(data) + data.startswith(b".") > MAX_LINE:
                raise ValueError(f"data line longer than {MAX_LINE} octets")
        object.__setattr__(self, "codes", codes)
        object.__setattr__(self, "data_lines", lines)
        if len(self.status_line()) > MAX_LINE:
            raise ValueError(f"status line longer than {MAX_LINE} octets")

    @classmethod
    def multiline(cls, body: bytes, *, codes: Sequence[str] = (), text: str = "") -> Response:
        """A ``+OK+`` response whose data is ``body`` (CRLF or LF line ends)."""
        lines = re.split(rb"\r\n|\n", body)
        if lines and lines[-1] == b"":
            lines.pop()
        return cls(MULTILINE, tuple(codes), text, tuple(lines))

    @property
    def is_positive(self) -> bool:
        """True for ``+OK`` and ``+OK+``."""
        return self.indicator.startswith("+")

    @property
    def body(self) -> bytes:
        """The data lines, un-stuffed, each ended by CRLF."""
        return b"".join(data + b"\r\n" for data in self.data_lines)

    def has_code(self, code: str) -> bool:
        """True when ``code`` is among the response information (case-insensitive)."""
        wanted = code.lower()
        return any(own.lower() == wanted for own in self.codes)

    def status_line(self) -> bytes:
        """The first line without CRLF: indicator, ``/code`` groups, then the text."""
        head = self.indicator + "".join("/" + code for code in self.codes)
        return (f"{head} {self.text}" if self.text else head).encode("ascii")

    def render(self) -> bytes:
        """The response on the wire; a ``+OK+`` one dot-stuffed and ended by ``.`` CRLF."""
        out = [self.status_line(), b"\r\n"]
        if self.indicator == MULTILINE:
            for data in self.data_lines:
                if data.startswith(b"."):
                    out.append(b".")
                out.append(data)
                out.append(b"\r\n")
            out.append(b".\r\n")
        return b"".join(out)


class ResponseReader:
    """Assemble received lines into Responses (client side, sans-IO; RFC 3887 §2.2-§2.3, §12).

    Feed each line (with or without CRLF) to :meth:`feed`: it returns the
    :class:`Response` a line completes, else None. A ``+OK+`` response collects
    data lines up to the lone ``.``, removing the stuffed leading dot. Raises
    :class:`MalformedResponse` (and drops the partial response) on a bad status
    line, a line over 998 octets, or more than ``max_lines`` data lines.
    """

    def __init__(self, max_lines: int = 100_000) -> None:
        self._max_lines = max_lines
        self._head: Response | None = None
        self._data: list[bytes] = []

    @property
    def pending(self) -> bool:
        """True while a multi-line response has started but not ended."""
        return self._head is not None

    def reset(self) -> None:
        """Discard any partially received response."""
        self._head = None
        self._data = []

    def feed(self, line: bytes) -> Response | None:
        """Take one received line; return the Response it completes, if any."""
        if line.endswith(b"\r\n"):
            line = line[:-2]
        elif line.endswith(b"\n"):
            line = line[:-1]
        if len(line) > MAX_LINE or b"\r" in line or b"\n" in line:
            self.reset()
            raise MalformedResponse(f"response line too long or broken: {line[:80]!r}")
        if self._head is None:
            head = _status(line)
            if head.indicator != MULTILINE:
                return head
            self._head = head
            return None
        if line == b".":
            head, data = self._head, self._data
            self.reset()
            return Response(MULTILINE, head.codes, head.text, tuple(data))
        if len(self._data) >= self._max_lines:
            self.reset()
            raise MalformedResponse(f"multi-line response longer than {self._max_lines} lines")
        self._data.append(line[1:] if line.startswith(b".") else line)
        return None


def _status(line: bytes) -> Response:
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise MalformedResponse(f"malformed status line: {line[:80]!r}")
    indicator = match.group(1).decode("ascii").upper()
    codes = tuple(code for code in match.group(2).decode("ascii").split("/") if code)
    raw = (match.group(3) or b"").decode("ascii", errors="replace")
    text = "".join(char if " " <= char <= "~" or char == "\t" else "?" for char in raw)
    return Response(indicator, codes, text)


# --- greeting ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Option:
    """One option of a ``+OK+`` greeting: identifier and parameters (3887 §3).

    Identifiers are case-insensitive; ``vnd.<reversed-domain>.<name>`` ones are
    vendor options.
    """

    identifier: str
    parameters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        parameters = tuple(self.parameters)
        for word in (self.identifier, *parameters):
            if not isinstance(word, str) or not _VCHARS.fullmatch(word):
                raise ValueError(f"option words must be printable ASCII: {word!r}")
            if len(word) > MAX_LINE - 1:
                raise ValueError("option word too long for a line")
        object.__setattr__(self, "parameters", parameters)

    def lines(self) -> tuple[bytes, ...]:
        """The option's lines, wrapped at OPTION_WIDTH; continuation lines start with SP."""
        wrapped = textwrap.wrap(
            " ".join((self.identifier, *self.parameters)),
            width=OPTION_WIDTH,
            subsequent_indent=" ",
            break_long_words=False,
            break_on_hyphens=False,
        )
        return tuple(line.encode("ascii") for line in wrapped)


def starttls_option(*, required: bool = False) -> Option:
    """``STARTTLS`` or ``STARTTLS required`` (RFC 3887 §3)."""
    return Option("STARTTLS", ("required",) if required else ())


def greeting(
    text: str = "MTQP server ready", *, options: Sequence[Option] = (), multiline: bool = False
) -> Response:
    """The positive greeting (RFC 3887 §3).

    ``+OK/MTQP text`` without options (unless ``multiline``), else ``+OK+/MTQP
    text`` with one option per line; after TLS pass options without STARTTLS
    (RFC 3887 §6).
    """
    if not options and not multiline:
        return Response("+OK", (GREETING_TAG,), text)
    lines = tuple(line for option in options for line in option.lines())
    return Response(MULTILINE, (GREETING_TAG,), text, lines)


def negative_greeting(reason: str, text: str = "Service unavailable") -> Response:
    """``-TEMP/MTQP/admin`` (maintenance) or ``-ERR/MTQP/unavailable`` (RFC 3887 §3)."""
    if reason == "admin":
        return Response("-TEMP", (GREETING_TAG, "admin"), text)
    if reason == "unavailable":
        return Response("-ERR", (GREETING_TAG, "unavailable"), text)
    raise ValueError(f"greeting reason must be admin or unavailable, not {reason!r}")


@dataclass(frozen=True, slots=True)
class Greeting:
    """A received greeting and the options it lists."""

    response: Response
    options: tuple[Option, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the server is ready for commands."""
        return self.response.is_positive

    def option(self, identifier: str) -> Option | None:
        """The option named ``identifier`` (case-insensitive), if listed."""
        wanted = identifier.lower()
        return next((o for o in self.options if o.identifier.lower() == wanted), None)

    @property
    def starttls(self) -> bool:
        """True when STARTTLS is offered."""
        return self.option("STARTTLS") is not None

    @property
    def starttls_required(self) -> bool:
        """True when STARTTLS is offered with the ``required`` parameter."""
        option = self.option("STARTTLS")
        return option is not None and any(p.lower() == "required" for p in option.parameters)


def parse_greeting(response: Response) -> Greeting:
    """Check the ``/MTQP`` tag and read the option lines (RFC 3887 §3)."""
    if not response.has_code(GREETING_TAG):
        raise MalformedResponse("greeting without /MTQP")
    return Greeting(response, parse_options(response.data_lines))


def parse_options(lines: Iterable[bytes]) -> tuple[Option, ...]:
    """Options from greeting data lines, joining continuation lines (3887 §3)."""
    specs: list[str] = []
    for raw in lines:
        line = raw.decode("ascii", errors="replace")
        if not line.strip(" \t"):
            continue
        if line[0] in " \t":
            if not specs:
                raise MalformedResponse("option continuation line without an option")
            specs[-1] += line
        else:
            specs.append(line)
    options = []
    for spec in specs:
        words = spec.split()
        if any(not _VCHARS.fullmatch(word) for word in words):
            raise MalformedResponse(f"option with non-ASCII text: {spec[:80]!r}")
        options.append(Option(words[0], tuple(words[1:])))
    return tuple(options)
