"""Alembic migrations of the tracking store: they build exactly schema.py, up and down."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError

from mtrkmta.testing import database_url
from mtrkmta.tracking import migrate
from mtrkmta.tracking.schema import build_schema, dsn_owed
from mtrkmta.tracking.store import create_tracking_engine

MESSAGE = {
    "queue_id": "Q1",
    "node_id": "n",
    "envid": None,
    "certifier": None,
    "sender": "",
    "arrival": 1,
    "requested_timeout": None,
    "expires_at": 2,
    "reporting_mta": "mx.example.com",
    "size": 10,
    "ret": None,
    "body": None,
    "smtputf8": False,
    "auth": None,
    "client_address": "",
    "client_port": 0,
    "client_helo": "",
    "client_protocol": "ESMTP",
    "client_authenticated_as": None,
    "client_listener": "smtp",
}


def recipient(state: str = "queued") -> dict[str, object]:
    return {
        "queue_id": "Q1",
        "rcpt_index": 0,
        "address": "a@example.org",
        "final_recipient": "a@example.org",
        "state": state,
        "attempts": 0,
        "certifier_forwarded": False,
    }


def insert_row(conn: Connection, table: str, row: dict[str, object]) -> None:
    """One row, as written by the version of the schema the store is at."""
    columns = ", ".join(row)
    values = ", ".join(f":{column}" for column in row)
    conn.execute(text(f"INSERT INTO {table} ({columns}) VALUES ({values})"), row)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return database_url(tmp_path)


def diffs(url: str) -> list[object]:
    engine = create_tracking_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), build_schema().metadata))
    finally:
        engine.dispose()


def test_migrated_schema_equals_schema_module(db_url):
    migrate.upgrade(db_url)
    assert diffs(db_url) == []


def test_comparison_sees_a_missing_schema(db_url):
    # Guards the test above: on an empty database the comparison reports both tables.
    added = {d[1].name for d in diffs(db_url) if d[0] == "add_table"}
    assert added == {"messages", "recipients", "auth_failures", "events", "webhook_outbox"}


def test_upgrade_is_idempotent_and_reaches_head(db_url):
    assert migrate.current_revision(db_url) is None
    migrate.upgrade(db_url)
    migrate.upgrade(db_url)
    assert migrate.head_revision() == migrate.HEAD_REVISION == "0009"
    assert migrate.current_revision(db_url) == "0009"


LOADS_ALEMBIC = (
    "import sys; from mtrkmta.tracking.migrate import upgrade; upgrade(sys.argv[1]); "
    "print('alembic' in sys.modules, 'mako' in sys.modules)"
)


def test_upgrade_loads_alembic_only_when_there_is_something_to_do(db_url):
    """A start on a database at HEAD_REVISION (every worker, every restart) does not pay
    Alembic's memory; a fresh database or one behind is migrated as before."""

    def upgrade_in_a_new_process() -> str:
        done = subprocess.run(
            [sys.executable, "-c", LOADS_ALEMBIC, db_url],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return done.stdout.strip()

    assert upgrade_in_a_new_process() == "True True"  # fresh: migrated
    assert migrate.current_revision(db_url) == migrate.HEAD_REVISION
    assert upgrade_in_a_new_process() == "False False"  # at head: a plain SELECT
    migrate.downgrade(db_url, "0008")
    assert upgrade_in_a_new_process() == "True True"  # behind: migrated
    assert migrate.current_revision(db_url) == migrate.HEAD_REVISION


def test_downgrade_to_base_and_back(db_url):
    migrate.upgrade(db_url)
    migrate.downgrade(db_url, "base")
    engine = create_tracking_engine(db_url)
    try:
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()
    assert migrate.current_revision(db_url) is None
    migrate.upgrade(db_url)
    assert diffs(db_url) == []


def test_constraints_follow_the_naming_convention_and_hold(db_url):
    migrate.upgrade(db_url)
    schema = build_schema()
    engine = create_tracking_engine(db_url)
    try:
        inspector = inspect(engine)
        assert [c["name"] for c in inspector.get_check_constraints("recipients")] == [
            "ck_recipients_state"
        ]
        assert [fk["name"] for fk in inspector.get_foreign_keys("recipients")] == [
            "fk_recipients_queue_id_messages"
        ]
        assert {ix["name"] for ix in inspector.get_indexes("messages")} == {
            "ix_messages_envid",
            "ix_messages_expires_at",
        }
        assert {ix["name"] for ix in inspector.get_indexes("recipients")} == {
            "ix_recipients_state",
            "ix_recipients_dsn_pending",
        }
        with engine.begin() as conn:
            conn.execute(insert(schema.messages), [MESSAGE])
        # RFC 3886 §3.3: the queue state is one of the known values.
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(insert(schema.recipients), [recipient("lost")])
        # Every recipient belongs to a message (foreign keys are on).
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(insert(schema.recipients), [{**recipient(), "queue_id": "Q2"}])
        with engine.begin() as conn:
            conn.execute(insert(schema.recipients), [recipient()])
            conn.execute(schema.messages.delete())
            assert conn.execute(select(schema.recipients)).all() == []  # ON DELETE CASCADE
    finally:
        engine.dispose()


def test_dsn_pending_index_is_partial_as_in_the_schema_module(db_url):
    # Autogenerate compares an index's name and columns, not its WHERE: check that here.
    # It must be the very condition the store's queries use, or SQLite ignores the index.
    migrate.upgrade(db_url)
    engine = create_tracking_engine(db_url)
    try:
        dialect = engine.dialect.name
        (index,) = [
            ix
            for ix in inspect(engine).get_indexes("recipients")
            if ix["name"] == "ix_recipients_dsn_pending"
        ]
        reflected = str(index["dialect_options"][f"{dialect}_where"])
        wanted = dsn_owed(build_schema().recipients).compile(
            dialect=engine.dialect, compile_kwargs={"include_table": False}
        )
    finally:
        engine.dispose()
    assert index["column_names"] == ["queue_id"]
    assert reflected.strip("()") == str(wanted)


def test_downgrade_to_0002_drops_only_the_dsn_pending_index(db_url):
    migrate.upgrade(db_url)
    migrate.downgrade(db_url, "0002")
    engine = create_tracking_engine(db_url)
    try:
        assert {ix["name"] for ix in inspect(engine).get_indexes("recipients")} == {
            "ix_recipients_state"
        }
    finally:
        engine.dispose()
    migrate.upgrade(db_url)
    assert diffs(db_url) == []


def test_downgrade_to_0003_drops_only_the_auth_failures_table(db_url):
    migrate.upgrade(db_url)
    engine = create_tracking_engine(db_url)
    try:
        assert {ix["name"] for ix in inspect(engine).get_indexes("auth_failures")} == {
            "ix_auth_failures_address",
            "ix_auth_failures_failed_at",
        }
        migrate.downgrade(db_url, "0003")
        assert set(inspect(engine).get_table_names()) == {
            "alembic_version",
            "messages",
            "recipients",
        }
    finally:
        engine.dispose()
    migrate.upgrade(db_url)
    assert diffs(db_url) == []


def test_offline_mode_emits_the_ddl(db_url, capsys):
    command.upgrade(migrate.alembic_config(db_url), "head", sql=True)
    out = capsys.readouterr().out
    assert "CREATE TABLE messages" in out
    assert "CREATE TABLE recipients" in out
    assert "CREATE TABLE auth_failures" in out
    assert "CREATE INDEX ix_messages_envid ON messages (envid)" in out
    partial = "CREATE INDEX ix_recipients_dsn_pending ON recipients (queue_id) WHERE dsn_pending = "
    assert partial in out


def test_0006_marks_the_recipients_a_list_expanded_before(db_url):
    # Before 0006 a list was recognised by its diagnostic; the column takes that over.
    command.upgrade(migrate.alembic_config(db_url), "0005")
    engine = create_tracking_engine(db_url)
    try:
        with engine.begin() as conn:
            insert_row(conn, "messages", MESSAGE)
            for index, (state, diagnostic) in enumerate(
                [
                    ("expanded", "x-local; accepted by a mailing list"),
                    ("expanded", None),  # a multi-target alias
                    ("failed", "x-local; accepted by a mailing list"),
                ]
            ):
                row = {**recipient(state), "rcpt_index": index, "diagnostic": diagnostic}
                insert_row(conn, "recipients", row)
        migrate.upgrade(db_url)
        with engine.connect() as conn:
            marks = conn.execute(
                text("SELECT list_expansion FROM recipients ORDER BY rcpt_index")
            ).scalars()
            assert [bool(m) for m in marks] == [True, False, False]
    finally:
        engine.dispose()


def test_0007_adds_the_events_table_and_keeps_the_records(db_url):
    # A store of 0006 with a message: after 0007 the message is as it was, with no events,
    # and its new events go with it (foreign key, ON DELETE CASCADE); down again drops
    # only the events table.
    command.upgrade(migrate.alembic_config(db_url), "0006")
    schema = build_schema()
    engine = create_tracking_engine(db_url)
    try:
        with engine.begin() as conn:
            insert_row(conn, "messages", MESSAGE)
            row = recipient("deferred")
            insert_row(conn, "recipients", row)
        migrate.upgrade(db_url)
        engine.dispose()  # a new connection sees the new schema
        assert {ix["name"] for ix in inspect(engine).get_indexes("events")} == {
            "ix_events_queue_id"
        }
        event = {"queue_id": "Q1", "rcpt_index": 0, "at": 5, "kind": "held", "detail": "{}"}
        with engine.begin() as conn:
            assert conn.execute(select(schema.messages.c.queue_id)).scalars().all() == ["Q1"]
            assert conn.execute(select(schema.recipients.c.state)).scalars().all() == ["deferred"]
            assert conn.execute(select(schema.events)).all() == []
            conn.execute(insert(schema.events), [event, {**event, "at": 6}])
            ids = conn.execute(select(schema.events.c.id).order_by(schema.events.c.id)).scalars()
            assert len(set(ids)) == 2  # numbered by the database
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(insert(schema.events), [{**event, "queue_id": "Q2"}])
        with engine.begin() as conn:
            conn.execute(schema.messages.delete())
            assert conn.execute(select(schema.events)).all() == []  # ON DELETE CASCADE
        migrate.downgrade(db_url, "0006")
        assert "events" not in inspect(engine).get_table_names()
        assert diffs(db_url) != []
    finally:
        engine.dispose()
    migrate.upgrade(db_url)
    assert diffs(db_url) == []


def test_0008_adds_the_webhook_outbox_and_keeps_the_records(db_url):
    # A store of 0007 with a message: after 0008 it is as it was with an empty outbox,
    # whose rows do not depend on a message; down again drops only the outbox.
    command.upgrade(migrate.alembic_config(db_url), "0007")
    schema = build_schema()
    engine = create_tracking_engine(db_url)
    try:
        with engine.begin() as conn:
            insert_row(conn, "messages", MESSAGE)
        migrate.upgrade(db_url)
        engine.dispose()  # a new connection sees the new schema
        indexes = {ix["name"] for ix in inspect(engine).get_indexes("webhook_outbox")}
        assert indexes == {"ix_webhook_outbox_hook"}
        entry = {
            "hook": "crm", "event_id": "e" * 32, "queue_id": "gone", "body": "{}",
            "created": 5, "due": 5, "attempts": 0, "lease_owner": "n" * 300, "lease_until": 9,
        }  # fmt: skip
        with engine.begin() as conn:
            assert conn.execute(select(schema.messages.c.queue_id)).scalars().all() == ["Q1"]
            assert conn.execute(select(schema.webhook_outbox)).all() == []
            conn.execute(insert(schema.webhook_outbox), [entry, entry])
            ids = conn.execute(select(schema.webhook_outbox.c.id)).scalars().all()
            assert len(set(ids)) == 2  # numbered by the database
        migrate.downgrade(db_url, "0007")
        assert "webhook_outbox" not in inspect(engine).get_table_names()
        assert "messages" in inspect(engine).get_table_names()
        assert diffs(db_url) != []
    finally:
        engine.dispose()
    migrate.upgrade(db_url)
    assert diffs(db_url) == []
