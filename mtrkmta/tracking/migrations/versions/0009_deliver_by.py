"""A message's deliver-by-time (RFC 2852 §4), for tracking reports.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 19:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """One nullable column on messages (a plain ADD COLUMN); existing rows have no BY=."""
    op.add_column("messages", sa.Column("deliver_by", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("messages", "deliver_by")
