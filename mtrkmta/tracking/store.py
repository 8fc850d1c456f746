"""SQLTrackingStore: the tracking store on SQLAlchemy Core, with all database work off the reactor.

Writes go through one GroupCommit, so concurrent writes share a transaction and
at most one write transaction runs at a time per store; reads run in the same
thread pool with deferToThreadPool. Everything dialect-specific (SQLite pragmas
and BEGIN handling, the PostgreSQL migration lock) lives in the engine section
at the end of this module; the SQL itself is portable Core. The hot writes'
rows (RowWrite) run by the driver's executemany, with the SQL, parameter order
and bind processors SQLAlchemy compiled for the dialect (DriverStatements).
"""

from __future__ import annotations

import hmac
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Connection,
    Engine,
    Executable,
    Row,
    Update,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    exc,
    exists,
    func,
    literal,
    or_,
    select,
    text,
    union,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection, Dialect
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, ColumnElement, FromClause
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mtrkmta.config import MIN_RETENTION, Webhook
from mtrkmta.envelope import ClientInfo, Envelope, OriginalRecipient
from mtrkmta.faults import IFaults, NoFaults
from mtrkmta.groupcommit import GroupCommit
from mtrkmta.tracking.events import (
    arrival_event,
    dsn_event,
    event_row,
    message_event,
    outcome_event,
    row_event,
)
from mtrkmta.tracking.interfaces import (
    QUEUED_STATES,
    Event,
    EventKind,
    ITrackingStore,
    OutboxEntry,
    RecipientState,
    RecipientUpdate,
    StoredMessage,
    StoredRecipient,
)
from mtrkmta.tracking.outbox import (
    MessageFacts,
    entry_of,
    facts_of_envelope,
    outbox_rows,
    wanted_by,
)
from mtrkmta.tracking.schema import TrackingSchema, build_schema, dsn_owed

R = TypeVar("R")

CHUNK = 500  # bound parameters per IN (...) list; old SQLite allows 999
NOTIFY_ORDER = ("NEVER", "SUCCESS", "FAILURE", "DELAY")
NO_CERTIFIER = bytes(20)  # compared against when no message has the ENVID; never a match


class StoreClosedError(RuntimeError):
    """The tracking store was used after close()."""


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    exc.OperationalError,  # locked, disconnected, out of space: the database, not the data
    exc.InterfaceError,
    StoreClosedError,
)
"""Errors of this store that pass: the same call may succeed later."""


def check_retention(default_retention: float, max_retention: float) -> None:
    """Reject a retention policy that RFC 3885 §3.1 forbids.

    Both the default and the cap must be at least one day.
    """
    if default_retention < MIN_RETENTION:
        raise ValueError(f"default retention must be at least one day, not {default_retention}s")
    if max_retention < MIN_RETENTION:
        raise ValueError(f"maximum retention must be at least one day, not {max_retention}s")


class Retention:
    """How long tracking data is kept: the default when MTRK names no timeout, and the
    cap on any timeout; the cap may be lowered at run time, never below one day
    (RFC 3885 §3.1, §4.1). Both stores keep theirs in one of these."""

    def __init__(self, default: float, maximum: float) -> None:
        check_retention(default, maximum)
        self.default = default
        self.maximum = maximum

    def lower(self, maximum: float) -> int:
        """Cap retention at ``maximum`` from now on; return the cap in whole seconds,
        which existing records' expiry must be lowered to as well."""
        check_retention(min(self.default, maximum), maximum)
        self.maximum = min(self.maximum, maximum)
        self.default = min(self.default, self.maximum)
        return math.floor(self.maximum)

    def rows(
        self, envelope: Envelope, reporting_mta: str, node_id: str, size: int, now: float
    ) -> tuple[dict[str, object], list[dict[str, object]]]:
        """``arrival_rows`` under this retention."""
        return arrival_rows(
            envelope,
            reporting_mta=reporting_mta,
            node_id=node_id,
            size=size,
            now=now,
            default_retention=self.default,
            max_retention=self.maximum,
        )


def whole_seconds(posix_time: float) -> int:
    """The whole POSIX second containing ``posix_time``, as stored in the database."""
    return math.floor(posix_time)


def effective_expiry(
    arrival: float,
    requested_timeout: int | None,
    *,
    default_retention: float,
    max_retention: float,
) -> int:
    """When a message's tracking data may go, unless it is still queued (RFC 3885 §3.1).

    arrival + min(requested timeout or the default, the cap), in whole seconds.
    The timeout counts from receipt at this server (RFC 3885 §3.1); the store
    additionally never purges a message that is still in the queue.
    """
    retention = default_retention if requested_timeout is None else requested_timeout
    return whole_seconds(arrival) + max(0, math.floor(min(retention, max_retention)))


def certifier_matches(stored: bytes, candidate: bytes) -> bool:
    """Whether SHA1(A) ``candidate`` authenticates stored B, in constant time (RFC 3887 §4;
    doc/conformance.rst 3887-P3).

    A 16-octet stored B is compared with the first 16 octets of the candidate.
    """
    if len(stored) == 16:
        candidate = candidate[:16]
    elif len(stored) != 20:
        return False
    return hmac.compare_digest(stored, candidate)


def encode_notify(notify: frozenset[str] | None) -> str | None:
    """NOTIFY as stored: None when absent, else the keywords comma-joined in a fixed order."""
    if notify is None:
        return None
    known = [k for k in NOTIFY_ORDER if k in notify]
    return ",".join(known + sorted(notify.difference(NOTIFY_ORDER)))


