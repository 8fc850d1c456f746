"""Initial tracking schema: messages and their recipients.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATES = (
    "queued",
    "inflight",
    "deferred",
    "delivered",
    "transferred",
    "relayed",
    "expanded",
    "failed",
)


def upgrade() -> None:
    """Create the messages and recipients tables (timestamps: BIGINT POSIX seconds)."""
    op.create_table(
        "messages",
        sa.Column("queue_id", sa.String(64), nullable=False),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("envid", sa.String(255), nullable=True),
        sa.Column("certifier", sa.LargeBinary(20), nullable=True),
        sa.Column("sender", sa.Text(), nullable=False),
        sa.Column("arrival", sa.BigInteger(), nullable=False),
        sa.Column("requested_timeout", sa.BigInteger(), nullable=True),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("reporting_mta", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("ret", sa.String(8), nullable=True),
        sa.Column("body", sa.String(16), nullable=True),
        sa.Column("smtputf8", sa.Boolean(), nullable=False),
        sa.Column("auth", sa.Text(), nullable=True),
        sa.Column("client_address", sa.String(64), nullable=False),
        sa.Column("client_port", sa.Integer(), nullable=False),
        sa.Column("client_helo", sa.Text(), nullable=False),
        sa.Column("client_protocol", sa.String(16), nullable=False),
        sa.Column("client_authenticated_as", sa.Text(), nullable=True),
        sa.Column("client_listener", sa.String(16), nullable=False),
        sa.Column("held", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("queue_id", name=op.f("pk_messages")),
    )
    op.create_index(op.f("ix_messages_envid"), "messages", ["envid"])
    op.create_index(op.f("ix_messages_expires_at"), "messages", ["expires_at"])
    op.create_table(
        "recipients",
        sa.Column("queue_id", sa.String(64), nullable=False),
        sa.Column("rcpt_index", sa.Integer(), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.Column("orcpt_type", sa.String(32), nullable=True),
        sa.Column("orcpt_address", sa.Text(), nullable=True),
        sa.Column("notify", sa.String(32), nullable=True),
        sa.Column("final_recipient", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("action", sa.String(16), nullable=True),
        sa.Column("status", sa.String(32), nullable=True),
        sa.Column("remote_mta", sa.Text(), nullable=True),
        sa.Column("diagnostic", sa.Text(), nullable=True),
        sa.Column("last_attempt", sa.BigInteger(), nullable=True),
        sa.Column("will_retry_until", sa.BigInteger(), nullable=True),
        sa.Column("next_attempt", sa.BigInteger(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("certifier_forwarded", sa.Boolean(), nullable=False),
        sa.CheckConstraint(
            "state IN ({})".format(", ".join(f"'{s}'" for s in STATES)),
            name=op.f("ck_recipients_state"),
        ),
        sa.ForeignKeyConstraint(
            ["queue_id"],
            ["messages.queue_id"],
            name=op.f("fk_recipients_queue_id_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("queue_id", "rcpt_index", name=op.f("pk_recipients")),
    )
    op.create_index(op.f("ix_recipients_state"), "recipients", ["state", "queue_id"])


def downgrade() -> None:
    """Drop the tracking tables."""
    op.drop_index(op.f("ix_recipients_state"), table_name="recipients")
    op.drop_table("recipients")
    op.drop_index(op.f("ix_messages_expires_at"), table_name="messages")
    op.drop_index(op.f("ix_messages_envid"), table_name="messages")
    op.drop_table("messages")
