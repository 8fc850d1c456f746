"""Telling a damaged SQLite tracking database from other errors (real SQLite files)."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError

from mtrkmta.config import Override
from mtrkmta.service import recover_command
from mtrkmta.tracking.damage import DatabaseDamage, as_damage, check_database, damage_reason
from mtrkmta.tracking.migrate import upgrade
from mtrkmta.tracking.store import create_tracking_engine
from mtrkmta.workers import ConfigOrigin


def migrated(tmp_path: Path) -> tuple[Path, str]:
    database = tmp_path / "tracking.sqlite"
    url = f"sqlite:///{database}"
    upgrade(url)
    return database, url


def zero_page_of(database: Path, table: str) -> None:
    with closing(sqlite3.connect(database)) as conn:
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
    with open(database, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(bytes(page_size))


def query_error(url: str, statement: str) -> DatabaseError:
    engine = create_tracking_engine(url)
    try:
        with engine.connect() as conn, pytest.raises(DatabaseError) as caught:
            conn.execute(text(statement)).all()
    finally:
        engine.dispose()
    return caught.value


def test_a_query_that_reads_a_zeroed_page_is_damage(tmp_path):
    # What start-up meets when the damage shows only in a query after the schema upgrade
    # (spool reconciliation reads the messages table).
    database, url = migrated(tmp_path)
    zero_page_of(database, "messages")
    error = query_error(url, "SELECT queue_id, sender FROM messages")
    assert damage_reason(error) == "database disk image is malformed"
    damage = as_damage(error, url)
    assert damage is not None and damage.path == str(database)
    assert (
        str(damage) == f"tracking database {database} is damaged (database disk image is malformed)"
    )


def test_a_wrapped_error_is_found_through_its_cause(tmp_path):
    database, url = migrated(tmp_path)
    zero_page_of(database, "messages")
    try:
        try:
            raise query_error(url, "SELECT queue_id FROM messages ORDER BY sender")
        except DatabaseError as error:
            raise RuntimeError("reconciliation failed") from error
    except RuntimeError as outer:
        assert damage_reason(outer) == "database disk image is malformed"


def test_a_locked_database_is_not_damage(tmp_path):
    database, url = migrated(tmp_path)
    with closing(sqlite3.connect(database, isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")
        with closing(sqlite3.connect(database, timeout=0, isolation_level=None)) as writer:
            with pytest.raises(sqlite3.OperationalError) as caught:
                writer.execute("BEGIN IMMEDIATE")
        holder.execute("ROLLBACK")
    assert str(caught.value) == "database is locked"
    assert damage_reason(caught.value) is None
    assert as_damage(caught.value, url) is None


def test_damage_words_from_another_database_are_not_sqlite_damage():
    error = DatabaseError("SELECT 1", {}, sqlite3.DatabaseError("file is not a database"))
    assert damage_reason(error) == "file is not a database"
    assert as_damage(error, "postgresql+psycopg://db.example.invalid/mtrkmta") is None


def test_check_database_passes_a_sound_file_and_ignores_a_missing_one(tmp_path):
    _, url = migrated(tmp_path)
    check_database(url)
    missing = tmp_path / "nothing-here.sqlite"
    check_database(f"sqlite:///{missing}")
    assert not missing.exists()


def test_check_database_finds_a_zeroed_page_before_any_query(tmp_path):
    database, url = migrated(tmp_path)
    zero_page_of(database, "recipients")
    with pytest.raises(DatabaseDamage) as caught:
        check_database(url)
    assert caught.value.path == str(database)
    assert caught.value.reason == "database disk image is malformed"


def test_the_advice_names_the_command_for_the_running_configuration():
    origin = ConfigOrigin(
        Path("/etc/mtrkmta/mtrkmta.toml"),
        (
            Override("--data-dir", "server.data_dir", "/srv/mail data"),
            Override("--smtp", "listeners.smtp", "tcp:25"),
            Override("--hostname", "server.hostname", "mx.example.org"),
        ),
    )
    damage = DatabaseDamage("/srv/mail data/tracking.sqlite", "file is not a database")
    assert damage.advice(recover_command(origin)) == (
        "tracking database /srv/mail data/tracking.sqlite is damaged (file is not a database); "
        "stop mtrkmta and run: mtrkmta db recover --config /etc/mtrkmta/mtrkmta.toml "
        "--data-dir '/srv/mail data' --hostname mx.example.org"
    )
    assert recover_command(None) == "mtrkmta db recover --config FILE"
