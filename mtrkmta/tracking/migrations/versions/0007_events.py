"""The events table: what happened to each message and recipient, with its time.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 14:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """A new table (no existing row changes): messages recorded before it have no events."""
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("queue_id", sa.String(64), nullable=False),
        sa.Column("rcpt_index", sa.Integer(), nullable=True),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["queue_id"],
            ["messages.queue_id"],
            name=op.f("fk_events_queue_id_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_queue_id"), "events", ["queue_id", "at", "id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_events_queue_id"), table_name="events")
    op.drop_table("events")
