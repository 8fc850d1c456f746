"""Delivery status notification bookkeeping per recipient.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 14:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("dsn_pending", "dsn_passed", "delay_warned")


def upgrade() -> None:
    # Plain ADD COLUMN with a constant default: SQLite and PostgreSQL both do it in place.
    for name in COLUMNS:
        op.add_column(
            "recipients",
            sa.Column(name, sa.Boolean(), server_default=sa.false(), nullable=False),
        )


def downgrade() -> None:
    for name in reversed(COLUMNS):
        op.drop_column("recipients", name)
