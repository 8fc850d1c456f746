"""The configuration's sections and keys: one dataclass per section, one field per key.

Adding a key: one field here, plus its entry in doc/configuration.rst and
mtrkmta/config/example.toml.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

from mtrkmta.config.convert import (
    DAY,
    DEFAULT_RETENTION,
    HOUR,
    MAX_RETENTION,
    MIN_RETENTION,
    MINUTE,
    TLS_POLICIES,
    IPNetwork,
    KiB,
    MiB,
    _boolean,
    _brief,
    _choice,
    _Context,
    _database,
    _domain_list,
    _duration,
    _format_duration,
    _got,
    _hostname,
    _integer,
    _Invalid,
    _key,
    _listener,
    _networks,
    _node_id,
    _optional_file,
    _path,
    _section,
    _size,
    _string,
)
from mtrkmta.config.routes import DEFAULT_ROUTE, CAFile, Route, _ca_file, _routes, select_route
from mtrkmta.config.webhooks import Webhook, _webhooks


@dataclass(frozen=True, slots=True)
class Listeners:
    """Server endpoint descriptions of the listeners; None disables one."""

    smtp: str | None = field(default="tcp:2525:interface=127.0.0.1", metadata=_key(_listener))
    submission: str | None = field(default=None, metadata=_key(_listener))
    lmtp: str | None = field(default="tcp:2424:interface=127.0.0.1", metadata=_key(_listener))
    mtqp: str | None = field(default="tcp:1038:interface=127.0.0.1", metadata=_key(_listener))
    http: str | None = field(default="tcp:8025:interface=127.0.0.1", metadata=_key(_listener))


@dataclass(frozen=True, slots=True)
class Relay:
    """Who may relay to any domain without authenticating."""

    trusted_networks: tuple[IPNetwork, ...] = field(default=(), metadata=_key(_networks))


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits; sizes in bytes, times in seconds."""

    message_size: int = field(default=35 * MiB, metadata=_key(_size(1)))
    recipients: int = field(default=1000, metadata=_key(_integer(1)))
    command_line: int = field(default=2048, metadata=_key(_integer(512)))
    idle_timeout: float = field(default=300.0, metadata=_key(_duration()))
    data_timeout: float = field(default=180.0, metadata=_key(_duration()))
    data_min_rate: int = field(default=500, metadata=_key(_integer(0)))
    session_time: float = field(default=HOUR, metadata=_key(_duration()))
    bare_line_ends: str = field(default="normalize", metadata=_key(_choice("normalize", "reject")))
    data_buffer: int = field(default=256 * KiB, metadata=_key(_size(4 * KiB)))
    max_connections: int = field(default=1000, metadata=_key(_integer(1)))
    max_connections_per_ip: int = field(default=50, metadata=_key(_integer(1)))
    max_accepting: int = field(default=256, metadata=_key(_integer(1)))
    min_free_space: int = field(default=100 * MiB, metadata=_key(_size(0)))
    max_received_headers: int = field(default=100, metadata=_key(_integer(1)))
    # RFC 5321 §4.5.3.1: the sizes a server must take at least, in octets.
    local_part_length: int = field(default=64, metadata=_key(_integer(64)))
    domain_length: int = field(default=255, metadata=_key(_integer(255)))
    path_length: int = field(default=256, metadata=_key(_integer(256)))
    helo_length: int = field(default=255, metadata=_key(_integer(255)))
    deliverby_min: int = field(default=0, metadata=_key(_integer(0, 999_999_999)))  # RFC 2852


@dataclass(frozen=True, slots=True)
class TLS:
    """Certificate chain and private key (PEM) for STARTTLS; both or neither."""

    certificate: Path | None = field(default=None, metadata=_key(_optional_file))
    private_key: Path | None = field(default=None, metadata=_key(_optional_file))

    @property
    def enabled(self) -> bool:
        """True when STARTTLS can be offered."""
        return self.certificate is not None


