"""Partial index of the recipients that owe a DSN, for the unfinished-message queries.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The condition as schema.dsn_owed renders it (SQLite "dsn_pending = 1", PostgreSQL
    # "dsn_pending = true"): SQLite matches a query to a partial index term for term.
    # Building it reads recipients once; the index itself holds only the DSNs owed.
    owed = sa.column("dsn_pending", sa.Boolean()) == sa.true()
    op.create_index(
        op.f("ix_recipients_dsn_pending"),
        "recipients",
        ["queue_id"],
        sqlite_where=owed,
        postgresql_where=owed,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_recipients_dsn_pending"), table_name="recipients")
