"""The mtqp scenario's tools: fill a tracking store with N tracked messages, time MTQP TRACKs.

``trackload.py load URL`` migrates the database at the SQLAlchemy URL and bulk-inserts
N tracked messages (1-2 recipients each, mixed states) with SQLAlchemy Core, in the
store's own schema and encoding, so that a real TRACK with the right secret finds
them. Everything about message ``i`` (ENVID, secret, certifier, recipients, states)
follows from ``(seed, i)``: ``trackload.py track`` recomputes a random sample of
them, asks a running MTQP server for each over a fresh connection, checks every
answer and prints the latencies. ``trackload.py check URL`` times the start-up check
of a SQLite tracking database (``PRAGMA quick_check``, mtrkmta.tracking.damage) a few
times. Each prints progress lines, then one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import random
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loadgen import percentile
from sqlalchemy import func, select

from mtrkmta.mtqp.protocol import Quit, Response, ResponseReader, Track
from mtrkmta.tracking.migrate import upgrade
from mtrkmta.tracking.schema import build_schema
from mtrkmta.tracking.status import TrackingStatusError, parse_related
from mtrkmta.tracking.store import create_tracking_engine, mark_write

DEFAULT_SEED = 3887
NODE_ID = "mx2.bench.test"  # the loaded messages belong to another node sharing the store
REPORTING_MTA = "mx2.bench.test"
BATCH = 10_000  # rows per executemany
COMMIT_EVERY = 100_000  # messages per transaction
DAY = 86_400
QUEUE_LIFETIME = 5 * DAY  # [queue] max_lifetime default: Will-Retry-Until of deferred ones
DEFAULT_RETENTION = 9 * DAY  # [tracking] default_retention
MAX_RETENTION = 30 * DAY
ARRIVAL_SPAN = 3 * DAY  # arrivals spread over the last three days: nothing expires soon

# Recipient states by weight (out of 256): mostly done, some still queued or failed.
STATE_WEIGHTS = (
    ("delivered", 98),
    ("transferred", 64),
    ("relayed", 26),
    ("failed", 20),
    ("deferred", 36),
    ("queued", 12),
)
STATE_TABLE = tuple(state for state, weight in STATE_WEIGHTS for _ in range(weight))
assert len(STATE_TABLE) == 256
IN_QUEUE = frozenset({"queued", "inflight", "deferred"})
TIMEOUTS = (None, None, 5 * DAY, 10 * DAY)  # MTRK=...:timeout, seconds; None: none given
Row = dict[str, object]
QUEUE_ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # as mtrkmta.spool.queueid
_TO_QUEUE_ID = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", QUEUE_ID_ALPHABET)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def b32(value: int, width: int) -> str:
    """``value`` as ``width`` characters of the queue id alphabet, most significant first."""
    pad = -width * 5 % 8  # left-align the bits in whole octets for base64.b32encode
    octets = (value << pad).to_bytes((width * 5 + pad) // 8, "big")
    return base64.b32encode(octets)[:width].decode("ascii").translate(_TO_QUEUE_ID)


@dataclass(frozen=True, slots=True)
class Spec:
    """Everything about loaded message ``index``, derived from the seed and the index."""

    index: int
    digest: bytes

    @classmethod
    def of(cls, seed: int, index: int) -> Spec:
        return cls(index, hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=64).digest())

    @property
    def client(self) -> str:
        return f"client{self.digest[48] % 64}.example.org"

    @property
    def envid(self) -> str:
        """As ``mtrkmta send`` makes them: ``n-`` + 22 base64url characters ``@`` the client."""
        return f"n-{b64url(self.digest[:16])}@{self.client}"

    @property
    def secret(self) -> bytes:
        """The originator's secret A, 32 octets."""
        return self.digest[16:48]

    @property
    def secret_b64(self) -> str:
        return base64.b64encode(self.secret).decode("ascii")

    @property
    def certifier(self) -> bytes:
        """B = SHA1(A) as the store keeps it: 20 octets, or the first 16 for ~10% (RFC 3885)."""
        full = hashlib.sha1(self.secret).digest()
        return full[:16] if self.digest[49] < 26 else full

    @property
    def states(self) -> tuple[str, ...]:
        count = 2 if self.digest[50] < 77 else 1  # ~30% have two recipients
        return tuple(STATE_TABLE[self.digest[51 + i]] for i in range(count))

    @property
    def actions(self) -> tuple[str, ...]:
        """The Action a tracking report gives each recipient (in queue: delayed)."""
        return tuple("delayed" if state in IN_QUEUE else state for state in self.states)