def decode_notify(value: str | None) -> frozenset[str] | None:
    """Inverse of encode_notify."""
    if value is None:
        return None
    return frozenset(k for k in value.split(",") if k)


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


@dataclass(frozen=True, slots=True)
class RowWrite:
    """A write that is only parameter rows for prepared statements, run in order.

    Unlike a callable write, the rows of the RowWrites that share a transaction
    are executed together, one executemany per statement.
    """

    steps: tuple[tuple[Executable, list[dict[str, object]]], ...]


WriteOp = Callable[[Connection], object] | RowWrite


Processor = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class DriverStatement:
    """A prepared statement compiled once for a dialect, run by the driver's executemany
    (``Connection.exec_driver_sql``): SQLAlchemy's own SQL, parameter order and bind
    processors, without its per-execute cache look-up, compilation context and
    parameter processing (the commit thread's CPU competes with the reactor's)."""

    sql: str
    names: tuple[str, ...]  # the driver's parameter names (unused when positional)
    sources: tuple[str, ...]  # the row key of each parameter, in the driver's order
    converts: tuple[tuple[int, Processor], ...]  # (position, bind processor)
    positional: bool

    def parameters(
        self, rows: Sequence[Mapping[str, object]]
    ) -> list[tuple[object, ...]] | list[dict[str, object]]:
        """The driver's parameters for ``rows``, converted as SQLAlchemy converts them."""
        sources, converts = self.sources, self.converts
        converted: list[tuple[object, ...]] = []
        for row in rows:
            values = [row[key] for key in sources]
            for position, processor in converts:
                values[position] = processor(values[position])
            converted.append(tuple(values))
        if self.positional:
            return converted
        return [dict(zip(self.names, values, strict=True)) for values in converted]


def driver_statement(
    statement: Executable, dialect: Dialect, keys: frozenset[str]
) -> DriverStatement | None:
    """``statement`` compiled as ``Connection.execute`` compiles it for an executemany of
    rows with ``keys``, or None when the driver path does not apply (a parameter that is
    expanded, rendered literally or not in the rows, a default computed at execution)."""
    if not isinstance(statement, ClauseElement):
        return None
    compiled = statement.compile(dialect=dialect, column_keys=sorted(keys), for_executemany=True)
    if not isinstance(compiled, SQLCompiler) or compiled.schema_translate_map:
        return None
    if compiled.literal_execute_params or compiled.post_compile_params:
        return None
    if compiled.insert_prefetch or compiled.update_prefetch or compiled.effective_returning:
        return None
    binds = {name: bindparam for bindparam, name in compiled.bind_names.items()}
    order = list(compiled.positiontup or ()) if compiled.positional else list(binds)
    if set(order) != set(binds):  # a positional parameter may come twice
        return None
    sources: list[str] = []
    converts: list[tuple[int, Processor]] = []
    for position, name in enumerate(order):
        bindparam = binds[name]
        if bindparam.key in keys:
            sources.append(bindparam.key)
        elif name in keys:
            sources.append(name)
        else:  # a default or a constant of the statement: Core fills those in
            return None
        processor = bindparam.type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            converts.append((position, processor))
    escaped = compiled.escaped_bind_names
    return DriverStatement(
        sql=compiled.string,
        names=tuple(escaped.get(name, name) for name in order),
        sources=tuple(sources),
        converts=tuple(converts),
        positional=bool(compiled.positional),
    )


class DriverStatements:
    """The driver statements of one engine's prepared statements, compiled on first use."""

    def __init__(self) -> None:
        self._compiled: dict[tuple[Executable, frozenset[str]], DriverStatement | None] = {}

    def execute_rows(
        self, conn: Connection, rows: dict[Executable, list[dict[str, object]]]
    ) -> None:
        """Execute and clear the collected rows, statement by statement in first-seen order:
        by the driver when every row of a statement has the same keys, else by Core."""
        for statement, statement_rows in rows.items():
            driver = self._driver(conn, statement, statement_rows)
            if driver is None:
                conn.execute(statement, statement_rows)
            else:
                conn.exec_driver_sql(driver.sql, driver.parameters(statement_rows))
        rows.clear()

    def _driver(
        self, conn: Connection, statement: Executable, rows: list[dict[str, object]]
    ) -> DriverStatement | None:
        if not rows:
            return None
        keys = frozenset(rows[0])
        if any(row.keys() != keys for row in rows):
            return None
        key = (statement, keys)
        if key not in self._compiled:
            self._compiled[key] = driver_statement(statement, conn.dialect, keys)
        return self._compiled[key]


def recipient_update(schema: TrackingSchema) -> Update:
    """One recipient's outcome as a prepared UPDATE (parameters: SQLTrackingStore._update_values).

    ``attempts`` grows by ``p_attempts_added``; a NULL ``p_delay_warned`` or
    ``p_final_recipient`` leaves that column as it is.
    """
    r = schema.recipients
    plain = (
        "state", "action", "status", "remote_mta", "diagnostic", "last_attempt",
        "will_retry_until", "next_attempt", "certifier_forwarded", "dsn_pending", "dsn_passed",
        "list_expansion",
    )  # fmt: skip
    return (
        r.update()
        .where(r.c.queue_id == bindparam("p_queue_id"))
        .where(r.c.rcpt_index == bindparam("p_rcpt_index"))
        .values({name: bindparam(f"p_{name}") for name in plain})
        .values(
            attempts=r.c.attempts + bindparam("p_attempts_added"),
            delay_warned=func.coalesce(
                bindparam("p_delay_warned", type_=r.c.delay_warned.type), r.c.delay_warned
            ),
            final_recipient=func.coalesce(
                bindparam("p_final_recipient", type_=r.c.final_recipient.type),
                r.c.final_recipient,
            ),
        )
    )


