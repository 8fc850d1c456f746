"""Recent SMTP AUTH failures per client address, shared by every process on the database.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-12 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """One row per failure: the client address and the POSIX second it failed at."""
    op.create_table(
        "auth_failures",
        sa.Column("address", sa.String(64), nullable=False),
        sa.Column("failed_at", sa.BigInteger(), nullable=False),
    )
    op.create_index(op.f("ix_auth_failures_address"), "auth_failures", ["address", "failed_at"])
    op.create_index(op.f("ix_auth_failures_failed_at"), "auth_failures", ["failed_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_auth_failures_failed_at"), table_name="auth_failures")
    op.drop_index(op.f("ix_auth_failures_address"), table_name="auth_failures")
    op.drop_table("auth_failures")