@dataclass(frozen=True, slots=True)
class Auth:
    """SMTP AUTH: the users file, and the limits that make guessing passwords slow."""

    users_file: Path | None = field(default=None, metadata=_key(_optional_file))
    max_failures: int = field(default=3, metadata=_key(_integer(1)))
    max_address_failures: int = field(default=10, metadata=_key(_integer(1)))
    failure_window: float = field(default=15 * MINUTE, metadata=_key(_duration(1.0)))
    failure_delay: float = field(default=1.0, metadata=_key(_duration()))
    max_failure_delay: float = field(default=30.0, metadata=_key(_duration()))
    threads: int = field(default=2, metadata=_key(_integer(1)))
    max_pending: int = field(default=16, metadata=_key(_integer(1)))


def _delimiter(value: object, ctx: _Context) -> str:
    """One character that separates a local part from its ``+detail``, or ``""`` for none."""
    if not isinstance(value, str) or len(value) > 1 or (value in '@"\\ ' and value):
        raise _Invalid(
            f"expected one character such as + or -, or an empty string, got {_got(value)}"
        )
    return value


def _mailbox_template(value: object, ctx: _Context) -> str:
    """A mailbox path under the mail directory, with {local} and optionally {domain}."""
    text = _string(value, "a template such as {local} or {domain}/{local}")
    problem = f"only {{local}} and {{domain}} may be used, got {_brief(text)}"
    # Only the bare names: "{local.foo}" or "{local[0]}" would reach into the string
    # object, and a conversion or format spec could fail on some local part.
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError:
        raise _Invalid(problem) from None
    for _, name, spec, conversion in fields:
        if name is not None and (name not in ("local", "domain") or spec or conversion):
            raise _Invalid(problem)
    if "{local}" not in text or text.startswith("/") or ".." in text.split("/"):
        raise _Invalid(f"expected a relative path containing {{local}}, got {text!r}")
    return text