def known_message_event(schema: TrackingSchema) -> Executable:
    """An event as a prepared INSERT that adds nothing unless its message is recorded
    (parameters: ``known_event_values``), as the UPDATE of an outcome changes nothing
    for an unknown message."""
    e, m = schema.events, schema.messages
    queue_id = bindparam("e_queue_id", type_=e.c.queue_id.type)
    values = select(
        queue_id,
        bindparam("e_rcpt_index", type_=e.c.rcpt_index.type),
        bindparam("e_at", type_=e.c.at.type),
        bindparam("e_kind", type_=e.c.kind.type),
        bindparam("e_detail", type_=e.c.detail.type),
    ).where(exists().where(m.c.queue_id == queue_id))
    return e.insert().from_select(["queue_id", "rcpt_index", "at", "kind", "detail"], values)


def known_event_values(event: Event) -> dict[str, object]:
    """The parameters of ``known_message_event`` for ``event``."""
    return {f"e_{name}": value for name, value in event_row(event).items()}


def quarantine_event(queue_id: str, reason: str | None, deleted: bool, now: float) -> Event:
    """The event of ``set_quarantined``: quarantined with the reason, released from
    quarantine, or deleted from it."""
    if reason is not None:
        return message_event(queue_id, EventKind.QUARANTINED, now, reason=reason)
    if deleted:
        return message_event(queue_id, EventKind.DELETED, now, by="the administrator")
    return message_event(queue_id, EventKind.RELEASED, now, source="quarantine")


def stored_message(
    row: Mapping[Any, Any], recipient_rows: Iterable[Mapping[Any, Any]]
) -> StoredMessage:
    """A StoredMessage from a messages row and its recipients rows, in index order.

    Columns absent from a row (an insert that left them to their defaults) read
    as their defaults: false flags and not held.
    """
    recipients = tuple(
        StoredRecipient(
            index=rr["rcpt_index"],
            address=rr["address"],
            orcpt=(
                OriginalRecipient(rr["orcpt_type"], rr["orcpt_address"])
                if rr["orcpt_type"] is not None and rr["orcpt_address"] is not None
                else None
            ),
            notify=decode_notify(rr["notify"]),
            final_recipient=rr["final_recipient"],
            state=RecipientState(rr["state"]),
            action=rr["action"],
            status=rr["status"],
            remote_mta=rr["remote_mta"],
            diagnostic=rr["diagnostic"],
            last_attempt=rr["last_attempt"],
            will_retry_until=rr["will_retry_until"],
            next_attempt=rr["next_attempt"],
            attempts=rr["attempts"],
            certifier_forwarded=bool(rr["certifier_forwarded"]),
            dsn_pending=bool(rr.get("dsn_pending", False)),
            dsn_passed=bool(rr.get("dsn_passed", False)),
            delay_warned=bool(rr.get("delay_warned", False)),
            list_expansion=bool(rr.get("list_expansion", False)),
        )
        for rr in recipient_rows
    )
    certifier = row["certifier"]
    return StoredMessage(
        queue_id=row["queue_id"],
        node_id=row["node_id"],
        envid=row["envid"],
        certifier=None if certifier is None else bytes(certifier),
        sender=row["sender"],
        arrival=row["arrival"],
        requested_timeout=row["requested_timeout"],
        expires_at=row["expires_at"],
        reporting_mta=row["reporting_mta"],
        size=row["size"],
        ret=row["ret"],
        body=row["body"],
        smtputf8=bool(row["smtputf8"]),
        auth=row["auth"],
        client=ClientInfo(
            address=row["client_address"],
            port=row["client_port"],
            helo=row["client_helo"],
            protocol=row["client_protocol"],
            authenticated_as=row["client_authenticated_as"],
            listener=row["client_listener"],
        ),
        recipients=recipients,
        held=bool(row.get("held", False)),
        hold_reason=row.get("hold_reason"),
        quarantine_reason=row.get("quarantine_reason"),
        deliver_by=row.get("deliver_by"),
    )


