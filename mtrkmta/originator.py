"""The originator's side of tracking: secret A, ENVID, MTRK parameters and the secrets file."""

from __future__ import annotations

import base64
import email.errors
import email.header
import email.parser
import email.policy
import json
import os
import secrets
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mtrkmta.mtqp.protocol import DEFAULT_PORT
from mtrkmta.mtqp.uri import MtqpUri, format_uri
from mtrkmta.reportfields import join_within
from mtrkmta.smtp import xtext
from mtrkmta.smtp.mtrk import certifier_from_secret, format_mtrk, new_secret, unique_envid

SECRET_BYTES = 32
"""Octets of a fresh secret A: 256 bits, within RFC 3885's 128..1024 (RFC 3885 §3.1, §4.2)."""

SECRETS_FILE = Path(".local") / "share" / "mtrkmta" / "sent.jsonl"
"""Where ``mtrkmta send`` keeps its records, under the home directory (or $XDG_DATA_HOME)."""

SUBJECT_LIMIT = 200
"""Characters of a message's Subject kept in the secrets file (escapes included)."""

# Unicode bidirectional controls (besides the Cc category): they reorder what a terminal shows.
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)

NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})
RET_VALUES = frozenset({"FULL", "HDRS"})


class SecretsFileError(Exception):
    """The secrets file cannot be read, or holds no usable record."""


@dataclass(frozen=True, slots=True)
class TrackingSecret:
    """What makes one submission trackable: the secret A and the unique ENVID (decoded)."""

    secret: bytes
    envid: str

    @property
    def secret_text(self) -> str:
        """A in base64, as TRACK and the mtqp URI carry it."""
        return base64.b64encode(self.secret).decode("ascii")

    @property
    def certifier(self) -> bytes:
        """B = SHA1(A), what the MTAs store (RFC 3885 §3.1)."""
        return certifier_from_secret(self.secret)


def new_tracking(fqdn: str) -> TrackingSecret:
    """A fresh secret (``secrets``) and a fresh ENVID ``<random>@<fqdn>`` (RFC 3885 §3.1,
    §3.2, §4.2).

    The local part has 128 random bits, so an ENVID is never reused (3885 §3.2); an
    overlong ``fqdn`` is replaced by its hash as RFC 3885 §3.2 says.
    """
    local = secrets.token_urlsafe(16)  # letters, digits, '-' and '_': xtext as it is
    return TrackingSecret(secret=new_secret(SECRET_BYTES), envid=unique_envid(local, fqdn))


def mail_options(
    tracking: TrackingSecret, *, timeout: int | None = None, ret: str | None = None
) -> list[str]:
    """The MAIL parameters: ``ENVID=`` (xtext), ``MTRK=base64(B)[:timeout]``, ``RET=``."""
    options = [
        f"ENVID={xtext.encode(tracking.envid)}",
        f"MTRK={format_mtrk(tracking.certifier, timeout)}",
    ]
    if ret is not None:
        if ret.upper() not in RET_VALUES:
            raise ValueError(f"RET must be FULL or HDRS, not {ret!r}")
        options.append(f"RET={ret.upper()}")
    return options


def rcpt_options(notify: Sequence[str] | None) -> list[str]:
    """``NOTIFY=`` from its values: NEVER alone, or some of SUCCESS, FAILURE, DELAY."""
    if not notify:
        return []
    values = [value.strip().upper() for value in notify if value.strip()]
    if values == ["NEVER"]:
        return ["NOTIFY=NEVER"]
    if not values or any(value not in NOTIFY_VALUES for value in values):
        raise ValueError("NOTIFY is NEVER, or a list of SUCCESS, FAILURE and DELAY")
    return ["NOTIFY=" + ",".join(dict.fromkeys(values))]


def tracking_uri(tracking: TrackingSecret, host: str, port: int = DEFAULT_PORT) -> str:
    """The mtqp URI that tracks this submission at ``host`` (RFC 3887 §9)."""
    envid = xtext.encode(tracking.envid)
    return format_uri(MtqpUri(host=host, envid=envid, secret=tracking.secret_text, port=port))


