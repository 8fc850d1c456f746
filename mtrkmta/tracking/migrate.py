"""Bring a tracking database's schema to a given Alembic revision (blocking; run in a thread).

Alembic (with Mako) is imported only when a migration runs or a revision is asked for:
it costs about 10 MiB in every process, and a node that starts on a database already at
:data:`HEAD_REVISION` (every worker, every restart) never needs it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import Connection, inspect, text

from mtrkmta.tracking.store import create_tracking_engine, mark_write, take_migration_lock

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
# The newest revision under migrations/versions/ (a test holds it to Alembic's head).
HEAD_REVISION = "0009"


def alembic_config(url: str, connection: Connection | None = None) -> Config:
    """An Alembic Config for the packaged migrations; no alembic.ini involved.

    With ``connection``, env.py migrates through it inside the caller's transaction.
    """
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", MIGRATIONS_DIR)
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """The newest revision the packaged migrations know, as Alembic reads them."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("")).get_current_head()


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision``, in one locked transaction.

    A database already at :data:`HEAD_REVISION` is left alone without loading Alembic.
    """
    if revision == "head" and _stored_revision(url) == HEAD_REVISION:
        return
    from alembic import command

    _run(url, lambda config: command.upgrade(config, revision))


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` ("base" drops everything)."""
    from alembic import command

    _run(url, lambda config: command.downgrade(config, revision))


def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at, or None before any migration."""
    from alembic.runtime.migration import MigrationContext

    engine = create_tracking_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def _stored_revision(url: str) -> str | None:
    """What Alembic's version table holds (one row on a linear history), read with plain
    SQL; None when the table is missing or does not hold exactly one revision."""
    engine = create_tracking_engine(url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).all()
            return str(rows[0][0]) if len(rows) == 1 else None
    finally:
        engine.dispose()


# Alembic keeps per-process global state while it runs a migration (its `op` and
# `context` proxies), so two migrations in one process at once corrupt each other even
# on different databases. This lock guards that process-wide resource; the database
# lock in take_migration_lock guards the schema across processes and nodes.
_ALEMBIC = threading.Lock()


def _run(url: str, step: Callable[[Config], None]) -> None:
    with _ALEMBIC:
        _run_locked(url, step)


def _run_locked(url: str, step: Callable[[Config], None]) -> None:
    engine = create_tracking_engine(url)
    try:
        with engine.connect() as conn:
            mark_write(conn)
            with conn.begin():
                take_migration_lock(conn)
                step(alembic_config(url, conn))
    finally:
        engine.dispose()
