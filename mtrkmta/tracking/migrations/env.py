"""Alembic environment of the tracking store, driven programmatically by migrate.py."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from mtrkmta.tracking.schema import build_schema
from mtrkmta.tracking.store import create_tracking_engine, mark_write, take_migration_lock


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=build_schema().metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things in place
        compare_type=True,
    )
    with context.begin_transaction():  # a no-op inside the caller's transaction
        context.run_migrations()


def run_offline() -> None:
    """Emit the SQL script for the configured URL instead of running it."""
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=build_schema().metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Migrate through the caller's connection when given (migrate.py), else a new engine."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _migrate(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: set sqlalchemy.url or pass a connection")
    engine = create_tracking_engine(url)
    try:
        with engine.connect() as own:
            mark_write(own)
            with own.begin():
                take_migration_lock(own)
                _migrate(own)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