def _local_parts(value: object, ctx: _Context) -> tuple[str, ...]:
    """A list of local parts (user names), compared without regard to case."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise _Invalid(f"expected a list of user names, got {_got(value)}")
    return tuple(v.lower() for v in value)


@dataclass(frozen=True, slots=True)
class Local:
    """Local delivery: mailboxes, users, aliases and lists."""

    aliases: Path | None = field(default=None, metadata=_key(_optional_file))
    recipient_delimiter: str = field(default="+", metadata=_key(_delimiter))
    mailbox: str = field(default="{local}", metadata=_key(_mailbox_template))
    users: tuple[str, ...] = field(default=(), metadata=_key(_local_parts))


@dataclass(frozen=True, slots=True)
class Tracking:
    """Message tracking (RFC 3885-3888): how long tracking records are kept."""

    default_retention: float = field(
        default=DEFAULT_RETENTION, metadata=_key(_duration(MIN_RETENTION))
    )
    max_retention: float = field(default=MAX_RETENTION, metadata=_key(_duration(MIN_RETENTION)))
    lenient_xtext: bool = field(default=False, metadata=_key(_boolean))
    purge_interval: float = field(default=HOUR, metadata=_key(_duration(MINUTE)))
    max_tracked_per_hour: int = field(default=10000, metadata=_key(_integer(0)))
    webhook_outbox_limit: int = field(default=100000, metadata=_key(_integer(1)))


CHAIN_TIMEOUT = 2 * MINUTE
"""A server chaining a TRACK answers within two minutes (RFC 3887 §2.4)."""


def _chain_timeout(value: object, ctx: _Context) -> float:
    """A duration greater than zero and at most two minutes (RFC 3887 §2.4)."""
    seconds = _duration()(value, ctx)
    if seconds > CHAIN_TIMEOUT:
        raise _Invalid(
            f"must be at most {_format_duration(CHAIN_TIMEOUT)} (RFC 3887 §2.4), "
            f"got {_format_duration(seconds)}"
        )
    return seconds


@dataclass(frozen=True, slots=True)
class Mtqp:
    """The MTQP server on ``listeners.mtqp``: TLS policy, idle timeout, per-address limits."""

    tls_required: bool = field(default=False, metadata=_key(_boolean))
    idle_timeout: float = field(default=10 * MINUTE, metadata=_key(_duration(10 * MINUTE)))
    session_time: float = field(default=HOUR, metadata=_key(_duration()))
    track_rate: int = field(default=60, metadata=_key(_integer(0)))
    failure_rate: int = field(default=10, metadata=_key(_integer(0)))
    chain: bool = field(default=False, metadata=_key(_boolean))
    chain_domains: tuple[str, ...] = field(default=(), metadata=_key(_domain_list))
    chain_timeout: float = field(default=CHAIN_TIMEOUT, metadata=_key(_chain_timeout))
    chain_max_hops: int = field(default=8, metadata=_key(_integer(1, 64)))
    chain_concurrency: int = field(default=8, metadata=_key(_integer(1, 1000)))
    disguise: bool = field(default=False, metadata=_key(_boolean))
    chain_ca_file: Path | None = field(default=None, metadata=_key(_optional_file))


def _secret_file(value: object, ctx: _Context) -> Path | None:
    """An existing file that only its owner may read (a secret), or ``""``/false for none."""
    path = _optional_file(value, ctx)
    if path is None:
        return None
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise _Invalid(f"cannot use {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise _Invalid(
            f"{path} is readable by group or others (mode {mode & 0o777:o}); run chmod 600 {path}"
        )
    return path


@dataclass(frozen=True, slots=True)
class Http:
    """The HTTP service on ``listeners.http``: the bounds every request meets, the admin API."""

    max_body: int = field(default=64 * KiB, metadata=_key(_size(1 * KiB)))
    max_headers: int = field(default=100, metadata=_key(_integer(10)))
    header_size: int = field(default=16 * KiB, metadata=_key(_size(1 * KiB)))
    idle_timeout: float = field(default=60.0, metadata=_key(_duration()))
    request_time: float = field(default=30.0, metadata=_key(_duration()))
    max_connections: int = field(default=100, metadata=_key(_integer(1)))
    admin_token_file: Path | None = field(default=None, metadata=_key(_secret_file))


@dataclass(frozen=True, slots=True)
class Queue:
    """Retry schedule of the outgoing queue."""

    first_retry: float = field(default=5 * MINUTE, metadata=_key(_duration()))
    max_retry_interval: float = field(default=HOUR, metadata=_key(_duration()))
    max_lifetime: float = field(default=5 * DAY, metadata=_key(_duration()))
    delay_warning: float = field(default=4 * HOUR, metadata=_key(_duration()))
    # Accepted messages waiting for their first run, held in memory (0: none).
    content_cache: int = field(default=8 * MiB, metadata=_key(_size(0)))


def _pem_file(value: object, ctx: _Context) -> CAFile | None:
    """A PEM file of CA certificates, read at load, or ``""``/false for the system's CAs."""
    if value is False or value == "":
        return None
    return _ca_file(value, ctx)


@dataclass(frozen=True, slots=True)
class Delivery:
    """How mail leaves: the SMTP port of MX hosts, TLS policy, concurrency, batching."""

    smtp_port: int = field(default=25, metadata=_key(_integer(1, 65535)))
    tls: str = field(default="may", metadata=_key(_choice(*TLS_POLICIES)))
    destination_concurrency: int = field(default=20, metadata=_key(_integer(1)))
    max_recipients: int = field(default=50, metadata=_key(_integer(1)))
    chunking: bool = field(default=True, metadata=_key(_boolean))
    mta_sts: bool = field(default=True, metadata=_key(_boolean))
    mta_sts_cache_size: int = field(default=1000, metadata=_key(_integer(1)))
    mta_sts_timeout: float = field(default=10.0, metadata=_key(_duration(1.0)))
    mta_sts_ca_file: CAFile | None = field(default=None, metadata=_key(_pem_file))