def message_rows(spec: Spec, now: int, key: int) -> tuple[Row, list[Row]]:
    """The ``messages`` row and ``recipients`` rows of one loaded message, as the store's."""
    d, i = spec.digest, spec.index
    arrival = now - int.from_bytes(d[53:56], "big") % ARRIVAL_SPAN
    timeout = TIMEOUTS[d[56] % len(TIMEOUTS)]
    retention = DEFAULT_RETENTION if timeout is None else timeout
    micros = arrival * 1_000_000 + int.from_bytes(d[57:60], "big") % 1_000_000
    queue_id = b32(micros, 11) + b32((i ^ key) & (2**45 - 1), 9)  # unique: i is in it
    client = spec.client
    message: Row = {
        "queue_id": queue_id,
        "node_id": NODE_ID,
        "envid": spec.envid,
        "certifier": spec.certifier,
        "sender": f"user{d[60]}@{client}",
        "arrival": arrival,
        "requested_timeout": timeout,
        "expires_at": arrival + min(retention, MAX_RETENTION),
        "reporting_mta": REPORTING_MTA,
        "size": 800 + int.from_bytes(d[61:63], "big"),
        "ret": "HDRS" if d[63] & 1 else None,
        "body": "8BITMIME" if d[63] & 2 else None,
        "smtputf8": False,
        "auth": None,
        "client_address": f"192.0.2.{d[48] % 64 + 1}",
        "client_port": 1024 + int.from_bytes(d[57:59], "big") % 60000,
        "client_helo": client,
        "client_protocol": "ESMTPS" if d[63] & 4 else "ESMTP",
        "client_authenticated_as": None,
        "client_listener": "smtp",
        "held": False,
    }
    recipients = [
        recipient_row(queue_id, index, state, arrival, d, i)
        for index, state in enumerate(spec.states)
    ]
    return message, recipients


def recipient_row(queue_id: str, index: int, state: str, arrival: int, d: bytes, i: int) -> Row:
    """One recipient in ``state``, with what the queue records for it there."""
    address = f"rcpt{i % 100_000}@example.net" if index == 0 else f"rcpt{i % 7919}@example.com"
    domain = address.rpartition("@")[2]
    orcpt = d[63] & 8
    row: Row = {
        "queue_id": queue_id,
        "rcpt_index": index,
        "address": address,
        "orcpt_type": "rfc822" if orcpt else None,
        "orcpt_address": address if orcpt else None,
        "notify": "SUCCESS,FAILURE,DELAY" if d[63] & 16 else None,
        "final_recipient": address,
        "state": state,
        "action": None,
        "status": None,
        "remote_mta": None,
        "diagnostic": None,
        "last_attempt": None,
        "will_retry_until": None,
        "next_attempt": None,
        "attempts": 0,
        "certifier_forwarded": False,
        "dsn_pending": False,
        "dsn_passed": False,
        "delay_warned": False,
    }
    if state == "queued":
        return row
    attempt = arrival + 1 + d[62] % 30
    row.update(last_attempt=attempt, attempts=1, remote_mta=f"dns; mx{d[62] % 4}.{domain}")
    if state == "delivered":
        row.update(action="delivered", status="2.0.0", diagnostic="250 2.0.0 Ok: delivered")
    elif state in ("transferred", "relayed"):
        row.update(
            action=state,
            status="2.0.0",
            diagnostic="250 2.0.0 Ok: queued",
            certifier_forwarded=state == "transferred",
            dsn_passed=state == "transferred",
        )
    elif state == "failed":
        row.update(
            action="failed",
            status="5.1.1",
            diagnostic=f"550 5.1.1 <{address}>: Recipient address rejected: User unknown",
        )
    else:  # deferred
        attempts = 1 + d[62] % 6
        row.update(
            action="delayed",
            status="4.4.1",
            diagnostic=f"connect to mx0.{domain}: Connection timed out",
            attempts=attempts,
            will_retry_until=arrival + QUEUE_LIFETIME,
            next_attempt=min(attempt + 300 * 2**attempts, arrival + QUEUE_LIFETIME),
            delay_warned=d[62] & 1 == 1,
        )
    return row


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- load


