"""SQLAlchemy Core tables of the tracking store: one row per message, per recipient, per event.

Timestamps are stored as BIGINT whole POSIX seconds, which are UTC by definition.
That is portable: SQLite has no date type (SQLAlchemy would store naive ISO text
there) while PostgreSQL would need ``timestamptz``; integers compare and index the
same on both, and RFC 3464/3886 dates carry no finer resolution anyway.

The migration in ``migrations/versions`` must build exactly these tables; a test
compares them with Alembic's autogenerate.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
    true,
)
from sqlalchemy.sql.elements import ColumnElement

from mtrkmta.tracking.interfaces import RecipientState

NAMING_CONVENTION = MappingProxyType(
    {
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# The SQL text of the check on recipients.state, shared with the migration's test.
STATE_CHECK = "state IN ({})".format(", ".join(f"'{s.value}'" for s in RecipientState))


def dsn_owed(recipients: Table) -> ColumnElement[bool]:
    """The recipients that still owe a DSN, exactly as ``ix_recipients_dsn_pending`` states it.

    SQLite uses a partial index only for a query whose WHERE contains the index's
    own condition term for term, so queries must use this very expression:
    ``dsn_pending = 1`` on SQLite and ``dsn_pending = true`` on PostgreSQL.
    """
    return recipients.c.dsn_pending == true()


@dataclass(frozen=True, slots=True)
class TrackingSchema:
    """The tracking tables, bound to their own MetaData."""

    metadata: MetaData
    messages: Table
    recipients: Table
    auth_failures: Table
    events: Table
    webhook_outbox: Table


def build_schema() -> TrackingSchema:
    """Build a fresh MetaData holding the tracking tables (no shared module state)."""
    metadata = MetaData(naming_convention=dict(NAMING_CONVENTION))
    messages = Table(
        "messages",
        metadata,
        Column("queue_id", String(64), primary_key=True),
        Column("node_id", String(64), nullable=False),
        Column("envid", String(255), nullable=True),  # xtext-decoded, case kept
        Column("certifier", LargeBinary(20), nullable=True),  # B, 16 or 20 octets; never A
        Column("sender", Text, nullable=False),  # "" for <>
        Column("arrival", BigInteger, nullable=False),
        Column("requested_timeout", BigInteger, nullable=True),  # MTRK timeout, seconds
        Column("expires_at", BigInteger, nullable=False),  # purge not before, unless queued
        Column("reporting_mta", String(255), nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("ret", String(8), nullable=True),
        Column("body", String(16), nullable=True),
        Column("smtputf8", Boolean, nullable=False),
        Column("auth", Text, nullable=True),
        Column("client_address", String(64), nullable=False),
        Column("client_port", Integer, nullable=False),
        Column("client_helo", Text, nullable=False),
        Column("client_protocol", String(16), nullable=False),
        Column("client_authenticated_as", Text, nullable=True),
        Column("client_listener", String(16), nullable=False),
        Column("held", Boolean, server_default=false(), nullable=False),  # out of the queue runs
        Column("hold_reason", Text, nullable=True),  # why held: the administrator, an error (0005)
        # Why the spool file was moved to spool/quarantine/ (damaged); NULL otherwise (0005).
        Column("quarantine_reason", Text, nullable=True),
        # The deliver-by-time (RFC 2852 §4), whole seconds rounded up; NULL without BY= (0009).
        Column("deliver_by", BigInteger, nullable=True),
        Index(None, "envid"),
        Index(None, "expires_at"),
    )
    recipients = Table(
        "recipients",
        metadata,
        Column(
            "queue_id",
            String(64),
            ForeignKey("messages.queue_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        Column("rcpt_index", Integer, primary_key=True),  # RCPT order, from 0
        Column("address", Text, nullable=False),  # as received
        Column("orcpt_type", String(32), nullable=True),
        Column("orcpt_address", Text, nullable=True),  # xtext-decoded
        Column("notify", String(32), nullable=True),  # "NEVER" or e.g. "SUCCESS,DELAY"
        Column("final_recipient", Text, nullable=False),
        Column("state", String(16), nullable=False),
        Column("action", String(16), nullable=True),
        Column("status", String(32), nullable=True),
        Column("remote_mta", Text, nullable=True),
        Column("diagnostic", Text, nullable=True),
        Column("last_attempt", BigInteger, nullable=True),
        Column("will_retry_until", BigInteger, nullable=True),
        Column("next_attempt", BigInteger, nullable=True),
        Column("attempts", Integer, nullable=False),
        Column("certifier_forwarded", Boolean, nullable=False),
        # A DSN is owed for this recipient's last outcome and not yet queued (0002).
        Column("dsn_pending", Boolean, server_default=false(), nullable=False),
        # The next hop advertised DSN and took the DSN duty with the message (0002).
        Column("dsn_passed", Boolean, server_default=false(), nullable=False),
        # The one "delayed" warning was sent (0002).
        Column("delay_warned", Boolean, server_default=false(), nullable=False),
        # Expanded by a mailing list: "delivered" in a DSN, RFC 3461 §5.2.7.1 (0006).
        Column("list_expansion", Boolean, server_default=false(), nullable=False),
        CheckConstraint(STATE_CHECK, name="state"),
        # Finds the recipients still in the queue (and, by queue_id, their messages).
        Index(None, "state", "queue_id"),
    )
    # The few recipients that owe a DSN, among the many kept for retention (0003).
    Index(
        "ix_recipients_dsn_pending",
        recipients.c.queue_id,
        sqlite_where=dsn_owed(recipients),
        postgresql_where=dsn_owed(recipients),
    )
    # Recent SMTP AUTH failures per client address, shared by every process on this
    # database (0004; mtrkmta.tracking.authfailures). Rows older than auth.failure_window go.
    auth_failures = Table(
        "auth_failures",
        metadata,
        Column("address", String(64), nullable=False),
        Column("failed_at", BigInteger, nullable=False),
        Index(None, "address", "failed_at"),
        Index(None, "failed_at"),
    )
    # What happened to each message and recipient, with its time (0007): written in the
    # transaction of the change it records, deleted with the message.
    events = Table(
        "events",
        metadata,
        # Orders the events of one second as they were recorded.
        Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
        Column(
            "queue_id",
            String(64),
            ForeignKey("messages.queue_id", ondelete="CASCADE"),
            nullable=False,
        ),
        Column("rcpt_index", Integer, nullable=True),  # NULL: the whole message
        Column("at", BigInteger, nullable=False),
        Column("kind", String(16), nullable=False),
        Column("detail", Text, nullable=False),  # a JSON object of bounded strings
        Index(None, "queue_id", "at", "id"),  # one message's events in time order
    )
    # Events still to be POSTed to a webhook (0008; mtrkmta.tracking.outbox): written in
    # the transaction of the events they carry, deleted once delivered or dropped. No
    # foreign key: an event outlives its message here (a deletion is an event too).
    webhook_outbox = Table(
        "webhook_outbox",
        metadata,
        Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
        Column("hook", String(64), nullable=False),  # [webhooks.NAME]
        Column("event_id", String(64), nullable=False),  # Mtrkmta-Event-Id
        Column("queue_id", String(64), nullable=False),
        Column("body", Text, nullable=False),  # the JSON sent
        Column("created", BigInteger, nullable=False),  # the event's time
        Column("due", BigInteger, nullable=False),  # not sent before
        Column("attempts", Integer, nullable=False),  # failed so far
        Column("lease_owner", String(320), nullable=True),  # NODE_ID/PID of the claimer
        Column("lease_until", BigInteger, nullable=True),  # claimed until then
        Index(None, "hook", "due"),
    )
    return TrackingSchema(
        metadata=metadata,
        messages=messages,
        recipients=recipients,
        auth_failures=auth_failures,
        events=events,
        webhook_outbox=webhook_outbox,
    )