def arrival_rows(
    envelope: Envelope,
    *,
    reporting_mta: str,
    node_id: str,
    size: int,
    now: float,
    default_retention: float,
    max_retention: float,
) -> tuple[dict[str, object], list[dict[str, object]]]:
    """The messages row and the recipients rows that record a message's arrival
    (``ITrackingStore.record_arrival``); an ``envelope.arrival`` of 0 counts as ``now``."""
    params = envelope.params
    arrival = envelope.arrival if envelope.arrival > 0 else now
    requested = params.mtrk.timeout if params.mtrk is not None else None
    client = envelope.client
    message_row: dict[str, object] = {
        "queue_id": envelope.queue_id,
        "node_id": node_id,
        "envid": params.envid,
        "certifier": params.mtrk.certifier if params.mtrk is not None else None,
        "sender": envelope.sender,
        "arrival": whole_seconds(arrival),
        "requested_timeout": requested,
        "expires_at": effective_expiry(
            arrival,
            requested,
            default_retention=default_retention,
            max_retention=max_retention,
        ),
        "reporting_mta": reporting_mta,
        "size": size,
        "ret": params.ret,
        "body": params.body,
        "smtputf8": params.smtputf8,
        "auth": params.auth,
        "client_address": client.address,
        "client_port": client.port,
        "client_helo": client.helo,
        "client_protocol": client.protocol,
        "client_authenticated_as": client.authenticated_as,
        "client_listener": client.listener,
    }
    # RFC 2852 §4: time of receipt + by-time (rounded up as the queue's deadline is).
    by = params.deliver_by
    message_row["deliver_by"] = None if by is None else math.ceil(arrival + by.seconds)
    recipient_rows: list[dict[str, object]] = [
        {
            "queue_id": envelope.queue_id,
            "rcpt_index": index,
            "address": rcpt.address,
            "orcpt_type": rcpt.params.orcpt.addr_type if rcpt.params.orcpt else None,
            "orcpt_address": rcpt.params.orcpt.address if rcpt.params.orcpt else None,
            "notify": encode_notify(rcpt.params.notify),
            "final_recipient": rcpt.address,
            "state": RecipientState.QUEUED.value,
            "action": None,
            "status": None,
            "remote_mta": None,
            "diagnostic": None,
            "last_attempt": None,
            "will_retry_until": None,
            "next_attempt": None,
            "attempts": 0,
            "certifier_forwarded": False,
        }
        for index, rcpt in enumerate(envelope.recipients)
    ]
    return message_row, recipient_rows


