"""The originator's side of tracking: secret A, ENVID, MTRK parameters and the secrets file."""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mtrkmta.mtqp.protocol import DEFAULT_PORT
from mtrkmta.mtqp.uri import MtqpUri, format_uri
from mtrkmta.smtp import xtext
from mtrkmta.smtp.mtrk import certifier_from_secret, format_mtrk, new_secret, unique_envid

SECRET_BYTES = 32
"""Octets of a fresh secret A: 256 bits, within RFC 3885's 128..1024 (RFC 3885 §3.1, §4.2)."""

SECRETS_FILE = Path(".local") / "share" / "mtrkmta" / "sent.jsonl"
"""Where ``mtrkmta send`` keeps its records, under the home directory (or $XDG_DATA_HOME)."""

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
    ``mtqp`` the URI to track it, ``sent_at`` an ISO 8601 time.
    """

    envid: str
    secret: str
    server: str
    mtqp: str
    sender: str
    recipients: tuple[str, ...]
    sent_at: str

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
        return cls(recipients=tuple(recipients), **values)


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


def read_records(path: Path) -> list[SentRecord]:
    """Every record of the secrets file, oldest first; unreadable lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SecretsFileError(f"{path}: no such file (send a message first)") from None
    except OSError as error:
        raise SecretsFileError(f"{path}: {error.strerror or error}") from None
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if isinstance(data, dict):
                records.append(SentRecord.from_json(data))
        except (ValueError, KeyError, TypeError):
            continue
    return records


def last_record(path: Path) -> SentRecord:
    """The most recent record of the secrets file."""
    records = read_records(path)
    if not records:
        raise SecretsFileError(f"{path}: no message recorded")
    return records[-1]