# -- the secrets file --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SentRecord:
    """One line of the secrets file: a message sent with ``mtrkmta send``.

    ``secret`` is A in base64 (the MTQP password: the file is mode 0600), ``envid``
    the decoded ENVID, ``server`` the SMTP server it went to (``host:port``),
    ``mtqp`` the URI to track it, ``sent_at`` an ISO 8601 time, ``subject`` the message's
    Subject as :func:`message_subject` gives it (empty in records written before it was kept).
    """

    envid: str
    secret: str
    server: str
    mtqp: str
    sender: str
    recipients: tuple[str, ...]
    sent_at: str
    subject: str = ""

    def to_json(self) -> str:
        data = asdict(self)
        data["recipients"] = list(self.recipients)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> SentRecord:
        """A record from one decoded line; KeyError/TypeError/ValueError when it is not one."""
        recipients = data["recipients"]
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise TypeError("recipients must be a list of strings")
        values = {}
        for name in ("envid", "secret", "server", "mtqp", "sender", "sent_at"):
            value = data[name]
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string")
            values[name] = value
        subject = data.get("subject", "")
        if not isinstance(subject, str):
            raise TypeError("subject must be a string")
        return cls(recipients=tuple(recipients), subject=subject, **values)


def printable(text: str, limit: int = SUBJECT_LIMIT) -> str:
    """``text`` on one line: control characters escaped (``\\x1b``, ``\\u202e``), at most
    ``limit`` characters, an ellipsis ending what was cut (never inside an escape)."""
    pieces = [
        char.encode("unicode_escape").decode("ascii")
        if unicodedata.category(char) == "Cc" or char in _BIDI_CONTROLS
        else char
        for char in text
    ]
    return join_within(pieces, limit, "\u2026")


def message_subject(content: bytes) -> str:
    """The Subject of the message ``content`` (its header section), unfolded and decoded as
    RFC 2047 encoded-words say, through :func:`printable`; empty when it has none."""
    # The header section as UTF-8 (RFC 6532 allows it raw); an invalid octet shows as U+FFFD.
    section = content.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
    raw = email.parser.Parser(policy=email.policy.compat32).parsestr(section, headersonly=True)
    value = raw.get("Subject")
    if value is None:
        return ""
    unfolded = "".join(str(value).split("\n"))
    try:
        text = str(email.header.make_header(email.header.decode_header(unfolded)))
    except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
        text = ""
    if not text.strip():
        text = unfolded  # a malformed encoded-word is shown as written
    return printable(text.strip())


def default_secrets_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME/mtrkmta/sent.jsonl``, by default ``~/.local/share/mtrkmta/sent.jsonl``."""
    env = os.environ if environ is None else environ
    data_home = env.get("XDG_DATA_HOME", "")
    if data_home and os.path.isabs(data_home):
        return Path(data_home) / "mtrkmta" / "sent.jsonl"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / SECRETS_FILE


def append_record(path: Path, record: SentRecord) -> None:
    """Append ``record`` as one JSON line, durably; the file is (made) mode 0600, its new
    directories 0700. Blocking."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        data = (record.to_json() + "\n").encode("utf-8")
        while data:
            written = os.write(fd, data)
            data = data[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class SecretsFile:
    """What the secrets file holds: its records, oldest first, and the numbers (from 1)
    of its lines that are no record (damaged), skipped."""

    path: Path
    records: tuple[SentRecord, ...]
    damaged: tuple[int, ...] = ()

    def newest_first(self) -> list[SentRecord]:
        """The records as ``mtrkmta sent`` numbers them: 1 is the last one sent."""
        return list(reversed(self.records))

    def pick(self, number: int) -> SentRecord:
        """The ``number``-th record, newest first (1 is the last sent)."""
        if not self.records:
            raise SecretsFileError(f"{self.path}: no message recorded")
        if not 1 <= number <= len(self.records):
            raise SecretsFileError(
                f"{self.path}: no message number {number}; "
                f"it records {len(self.records)} (see `mtrkmta sent`)"
            )
        return self.records[-number]


def load_secrets(path: Path) -> SecretsFile:
    """The secrets file at ``path``; SecretsFileError when it cannot be read."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SecretsFileError(f"{path}: no such file (send a message first)") from None
    except OSError as error:
        raise SecretsFileError(f"{path}: {error.strerror or error}") from None
    records = []
    damaged = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            decoded = json.loads(line.decode("utf-8"))
            if not isinstance(decoded, dict):
                raise TypeError("not a JSON object")
            records.append(SentRecord.from_json(decoded))
        except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
            damaged.append(number)
    return SecretsFile(path, tuple(records), tuple(damaged))


def read_records(path: Path) -> list[SentRecord]:
    """Every record of the secrets file, oldest first; unreadable lines are skipped."""
    return list(load_secrets(path).records)


def last_record(path: Path) -> SentRecord:
    """The most recent record of the secrets file."""
    records = read_records(path)
    if not records:
        raise SecretsFileError(f"{path}: no message recorded")
    return records[-1]