@implementer(ITrackingStore)
class SQLTrackingStore:
    """ITrackingStore on SQLAlchemy Core (SQLite or PostgreSQL).

    Pass an engine made by create_tracking_engine (or a URL, and the store makes
    and later disposes of its own). The schema must already be migrated
    (mtrkmta.tracking.migrate.upgrade). The thread pool belongs to the caller,
    who starts it before use and stops it after close().
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        engine_or_url: Engine | URL | str,
        *,
        default_retention: float,
        max_retention: float,
        clock: IReactorTime | None = None,
        commit_pool: ThreadPool | None = None,
        faults: IFaults = NoFaults(),
        webhooks: Sequence[Webhook] = (),
    ) -> None:
        """Writes are group-committed in ``commit_pool`` (default: ``threadpool``);
        reads run in ``threadpool``. Events that one of ``webhooks`` wants go to the
        webhook outbox with them."""
        self._hooks = tuple(webhooks)
        self._retention = Retention(default_retention, max_retention)
        self._reactor = reactor
        self._faults = faults  # told each named step (mtrkmta.faults.POINTS)
        self._threadpool = threadpool
        self._clock: IReactorTime = clock if clock is not None else IReactorTime(reactor)
        if isinstance(engine_or_url, Engine):
            self._engine = engine_or_url
            self._owns_engine = False
        else:
            self._engine = create_tracking_engine(engine_or_url)
            self._owns_engine = True
        self._schema: TrackingSchema = build_schema()
        # The hot writes as prepared statements, so that a batch runs each as one
        # executemany (and SQLAlchemy compiles each once).
        self._insert_message = self._schema.messages.insert()
        self._insert_recipients = self._schema.recipients.insert()
        self._update_recipient = recipient_update(self._schema)
        self._insert_event = self._schema.events.insert()
        self._insert_known_event = known_message_event(self._schema)
        self._insert_outbox = self._schema.webhook_outbox.insert()
        self._driver = DriverStatements()  # the rows of RowWrites go by the driver
        self._writes: GroupCommit[WriteOp, object] = GroupCommit(
            reactor, threadpool if commit_pool is None else commit_pool, self._commit
        )
        self._reads_running = 0
        self._reads_idle: list[Deferred[None]] = []
        self._closing: list[Deferred[None]] | None = None  # not None once close() was called
        self._close_finished = False

    # -- ITrackingStore ---------------------------------------------------------

    def record_arrival(
        self, envelope: Envelope, *, reporting_mta: str, node_id: str, size: int
    ) -> Deferred[StoredMessage]:
        """Record a message that finished DATA; fires once its transaction committed,
        with the record as stored.

        An ``envelope.arrival`` of 0 (unset) counts as now.
        """
        now = self._clock.seconds()
        message_row, recipient_rows = self._retention.rows(
            envelope, reporting_mta, node_id, size, now
        )
        steps = [(self._insert_message, [message_row])]
        if recipient_rows:
            steps.append((self._insert_recipients, recipient_rows))
        arrived = arrival_event(message_row, len(recipient_rows), now)
        steps.append((self._insert_event, [event_row(arrived)]))
        outbox = outbox_rows([arrived], facts_of_envelope(envelope), self._hooks)
        if outbox:
            steps.append((self._insert_outbox, outbox))
        stored = stored_message(message_row, recipient_rows)
        d: Deferred[None] = self._write(RowWrite(tuple(steps)))
        return d.addCallback(self._reached, "tracking.arrival_committed", stored)

    def known(self, queue_ids: Iterable[str]) -> Deferred[frozenset[str]]:
        """The subset of ``queue_ids`` that have a record."""
        wanted = list(dict.fromkeys(queue_ids))
        column = self._schema.messages.c.queue_id

        def query(conn: Connection) -> frozenset[str]:
            found: set[str] = set()
            for chunk in _chunks(wanted):
                found.update(conn.scalars(select(column).where(column.in_(chunk))))
            return frozenset(found)

        return self._read(query)

    def queued_messages(self, node_id: str) -> Deferred[list[str]]:
        """Queue ids of ``node_id``'s unfinished messages (queued recipients or DSNs owed)."""
        m = self._schema.messages
        statement = (
            select(m.c.queue_id)
            .where(m.c.node_id == node_id, self._unfinished_clause())
            .order_by(m.c.arrival, m.c.queue_id)
        )

        def query(conn: Connection) -> list[str]:
            return list(conn.scalars(statement))

        return self._read(query)

    def message(self, queue_id: str) -> Deferred[StoredMessage | None]:
        """The message with its recipients, or None."""
        m = self._schema.messages

        def query(conn: Connection) -> StoredMessage | None:
            row = conn.execute(select(m).where(m.c.queue_id == queue_id)).one_or_none()
            return None if row is None else self._load(conn, row)

        return self._read(query)

    def lookup_transactions(
        self, envid: str, certifier_candidate: bytes
    ) -> Deferred[list[StoredMessage]]:
        """Every tracked transaction with this exact ENVID whose certifier matches, by
        arrival: one message may reach this MTA as several (RFC 3885 §3.1: a previous
        hop split its recipients, or the sender sent one transaction per recipient).

        An unknown ENVID and a known one with a wrong secret do the same work, so
        that the time taken does not tell whether a message exists (RFC 3887 §4 and
        §11: ``noinfo`` for both): the one query is an outer join from a one-row table, which
        gives one row either way (all NULL when no message has this ENVID), and every
        row, that one included, is compared with the candidate in constant time.
        Transactions with this ENVID and another certifier are other messages: they
        are compared too, and never returned.
        """
        m = self._schema.messages
        one = select(literal(1).label("one")).subquery("one")
        statement = (
            select(m)
            .select_from(one.outerjoin(m, and_(m.c.envid == envid, m.c.certifier.is_not(None))))
            .order_by(m.c.arrival, m.c.queue_id)
        )
        candidate = bytes(certifier_candidate)

        def query(conn: Connection) -> list[StoredMessage]:
            matches: list[Row[Any]] = []
            # Compare every row, so that the time taken does not tell which ones matched.
            for row in conn.execute(statement):
                known = row.certifier is not None
                stored = bytes(row.certifier) if known else NO_CERTIFIER
                if certifier_matches(stored, candidate) and known:
                    matches.append(row)
            return [self._load(conn, row) for row in matches]

        return self._read(query)

    def record_outcomes(self, queue_id: str, updates: Sequence[RecipientUpdate]) -> Deferred[None]:
        """Durably record what happened to some recipients; one group-committed write."""
        rows = [self._update_values(queue_id, update) for update in updates]
        now = self._clock.seconds()
        events = [outcome_event(queue_id, u, now) for u in updates]
        write = RowWrite(
            (
                (self._update_recipient, rows),
                (self._insert_known_event, [known_event_values(e) for e in events]),
            )
        )
        if not wanted_by(self._hooks, events):
            d: Deferred[None] = self._write(write)
        else:  # the outbox rows need the message's sender and recipients: read in the write

            def apply(conn: Connection) -> None:
                for statement, statement_rows in write.steps:
                    if statement_rows:
                        conn.execute(statement, statement_rows)
                self._record_outbox(conn, queue_id, events)

            d = self._write(apply)
        return d.addCallback(self._reached, "tracking.outcome_committed", None)

    @staticmethod
    def _update_values(queue_id: str, update: RecipientUpdate) -> dict[str, object]:
        """The parameters of ``_update_recipient`` for one update (see build there)."""

        def seconds(value: float | None) -> int | None:
            return None if value is None else whole_seconds(value)

        return {
            "p_queue_id": queue_id,
            "p_rcpt_index": update.index,
            "p_state": update.state.value,
            "p_action": update.action,
            "p_status": update.status,
            "p_remote_mta": update.remote_mta,
            "p_diagnostic": update.diagnostic,
            "p_last_attempt": seconds(update.last_attempt),
            "p_will_retry_until": seconds(update.will_retry_until),
            "p_next_attempt": seconds(update.next_attempt),
            "p_certifier_forwarded": update.certifier_forwarded,
            "p_dsn_pending": update.dsn_pending,
            "p_dsn_passed": update.dsn_passed,
            "p_list_expansion": update.list_expansion,
            "p_attempts_added": 1 if update.count_attempt else 0,
            "p_delay_warned": update.delay_warned,  # None: unchanged
            "p_final_recipient": update.final_recipient,  # None: unchanged
        }

    def clear_dsn_pending(self, queue_id: str, indices: Sequence[int]) -> Deferred[None]:
        """The DSNs owed for these recipients are queued themselves now."""
        r = self._schema.recipients
        wanted = list(indices)
        now = self._clock.seconds()
        owed = select(r.c.rcpt_index, r.c.action).where(
            r.c.queue_id == queue_id, r.c.rcpt_index.in_(wanted), dsn_owed(r)
        )

        def apply(conn: Connection) -> None:
            sent = conn.execute(owed.order_by(r.c.rcpt_index)).all()
            conn.execute(
                r.update()
                .where(r.c.queue_id == queue_id, r.c.rcpt_index.in_(wanted))
                .values(dsn_pending=False)
            )
            events = [dsn_event(queue_id, row.rcpt_index, row.action, now) for row in sent]
            self._record_events(conn, events)
            self._record_outbox(conn, queue_id, events)

        return self._write(apply)

    def set_held(self, queue_id: str, held: bool, reason: str | None = None) -> Deferred[bool]:
        """Hold (with the reason) or release a message; False when it is unknown."""
        m = self._schema.messages
        values = {"held": held, "hold_reason": reason if held else None}
        if held:
            event = message_event(queue_id, EventKind.HELD, self._clock.seconds(), reason=reason)
        else:
            event = message_event(queue_id, EventKind.RELEASED, self._clock.seconds())

        def apply(conn: Connection) -> bool:
            result = conn.execute(m.update().where(m.c.queue_id == queue_id).values(**values))
            if result.rowcount:
                self._record_events(conn, [event])
                self._record_outbox(conn, queue_id, [event])
            return bool(result.rowcount)

        return self._write(apply)

    def set_quarantined(
        self, queue_id: str, reason: str | None, *, deleted: bool = False
    ) -> Deferred[bool]:
        """Record why the message's spool file was quarantined (None: it is back or gone)."""
        m = self._schema.messages
        event = quarantine_event(queue_id, reason, deleted, self._clock.seconds())

        def apply(conn: Connection) -> bool:
            result = conn.execute(
                m.update().where(m.c.queue_id == queue_id).values(quarantine_reason=reason)
            )
            if result.rowcount:
                self._record_events(conn, [event])
                self._record_outbox(conn, queue_id, [event])
            return bool(result.rowcount)

        return self._write(apply)

    def events(self, queue_id: str) -> Deferred[list[Event]]:
        """The message's events in time order, then in the order they were recorded."""
        e = self._schema.events
        statement = select(e).where(e.c.queue_id == queue_id).order_by(e.c.at, e.c.id)

        def query(conn: Connection) -> list[Event]:
            return [row_event(row._mapping) for row in conn.execute(statement)]

        return self._read(query)

    def transaction_events(self, queue_ids: Iterable[str]) -> Deferred[dict[str, list[Event]]]:
        """``events`` of several messages in one read (one snapshot), keyed by queue id."""
        wanted = list(dict.fromkeys(queue_ids))
        e = self._schema.events

        def query(conn: Connection) -> dict[str, list[Event]]:
            found: dict[str, list[Event]] = {queue_id: [] for queue_id in wanted}
            for chunk in _chunks(wanted):
                statement = (
                    select(e).where(e.c.queue_id.in_(chunk)).order_by(e.c.queue_id, e.c.at, e.c.id)
                )
                for row in conn.execute(statement):
                    found[row.queue_id].append(row_event(row._mapping))
            return found

        return self._read(query)

    def queue_listing(self, node_id: str) -> Deferred[list[StoredMessage]]:
        """This node's queued messages with their recipients, by arrival."""
        m = self._schema.messages
        statement = (
            select(m)
            .where(m.c.node_id == node_id, self._unfinished_clause())
            .order_by(m.c.arrival, m.c.queue_id)
        )

        def query(conn: Connection) -> list[StoredMessage]:
            return [self._load(conn, row) for row in conn.execute(statement).all()]

        return self._read(query)

    def forget(self, queue_ids: Iterable[str]) -> Deferred[None]:
        """Drop the records of these messages."""
        doomed = list(dict.fromkeys(queue_ids))

        def remove(conn: Connection) -> None:
            self._delete(conn, doomed)

        return self._write(remove)

    def expire(self, now: float | None = None) -> Deferred[int]:
        """Purge expired messages no longer queued; fires with how many.

        A transaction is kept while another transaction of the same tracked message
        (the same ENVID and certifier) is unfinished: RFC 3885 §3.1 forbids denying
        knowledge of a message still in the queue, and the answer covers them all.
        """
        cutoff = whole_seconds(self._clock.seconds() if now is None else now)
        m = self._schema.messages
        sibling = m.alias("sibling")
        unfinished_sibling = exists().where(
            sibling.c.envid == m.c.envid,
            sibling.c.certifier == m.c.certifier,
            sibling.c.queue_id != m.c.queue_id,
            self._unfinished_clause(sibling),
        )
        statement = select(m.c.queue_id).where(
            m.c.expires_at <= cutoff, self._finished_clause(), ~unfinished_sibling
        )

        def purge(conn: Connection) -> int:
            doomed = list(conn.scalars(statement))
            self._delete(conn, doomed)
            return len(doomed)

        return self._write(purge)

    def lower_retention(self, max_retention: float) -> Deferred[int]:
        """Cap retention at ``max_retention`` from now on and for every existing record.

        Under flooding the cap may be lowered retroactively (RFC 3885 §4.1); it never
        goes below one day (§3.1), and messages still queued are kept anyway.
        """
        cap = self._retention.lower(max_retention)
        m = self._schema.messages

        def apply(conn: Connection) -> int:
            result = conn.execute(
                m.update()
                .where(m.c.expires_at > m.c.arrival + cap)
                .values(expires_at=m.c.arrival + cap)
            )
            return int(result.rowcount)

        return self._write(apply)

    def claim_webhooks(
        self, hook: str, owner: str, limit: int, lease: float
    ) -> Deferred[list[OutboxEntry]]:
        """Lease up to ``limit`` due entries of ``hook`` to ``owner``.

        Each candidate is leased by an UPDATE that repeats the "not leased" condition,
        and only those it changed are returned: on PostgreSQL a concurrent claim of the
        same row waits for the first to commit, then finds the condition false (READ
        COMMITTED re-evaluates it); SQLite runs one write transaction at a time.
        """
        o = self._schema.webhook_outbox
        now = whole_seconds(self._clock.seconds())
        free = or_(o.c.lease_until.is_(None), o.c.lease_until <= now)
        candidates = (
            select(o)
            .where(o.c.hook == hook, o.c.due <= now, free)
            .order_by(o.c.due, o.c.id)
            .limit(limit)
        )
        until = now + math.ceil(lease)

        def claim(conn: Connection) -> list[OutboxEntry]:
            claimed = []
            for row in conn.execute(candidates).all():
                result = conn.execute(
                    o.update()
                    .where(o.c.id == row.id, free)
                    .values(lease_owner=owner, lease_until=until)
                )
                if result.rowcount:
                    claimed.append(entry_of(row._mapping))
            return claimed

        return self._write(claim)

    def webhook_delivered(self, entry_id: int, owner: str) -> Deferred[bool]:
        """Delete the entry if ``owner`` still holds its lease."""
        o = self._schema.webhook_outbox
        statement = delete(o).where(o.c.id == entry_id, o.c.lease_owner == owner)

        def apply(conn: Connection) -> bool:
            return bool(conn.execute(statement).rowcount)

        return self._write(apply)

    def retry_webhook(self, entry_id: int, owner: str, due: float) -> Deferred[bool]:
        """One more failed attempt; due again at ``due`` (rounded up), lease released."""
        o = self._schema.webhook_outbox
        statement = (
            o.update()
            .where(o.c.id == entry_id, o.c.lease_owner == owner)
            .values(
                attempts=o.c.attempts + 1, due=math.ceil(due), lease_owner=None, lease_until=None
            )
        )

        def apply(conn: Connection) -> bool:
            return bool(conn.execute(statement).rowcount)

        return self._write(apply)

    def expire_webhooks(self, cutoffs: Mapping[str, float], max_entries: int) -> Deferred[int]:
        """Drop entries of unknown hooks, too old ones, then the oldest beyond the bound."""
        o = self._schema.webhook_outbox
        old = [and_(o.c.hook == hook, o.c.created < math.floor(t)) for hook, t in cutoffs.items()]
        doomed = or_(o.c.hook.not_in(sorted(cutoffs)), *old)

        def apply(conn: Connection) -> int:
            dropped = int(conn.execute(delete(o).where(doomed)).rowcount)
            count = int(conn.execute(select(func.count()).select_from(o)).scalar_one())
            if count > max_entries:
                oldest = select(o.c.id).order_by(o.c.id).limit(count - max_entries).subquery()
                excess = conn.execute(delete(o).where(o.c.id.in_(select(oldest.c.id))))
                dropped += int(excess.rowcount)
            return dropped

        return self._write(apply)

    def ping(self) -> Deferred[None]:
        """``SELECT 1`` through the thread pool, as every read goes."""

        def query(conn: Connection) -> None:
            conn.execute(text("SELECT 1"))

        return self._read(query)

    def close(self) -> Deferred[None]:
        """Finish pending reads and writes, then release the engine if the store made it."""
        if self._close_finished:
            return succeed(None)
        done: Deferred[None] = Deferred()
        if self._closing is not None:
            self._closing.append(done)
            return done
        self._closing = [done]
        d = self._writes.idle()
        d.addCallback(lambda _: self._wait_reads())
        if self._owns_engine:
            d.addCallback(
                lambda _: deferToThreadPool(self._reactor, self._threadpool, self._engine.dispose)
            )
        d.addBoth(self._closed)
        return done

    # -- internals --------------------------------------------------------------

    def _closed(self, result: object) -> None:
        waiters = self._closing or []
        self._closing = []
        self._close_finished = True
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    def _unfinished_recipients(self) -> tuple[ColumnElement[bool], ...]:
        """What makes a recipient, and so its message, unfinished: either condition.

        A recipient still in the queue (``ix_recipients_state``), or a DSN still
        owed for it (the partial ``ix_recipients_dsn_pending``).
        """
        r = self._schema.recipients
        return r.c.state.in_(sorted(QUEUED_STATES)), dsn_owed(r)

    def _unfinished_clause(self, messages: FromClause | None = None) -> ColumnElement[bool]:
        """The message (of ``messages``, default the table) has an unfinished recipient.

        Found from recipients, one indexed SELECT per condition: a handful of
        unfinished messages among millions kept for retention costs a handful
        of look-ups, where a correlated EXISTS would test every message.
        """
        m = self._schema.messages if messages is None else messages
        r = self._schema.recipients
        return m.c.queue_id.in_(
            union(*(select(r.c.queue_id).where(c) for c in self._unfinished_recipients()))
        )

    def _finished_clause(self) -> ColumnElement[bool]:
        """The message has no unfinished recipient (for expire, whose candidates
        come from ``ix_messages_expires_at``).

        NOT EXISTS rather than NOT IN: an anti-join on PostgreSQL however large the
        queue, and one primary-key look-up per candidate on SQLite.
        """
        m, r = self._schema.messages, self._schema.recipients
        return ~exists().where(r.c.queue_id == m.c.queue_id, or_(*self._unfinished_recipients()))

    def _reached(self, _: object, point: str, result: R) -> R:
        """After a commit: tell the faults, then pass ``result`` on."""
        self._faults.reached(point)
        return result

    def _write(self, op: Callable[[Connection], R] | RowWrite) -> Deferred[R]:
        if self._closing is not None:
            return fail(StoreClosedError("tracking store is closed"))
        return cast("Deferred[R]", self._writes.submit(op))

    def _commit(self, ops: list[WriteOp]) -> list[object]:
        """Run a batch of writes in one transaction (in a pool thread).

        If that transaction fails, run each write in a transaction of its own,
        so that one bad write (say, a duplicate queue id) fails alone.
        """
        try:
            return self._transaction(ops)
        except Exception as error:
            if len(ops) == 1:
                return [error]
        results: list[object] = []
        for op in ops:
            try:
                results.extend(self._transaction([op]))
            except Exception as error:
                results.append(error)
        return results

    def _transaction(self, ops: list[WriteOp]) -> list[object]:
        """Run ``ops`` in order in one write transaction; the rows of consecutive
        RowWrites go in one executemany per statement (results: None for those)."""
        with self._engine.connect() as conn:
            mark_write(conn)
            with conn.begin():
                results: list[object] = []
                rows: dict[Executable, list[dict[str, object]]] = {}
                for op in ops:
                    if isinstance(op, RowWrite):
                        for statement, statement_rows in op.steps:
                            rows.setdefault(statement, []).extend(statement_rows)
                        results.append(None)
                    else:
                        self._driver.execute_rows(conn, rows)
                        results.append(op(conn))
                self._driver.execute_rows(conn, rows)
                self._faults.reached("tracking.write")  # an OSError here: a failed write
                return results

    def _read(self, query: Callable[[Connection], R]) -> Deferred[R]:
        if self._closing is not None:
            return fail(StoreClosedError("tracking store is closed"))
        self._reads_running += 1
        d = deferToThreadPool(self._reactor, self._threadpool, self._run_read, query)
        d.addBoth(self._read_finished)
        return d

    def _run_read(self, query: Callable[[Connection], R]) -> R:
        with self._engine.connect() as conn, conn.begin():
            return query(conn)

    def _read_finished(self, result: R) -> R:
        self._reads_running -= 1
        if self._reads_running == 0:
            waiters, self._reads_idle = self._reads_idle, []
            for waiter in waiters:
                waiter.callback(None)
        return result

    def _wait_reads(self) -> Deferred[None]:
        if self._reads_running == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._reads_idle.append(d)
        return d

    def _record_events(self, conn: Connection, events: Sequence[Event]) -> None:
        if events:
            conn.execute(self._insert_event, [event_row(event) for event in events])

    def _record_outbox(self, conn: Connection, queue_id: str, events: Sequence[Event]) -> None:
        """Write the outbox entries of ``events`` of message ``queue_id`` (read in ``conn``,
        the events' own transaction); none when no hook wants them or it is unknown."""
        if not wanted_by(self._hooks, events):
            return
        m, r = self._schema.messages, self._schema.recipients
        message = conn.execute(
            select(m.c.sender, m.c.envid).where(m.c.queue_id == queue_id)
        ).one_or_none()
        if message is None:
            return
        recipients = conn.execute(
            select(r.c.rcpt_index, r.c.address, r.c.orcpt_address).where(r.c.queue_id == queue_id)
        )
        facts = MessageFacts(
            queue_id=queue_id,
            sender=message.sender,
            envid=message.envid,
            recipients={row.rcpt_index: row.orcpt_address or row.address for row in recipients},
        )
        rows = outbox_rows(events, facts, self._hooks)
        if rows:
            conn.execute(self._insert_outbox, rows)

    def _delete(self, conn: Connection, queue_ids: Sequence[str]) -> None:
        m, r, e = self._schema.messages, self._schema.recipients, self._schema.events
        for chunk in _chunks(queue_ids):
            conn.execute(delete(e).where(e.c.queue_id.in_(chunk)))
            conn.execute(delete(r).where(r.c.queue_id.in_(chunk)))
            conn.execute(delete(m).where(m.c.queue_id.in_(chunk)))

    def _load(self, conn: Connection, row: Row[Any]) -> StoredMessage:
        r = self._schema.recipients
        recipient_rows = conn.execute(
            select(r).where(r.c.queue_id == row.queue_id).order_by(r.c.rcpt_index)
        )
        return stored_message(row._mapping, [rr._mapping for rr in recipient_rows])