def batches(seed: int, messages: int, now: int) -> Iterator[tuple[list[Row], list[Row]]]:
    key = int.from_bytes(hashlib.sha256(f"queue-id:{seed}".encode()).digest()[:6], "big")
    for start in range(0, messages, BATCH):
        message_batch: list[Row] = []
        recipient_batch: list[Row] = []
        for index in range(start, min(messages, start + BATCH)):
            message, recipients = message_rows(Spec.of(seed, index), now, key)
            message_batch.append(message)
            recipient_batch.extend(recipients)
        yield message_batch, recipient_batch


def load(url: str, messages: int, seed: int) -> dict[str, object]:
    """Migrate, bulk-insert, then finish as a running store would have (see the docstring)."""
    t0 = time.perf_counter()
    upgrade(url)
    migrated = time.perf_counter() - t0
    schema = build_schema()
    engine = create_tracking_engine(url)
    backend = engine.dialect.name
    now = int(time.time())
    loaded = recipients = 0
    states: Counter[str] = Counter()
    try:
        with engine.connect() as conn:
            if conn.scalar(select(func.count()).select_from(schema.messages)):
                raise SystemExit(f"trackload: {backend} database is not empty")
            conn.rollback()  # end the count's transaction: the pragmas must come outside one
            if backend == "sqlite":
                # Only for this connection, only while loading: the store opens its own
                # connections with synchronous=FULL. A crash mid-load just means reloading.
                raw = conn.connection.driver_connection
                raw.execute("PRAGMA synchronous=OFF")
                raw.execute("PRAGMA cache_size=-262144")  # 256 MiB: random ENVID index keys
            else:
                conn.exec_driver_sql("SET synchronous_commit = off")
                conn.commit()
            t1 = time.perf_counter()
            transaction = None
            for message_batch, recipient_batch in batches(seed, messages, now):
                if transaction is None:
                    mark_write(conn)
                    transaction = conn.begin()
                conn.execute(schema.messages.insert(), message_batch)
                conn.execute(schema.recipients.insert(), recipient_batch)
                loaded += len(message_batch)
                recipients += len(recipient_batch)
                states.update(str(row["state"]) for row in recipient_batch)
                if loaded % COMMIT_EVERY == 0 or loaded == messages:
                    transaction.commit()
                    transaction = None
                    elapsed = time.perf_counter() - t1
                    log(
                        f"loaded {loaded}/{messages} messages ({recipients} recipients) "
                        f"in {elapsed:.0f} s, {loaded / elapsed:,.0f} msg/s"
                    )
            inserted = time.perf_counter() - t1
        t2 = time.perf_counter()
        with engine.connect() as conn:
            if backend == "sqlite":
                # Merge the WAL into the database file, as the store's autocheckpoint would.
                conn.connection.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            else:
                # What autovacuum does after a bulk insert, now rather than during the
                # measurement: planner statistics and the visibility map; and the load's
                # checkpoint, which would otherwise write in the background meanwhile.
                auto = conn.execution_options(isolation_level="AUTOCOMMIT")
                auto.exec_driver_sql("VACUUM ANALYZE messages")
                auto.exec_driver_sql("VACUUM ANALYZE recipients")
                auto.exec_driver_sql("CHECKPOINT")
        finished = time.perf_counter() - t2
        with engine.connect() as conn:
            counted = conn.scalar(select(func.count()).select_from(schema.messages))
            counted_rcpts = conn.scalar(select(func.count()).select_from(schema.recipients))
            if backend == "sqlite":
                size = Path(engine.url.database or "").stat().st_size
                version = conn.exec_driver_sql("SELECT sqlite_version()").scalar()
            else:
                size = conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar()
                version = conn.exec_driver_sql("SHOW server_version").scalar()
    finally:
        engine.dispose()
    return {
        "backend": backend,
        "server_version": str(version).split()[0],
        "messages": counted,
        "recipients": counted_rcpts,
        "expected_messages": messages,
        "expected_recipients": recipients,
        "states": dict(sorted(states.items())),
        "migrate_seconds": migrated,
        "load_seconds": inserted,
        "finish_seconds": finished,
        "load_rate": loaded / inserted if inserted > 0 else None,
        "db_bytes": size,
        "seed": seed,
    }


