"""The tracking store's hot writes by the driver (store.DriverStatements) store exactly
what SQLAlchemy Core stores for the same rows: every column, compared as the driver
reads it back, on SQLite and (``--postgres``) on PostgreSQL."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, Executable, exc

from mtrkmta.envelope import (
    ClientInfo,
    DeliverBy,
    Envelope,
    MailParams,
    Mtrk,
    OriginalRecipient,
    RcptParams,
    Recipient,
)
from mtrkmta.testing import database_url
from mtrkmta.tracking import migrate
from mtrkmta.tracking.events import arrival_event, event_row, outcome_event
from mtrkmta.tracking.interfaces import RecipientState, RecipientUpdate
from mtrkmta.tracking.schema import build_schema
from mtrkmta.tracking.store import (
    DriverStatements,
    SQLTrackingStore,
    arrival_rows,
    create_tracking_engine,
    driver_statement,
    known_event_values,
    known_message_event,
    mark_write,
    recipient_update,
)

NOW = 1_700_000_123.75
SCHEMA = build_schema()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = database_url(tmp_path)
    migrate.upgrade(url)
    made = create_tracking_engine(url)
    try:
        yield made
    finally:
        made.dispose()


def envelope(queue_id: str) -> Envelope:
    """A message with a value in every column the arrival writes (NULLs come from
    the second recipient's absent ORCPT and NOTIFY)."""
    return Envelope(
        queue_id=queue_id,
        sender="sénder@example.org",
        recipients=(
            Recipient(
                "rcpt0@example.net",
                RcptParams(
                    notify=frozenset({"SUCCESS", "DELAY"}),
                    orcpt=OriginalRecipient("rfc822", "orig+0@example.net"),
                ),
            ),
            Recipient("rcpt1@example.net", RcptParams()),
        ),
        params=MailParams(
            envid="envid-1",
            mtrk=Mtrk(hashlib.sha1(b"secret").digest(), 86_400 * 3),
            ret="HDRS",
            body="8BITMIME",
            smtputf8=True,
            auth="<>",
            deliver_by=DeliverBy(seconds=7200, mode="R", trace=False),
        ),
        arrival=NOW - 5.5,
        client=ClientInfo(
            address="192.0.2.9",
            port=4025,
            helo="client.example",
            protocol="ESMTPSA",
            authenticated_as="user",
            listener="submission",
        ),
    )


def updates() -> list[RecipientUpdate]:
    """Two outcomes between them setting every column the outcome UPDATE writes, each
    boolean both ways and each "NULL: unchanged" parameter both ways."""
    return [
        RecipientUpdate(
            index=0,
            state=RecipientState.RELAYED,
            status="2.1.9",
            action="relayed",
            remote_mta="dns; mx.example.net",
            diagnostic="smtp; 250 2.0.0 Ök",
            last_attempt=NOW - 0.25,
            will_retry_until=NOW + 3600.5,
            next_attempt=NOW + 60.9,
            certifier_forwarded=True,
            dsn_pending=True,
            dsn_passed=False,
            delay_warned=True,
            final_recipient="final0@example.net",
            list_expansion=True,
            relay="mx.example.net[198.51.100.1]:25",
        ),
        RecipientUpdate(
            index=1,
            state=RecipientState.DEFERRED,
            status="4.4.1",
            action="delayed",
            last_attempt=NOW,
            next_attempt=NOW + 300,
            dsn_passed=True,
            count_attempt=False,
        ),
    ]


def writes(queue_id: str) -> list[tuple[Executable, list[dict[str, object]]]]:
    """The statements and rows of one message's arrival, then of its outcomes, as
    ``record_arrival`` and ``record_outcomes`` build them."""
    message, recipients = arrival_rows(
        envelope(queue_id),
        reporting_mta="mx.example.org",
        node_id="node-1",
        size=12345,
        now=NOW,
        default_retention=86_400 * 9,
        max_retention=86_400 * 30,
    )
    arrived = arrival_event(message, len(recipients), NOW)
    outcomes = updates()
    return [
        (SCHEMA.messages.insert(), [message]),
        (SCHEMA.recipients.insert(), recipients),
        (SCHEMA.events.insert(), [event_row(arrived)]),
        (
            recipient_update(SCHEMA),
            [SQLTrackingStore._update_values(queue_id, u) for u in outcomes],
        ),
        (
            known_message_event(SCHEMA),
            [known_event_values(outcome_event(queue_id, u, NOW)) for u in outcomes],
        ),
    ]


def stored(conn: Connection, queue_id: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every column of the message's rows as the driver returns them (no SQLAlchemy
    result processing), the queue id and the events' serial id left out."""
    quoted = queue_id.replace("'", "''")
    found = {}
    for table, order in (("messages", "queue_id"), ("recipients", "rcpt_index"), ("events", "id")):
        result = conn.exec_driver_sql(
            f"SELECT * FROM {table} WHERE queue_id = '{quoted}' ORDER BY {order}"
        )
        names = list(result.keys())
        found[table] = [
            tuple(
                (name, type(value).__name__, value)
                for name, value in zip(names, row, strict=True)
                if name not in ("queue_id", "id")
            )
            for row in result
        ]
    return found


def test_the_driver_stores_every_hot_column_as_core_stores_it(engine: Engine):
    driver = DriverStatements()
    with engine.connect() as conn:
        mark_write(conn)
        with conn.begin():
            for statement, rows in writes("CORE1"):
                conn.execute(statement, rows)
            for statement, rows in writes("DRIVER1"):
                # the driver path applies to every hot statement (no fallback to Core)
                assert driver_statement(statement, conn.dialect, frozenset(rows[0])) is not None
                driver.execute_rows(conn, {statement: rows})
        with conn.begin():
            core, by_driver = stored(conn, "CORE1"), stored(conn, "DRIVER1")
    assert [len(rows) for rows in core.values()] == [1, 2, 3]
    assert by_driver == core


def test_a_driver_failure_is_sqlalchemys_error_and_fails_the_write(engine: Engine):
    """A duplicate queue id: the driver's error comes wrapped as SQLAlchemy wraps it
    (the store's TRANSIENT_ERRORS and the callers see SQLAlchemy's classes)."""
    (statement, rows), *_ = writes("DUP1")
    driver = DriverStatements()
    with engine.connect() as conn:
        mark_write(conn)
        with conn.begin():
            driver.execute_rows(conn, {statement: rows})
        with pytest.raises(exc.IntegrityError), conn.begin():
            driver.execute_rows(conn, {statement: rows})