# -- engine: every dialect-specific detail is below ---------------------------------

SQLITE_BUSY_TIMEOUT_MS = 30_000
WRITE_OPTION = "mtrkmta_write"  # execution option: this connection's transaction will write
# PostgreSQL advisory lock id, kept within a signed 32-bit integer.
_MIGRATION_LOCK_KEY = zlib.crc32(b"mtrkmta.tracking.migrate") & 0x7FFFFFFF


def create_tracking_engine(url: URL | str) -> Engine:
    """Make an engine for the tracking store.

    SQLite: WAL journal, synchronous=FULL, foreign keys on and a busy timeout on
    every connection, and SQLAlchemy (not the driver) emits BEGIN so that reads
    get one snapshot and DDL is transactional; write transactions use BEGIN
    IMMEDIATE. PostgreSQL (or anything else): as given, with pre-ping; a bare
    ``postgresql://`` URL uses psycopg 3, the driver mtrkmta depends on (SQLAlchemy
    2.0 would pick psycopg2 for it, 2.1 picks psycopg).
    """
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)
    engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def mark_write(conn: Connection) -> None:
    """Declare that ``conn``'s next transaction writes (SQLite then takes the lock at BEGIN)."""
    conn.execution_options(**{WRITE_OPTION: True})


def take_migration_lock(conn: Connection) -> None:
    """Serialise concurrent schema upgrades (several nodes starting at once).

    PostgreSQL: a transaction-scoped advisory lock. SQLite: the BEGIN IMMEDIATE
    of a write transaction already excludes other writers.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})


def _sqlite_connect(dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
    # Stop the sqlite3 module from issuing BEGIN itself; _sqlite_begin does it.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    write = conn.get_execution_options().get(WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
