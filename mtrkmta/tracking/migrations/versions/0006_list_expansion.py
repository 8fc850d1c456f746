"""Mark the recipients a mailing list expanded, instead of recognising their diagnostic.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 10:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# The diagnostic that marked a list before this revision (mtrkmta.queue.expansion).
LIST_DIAGNOSTIC = "x-local; accepted by a mailing list"


def upgrade() -> None:
    """A boolean column, set for the recipients recorded before with the list's diagnostic."""
    op.add_column(
        "recipients",
        sa.Column("list_expansion", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    recipients = sa.table(
        "recipients",
        sa.column("state", sa.String),
        sa.column("diagnostic", sa.Text),
        sa.column("list_expansion", sa.Boolean),
    )
    op.execute(
        recipients.update()
        .where(recipients.c.state == "expanded", recipients.c.diagnostic == LIST_DIAGNOSTIC)
        .values(list_expansion=True)
    )


def downgrade() -> None:
    op.drop_column("recipients", "list_expansion")
