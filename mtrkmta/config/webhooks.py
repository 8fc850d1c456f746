"""Webhooks: the ``[webhooks.NAME]`` tables, where tracking events are POSTed as signed JSON."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mtrkmta.config.convert import (
    KiB,
    MiB,
    _Context,
    _domain_name,
    _duration,
    _got,
    _integer,
    _Invalid,
    _optional_file,
    _size,
    _string,
)

# The values of mtrkmta.tracking.interfaces.EventKind (the config room sits below
# tracking; tests/unit/test_webhook_rules.py keeps the two equal).
EVENT_KINDS = (
    "arrived", "queued", "deferred", "delivered", "transferred", "relayed", "expanded", "failed",
    "bounced", "held", "released", "quarantined", "deleted", "dsn-sent",
)  # fmt: skip

MAX_HOOK_NAME = 64  # the outbox's hook column
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class Webhook:
    """One receiver of tracking events: ``[webhooks.NAME]``.

    ``events`` are EventKind values; ``senders`` empty means every message's events,
    else only those of messages whose envelope sender is one of these addresses or
    has one of these domains. Times in seconds.
    """

    name: str
    url: str
    secret_file: Path
    events: frozenset[str] = frozenset(EVENT_KINDS)
    senders: tuple[str, ...] = ()
    ca_file: Path | None = None
    timeout: float = 10.0  # connecting and the whole request, each
    max_age: float = 3 * 24 * 3600.0  # retried this long after the event, then dropped
    first_retry: float = 10.0
    max_retry_interval: float = 3600.0
    concurrency: int = 4  # requests in flight to this hook at once
    max_response: int = 64 * KiB  # bytes of a response body read (the rest is not)

    def wants(self, kind: str, sender: str) -> bool:
        """Whether an event of ``kind`` of a message from ``sender`` goes to this hook."""
        if kind not in self.events:
            return False
        if not self.senders:
            return True
        address = sender.lower()
        domain = address.rpartition("@")[2] if "@" in address else None
        return any(s == address or (domain is not None and s == domain) for s in self.senders)


_KEYS = (
    "url", "secret_file", "events", "senders", "ca_file", "timeout", "max_age", "first_retry",
    "max_retry_interval", "concurrency", "max_response",
)  # fmt: skip


def _url(value: object) -> str:
    text = _string(value, "an http:// or https:// URL")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid(f"expected an http:// or https:// URL, got {text!r}")
    if any(c.isspace() or ord(c) < 0x20 for c in text):
        raise _Invalid(f"expected a URL without spaces or control characters, got {text!r}")
    return text


def _secret_file(value: object, ctx: _Context) -> Path:
    path = _optional_file(value, ctx)
    if path is None:
        raise _Invalid("expected the path of a file holding the signing secret")
    try:
        mode = os.stat(path).st_mode
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise _Invalid(f"cannot read {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise _Invalid(
            f"{path} is open to group or others (mode {stat.S_IMODE(mode):03o}); "
            f"make it the server's alone: chmod 600 {path}"
        )
    if len(secret) < 16:
        raise _Invalid(f"{path} must hold a secret of at least 16 characters")
    return path


def _events(value: object) -> frozenset[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f"expected a list of event kinds, got {_got(value)}")
    unknown = [v for v in value if v not in EVENT_KINDS]
    if unknown or not value:
        raise _Invalid(
            f"expected event kinds among {', '.join(EVENT_KINDS)}, got {unknown or 'none'}"
        )
    return frozenset(value)


def _senders(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f"expected a list of addresses or domains, got {_got(value)}")
    senders: list[str] = []
    for item in value:
        text = item.strip().lower()
        if "@" in text:
            local, _, domain = text.rpartition("@")
            if not local:
                raise _Invalid(f"expected user@domain or a domain, got {item!r}")
            senders.append(f"{local}@{_domain_name(domain)}")
        else:
            senders.append(_domain_name(text))
    return tuple(senders)


def _webhook(name: str, table: object, ctx: _Context) -> Webhook:
    if not _NAME_RE.fullmatch(name):
        raise _Invalid(f"a webhook's name is 1-64 letters, digits, '-' or '_', got {name!r}")
    if not isinstance(table, Mapping):
        raise _Invalid(f"expected a table [webhooks.{name}], got {_got(table)}")
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise _Invalid(f"unknown key {unknown[0]!r}; a webhook takes {', '.join(_KEYS)}")
    for required in ("url", "secret_file"):
        if required not in table:
            raise _Invalid(f"{required} is required")
    values: dict[str, object] = {}
    converters = {
        "url": lambda v: _url(v),
        "secret_file": lambda v: _secret_file(v, ctx),
        "events": _events,
        "senders": _senders,
        "ca_file": lambda v: _optional_file(v, ctx),
        "timeout": lambda v: _duration(0.1)(v, ctx),
        "max_age": lambda v: _duration(60.0)(v, ctx),
        "first_retry": lambda v: _duration(0.1)(v, ctx),
        "max_retry_interval": lambda v: _duration(0.1)(v, ctx),
        "concurrency": lambda v: _integer(1, 1000)(v, ctx),
        "max_response": lambda v: _response_size(v, ctx),
    }
    for key, raw in table.items():
        try:
            values[key] = converters[key](raw)
        except _Invalid as exc:
            raise _Invalid(exc.problem, "." + key) from None
    hook = Webhook(name=name, **values)  # type: ignore[arg-type]
    if hook.first_retry > hook.max_retry_interval:
        raise _Invalid("first_retry must not exceed max_retry_interval", ".first_retry")
    return hook


def _response_size(value: object, ctx: _Context) -> int:
    size: int = _size(0)(value, ctx)
    if size > MiB:
        raise _Invalid(f"must be at most 1M, got {_got(value)}")
    return size


def _webhooks(value: object, ctx: _Context) -> tuple[Webhook, ...]:
    """The ``[webhooks]`` table: one ``[webhooks.NAME]`` table per receiver."""
    if not isinstance(value, Mapping):
        raise _Invalid(f"expected tables [webhooks.NAME], got {_got(value)}")
    hooks = []
    for name, table in value.items():
        try:
            hooks.append(_webhook(str(name), table, ctx))
        except _Invalid as exc:
            raise _Invalid(exc.problem, f".{name}{exc.suffix}") from None
    return tuple(hooks)