# ---------------------------------------------------------------- TRACK


@dataclass(frozen=True, slots=True)
class Query:
    """One TRACK to send: what to expect back (None: the not-found answer)."""

    kind: str  # "found", "unknown" (ENVID never loaded) or "wrong-secret"
    envid: str
    secret_b64: str
    actions: tuple[str, ...] | None


def queries(
    seed: int, messages: int, count: int, unknown_share: float, label: str = "track"
) -> list[Query]:
    """``count`` queries for random loaded messages, ``unknown_share`` of them unanswerable:
    half of those an ENVID never loaded, half a loaded ENVID with a wrong secret."""
    rng = random.Random(f"{label}:{seed}:{messages}")
    unanswerable = round(count * unknown_share)
    kinds = ["unknown"] * (unanswerable // 2) + ["wrong-secret"] * (
        unanswerable - unanswerable // 2
    )
    kinds += ["found"] * (count - len(kinds))
    rng.shuffle(kinds)
    out = []
    for number, kind in enumerate(kinds):
        spec = Spec.of(seed, rng.randrange(messages))
        if kind == "unknown":
            stranger = hashlib.blake2b(f"{label}:unknown:{seed}:{number}".encode()).digest()
            envid = f"n-{b64url(stranger[:16])}@{spec.client}"
            out.append(Query(kind, envid, spec.secret_b64, None))
        elif kind == "wrong-secret":
            wrong = base64.b64encode(rng.randbytes(32)).decode("ascii")
            out.append(Query(kind, spec.envid, wrong, None))
        else:
            out.append(Query(kind, spec.envid, spec.secret_b64, spec.actions))
    return out