@dataclass(frozen=True, slots=True)
class Pickup:
    """The pickup directory that sendmail writes into: how often the node looks."""

    poll_interval: float = field(default=10.0, metadata=_key(_duration(1.0)))


_TAG_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-_./")


def _syslog_tag(value: object, ctx: _Context) -> str:
    """A syslog tag (RFC 3164 §4.1.3: at most 32 characters): letters, digits, - _ . /."""
    text = _string(value, "a syslog tag such as mtrkmta")
    if len(text) > 32 or not set(text) <= _TAG_CHARACTERS:
        raise _Invalid(
            f"expected at most 32 letters, digits, '-', '_', '.' or '/', got {_got(value)}"
        )
    return text


LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class Logging:
    """The log: text lines or JSON objects, on standard output or to syslog."""

    format: str = field(default="text", metadata=_key(_choice(*LOG_FORMATS)))
    syslog: bool = field(default=False, metadata=_key(_boolean))
    prefix: str = field(default="mtrkmta", metadata=_key(_syslog_tag))
    syslog_socket: Path = field(default=Path("/dev/log"), metadata=_key(_path))


@dataclass(frozen=True, slots=True)
class Durability:
    """Crash safety; turning fsync off is for tests only."""

    fsync: bool = field(default=True, metadata=_key(_boolean))


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration of one mtrkmta node."""

    hostname: str = field(metadata=_key(_hostname, "server.hostname"))
    data_dir: Path = field(metadata=_key(_path, "server.data_dir"))
    database: str = field(metadata=_key(_database, "server.database"))
    node_id: str = field(metadata=_key(_node_id, "server.node_id"))
    workers: int = field(default=1, metadata=_key(_integer(1), "server.workers"))
    cpu_affinity: bool = field(default=False, metadata=_key(_boolean, "server.cpu_affinity"))
    listeners: Listeners = field(default_factory=Listeners, metadata=_section("listeners"))
    local_domains: tuple[str, ...] = field(
        default=("localhost",), metadata=_key(_domain_list, "domains.local")
    )
    routes: tuple[Route, ...] = field(default=(DEFAULT_ROUTE,), metadata=_key(_routes, "routes"))
    relay: Relay = field(default_factory=Relay, metadata=_section("relay"))
    limits: Limits = field(default_factory=Limits, metadata=_section("limits"))
    tls: TLS = field(default_factory=TLS, metadata=_section("tls"))
    auth: Auth = field(default_factory=Auth, metadata=_section("auth"))
    tracking: Tracking = field(default_factory=Tracking, metadata=_section("tracking"))
    mtqp: Mtqp = field(default_factory=Mtqp, metadata=_section("mtqp"))  # [mtqp] section
    http: Http = field(default_factory=Http, metadata=_section("http"))  # [http] section
    queue: Queue = field(default_factory=Queue, metadata=_section("queue"))
    delivery: Delivery = field(default_factory=Delivery, metadata=_section("delivery"))
    local: Local = field(default_factory=Local, metadata=_section("local"))
    durability: Durability = field(default_factory=Durability, metadata=_section("durability"))
    pickup: Pickup = field(default_factory=Pickup, metadata=_section("pickup"))
    logging: Logging = field(default_factory=Logging, metadata=_section("logging"))
    webhooks: tuple[Webhook, ...] = field(default=(), metadata=_key(_webhooks, "webhooks"))

    def is_local(self, domain: str) -> bool:
        """Whether this node is the final destination for ``domain``."""
        return domain.lower().removesuffix(".") in self.local_domains

    def route_for(self, domain: str) -> Route:
        """The route for ``domain`` (see :func:`select_route`)."""
        return select_route(self.routes, self.local_domains, domain)
