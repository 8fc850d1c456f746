"""Why a message is held, and why its spool file was quarantined.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("hold_reason", "quarantine_reason")


def upgrade() -> None:
    """Two nullable text columns on messages (a plain ADD COLUMN on SQLite and
    PostgreSQL: no table copy); existing rows read as "no reason"."""
    for name in COLUMNS:
        op.add_column("messages", sa.Column(name, sa.Text(), nullable=True))


def downgrade() -> None:
    for name in reversed(COLUMNS):
        op.drop_column("messages", name)