class Session:
    """One MTQP connection, blocking: greeting on connect, then commands and responses."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self.reader = ResponseReader()
        try:
            self.greeting = self.response()
        except (OSError, ValueError):
            self.close()
            raise

    def response(self) -> Response:
        while True:
            line = self.file.readline(1002)
            if not line:
                raise ConnectionError("MTQP server closed the connection")
            response = self.reader.feed(line)
            if response is not None:
                return response

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def check(query: Query, response: Response) -> str | None:
    """Why the answer is wrong for ``query``, or None when it is right."""
    head = response.status_line().decode("ascii", errors="replace")[:80]
    if query.actions is None:
        if response.indicator == "-ERR" and response.has_code("noinfo"):
            return None
        return f"{query.kind}: expected -ERR/noinfo, got {head}"
    if response.indicator != "+OK+":
        return f"found: expected +OK+ and a report, got {head}"
    try:
        reports = parse_related(response.body)
    except TrackingStatusError as error:
        return f"found: unreadable report: {error}"
    if len(reports) != 1 or reports[0].original_envelope_id != query.envid:
        return f"found: report for {[r.original_envelope_id for r in reports]}, not the ENVID"
    actions = tuple(r.action for r in reports[0].recipients)
    if actions != query.actions:
        return f"found: actions {actions}, expected {query.actions}"
    return None


def track(args: argparse.Namespace) -> dict[str, object]:
    """Send each TRACK over its own connection (as ``mtrkmta track`` does), one at a time."""
    warmup = queries(args.seed, args.messages, args.warmup, args.unknown_share, "warmup")
    plan = warmup + queries(args.seed, args.messages, args.queries, args.unknown_share)
    latency: dict[str, list[float]] = {"found": [], "notfound": []}
    session_latency: dict[str, list[float]] = {"found": [], "notfound": []}
    kinds: Counter[str] = Counter()
    problems: list[str] = []
    failed = 0
    started = last_report = time.perf_counter()
    for number, query in enumerate(plan):
        t0 = time.perf_counter()
        try:
            session = Session(args.host, args.port, args.timeout)
            try:
                t1 = time.perf_counter()
                session.send(Track(query.envid, query.secret_b64).render())
                response = session.response()
                t2 = time.perf_counter()
                session.send(Quit().render())
                session.response()
            finally:
                session.close()
        except (OSError, ValueError) as error:  # MalformedResponse is a ValueError
            failed += 1
            problems.append(f"{query.kind}: {type(error).__name__}: {error}")
            continue
        problem = check(query, response)
        if problem is not None:
            failed += 1
            problems.append(problem)
        if number < args.warmup:
            continue
        kinds[query.kind] += 1
        group = "found" if query.actions is not None else "notfound"
        latency[group].append(t2 - t1)
        session_latency[group].append(t2 - t0)
        if time.perf_counter() - last_report >= 15:
            last_report = time.perf_counter()
            log(f"{number + 1 - args.warmup}/{args.queries} TRACKs")
    elapsed = time.perf_counter() - started
    every = latency["found"] + latency["notfound"]
    every_session = session_latency["found"] + session_latency["notfound"]
    result: dict[str, object] = {
        "queries": sum(kinds.values()),
        "warmup": args.warmup,
        "kinds": dict(kinds),
        "checked": len(plan),  # every answer, warm-up ones too
        "failed": failed,
        "problems": problems[:10],
        "seconds": elapsed,
    }
    for name, values, session_values in (
        ("found", latency["found"], session_latency["found"]),
        ("notfound", latency["notfound"], session_latency["notfound"]),
        ("all", every, every_session),
    ):
        result[f"{name}_p50"] = percentile(values, 50)
        result[f"{name}_p99"] = percentile(values, 99)
        result[f"{name}_max"] = max(values) if values else None
        result[f"{name}_session_p50"] = percentile(session_values, 50)
        result[f"{name}_session_p99"] = percentile(session_values, 99)
    return result


def time_quick_check(url: str, runs: int) -> dict[str, object]:
    """Time ``check_database`` (the start-up ``PRAGMA quick_check``) ``runs`` times.

    The first run meets whatever page cache the machine has; drop it first
    (``sync; echo 3 > /proc/sys/vm/drop_caches``) for a cold figure.
    """
    from mtrkmta.tracking.damage import check_database

    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        check_database(url)
        seconds.append(round(time.perf_counter() - started, 3))
        print(f"quick_check: {seconds[-1]} s", file=sys.stderr, flush=True)
    return {"mode": "check", "url": url, "seconds": seconds}


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    loader = sub.add_parser("load", help="migrate and fill a tracking database")
    loader.add_argument("url", help="SQLAlchemy URL of an empty (or new) tracking database")
    for each in (loader, tracker := sub.add_parser("track", help="time TRACKs against a server")):
        each.add_argument("--messages", type=int, default=1_000_000, help="messages loaded")
        each.add_argument("--seed", type=int, default=DEFAULT_SEED)
    tracker.add_argument("--host", default="127.0.0.1")
    tracker.add_argument("--port", type=int, required=True, help="the MTQP listener")
    tracker.add_argument("--queries", type=int, default=2000, help="TRACKs measured")
    tracker.add_argument("--warmup", type=int, default=20, help="TRACKs sent first, not counted")
    tracker.add_argument(
        "--unknown-share", type=float, default=0.1, help="share of unanswerable TRACKs"
    )
    tracker.add_argument("--timeout", type=float, default=30.0, help="socket timeout, s")
    checker = sub.add_parser("check", help="time the start-up quick_check of a SQLite store")
    checker.add_argument("url", help="SQLAlchemy URL of a SQLite tracking database")
    checker.add_argument("--runs", type=int, default=3, help="checks timed, one after another")
    args = parser.parse_args(argv)
    if args.mode == "check":
        print(json.dumps(time_quick_check(args.url, args.runs)), flush=True)
        return 0
    if args.messages < 1:
        parser.error("--messages must be at least 1")
    result = load(args.url, args.messages, args.seed) if args.mode == "load" else track(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
