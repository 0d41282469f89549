"""Frozen DDL of the runtime's tables (inbox, consumer positions, outbox, dead letters,
blocked records) as first released. Every service database has them: each service's
first migration calls ``runtime_0001``. A later change to ``services/runtime/tables.py``
is a new function here (``runtime_0002``) called by a new migration of every service;
the migration tests fail until the migrated schema equals the models again.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


def runtime_0001(op: Any) -> None:
    op.create_table(
        "consumer_positions",
        sa.Column("consumer_group", sa.String(length=128), nullable=False),
        sa.Column("topic", sa.String(length=249), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("next_offset", sa.BigInteger(), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("consumer_group", "topic", "partition"),
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("consumer_group", sa.String(length=128), nullable=False),
        sa.Column("order_key", sa.String(length=200), nullable=False),
        sa.Column("topic", sa.String(length=249), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("error_class", sa.String(length=200), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("first_failure_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "dead_lettered_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolution", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_dead_letters_open",
        "dead_letters",
        ["consumer_group", "order_key"],
        unique=False,
        postgresql_where=sa.text("resolved_at IS NULL"),
    )
    op.create_table(
        "inbox",
        sa.Column("consumer_group", sa.String(length=128), nullable=False),
        sa.Column("dedupe_key", sa.String(length=200), nullable=False),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("consumer_group", "dedupe_key"),
    )
    op.create_index("ix_inbox_received_at", "inbox", ["received_at"], unique=False)
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("topic", sa.String(length=249), nullable=False),
        sa.Column("key", sa.LargeBinary(), nullable=True),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column(
            "headers", postgresql.JSONB(), server_default=sa.text("'[]'::jsonb"), nullable=False
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_outbox_sent_at", "outbox", ["sent_at"], unique=False)
    op.create_index(
        "ix_outbox_unsent",
        "outbox",
        ["id"],
        unique=False,
        postgresql_where=sa.text("sent_at IS NULL"),
    )
    op.create_table(
        "parked",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("consumer_group", sa.String(length=128), nullable=False),
        sa.Column("order_key", sa.String(length=200), nullable=False),
        sa.Column("topic", sa.String(length=249), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("key", sa.LargeBinary(), nullable=True),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("headers", postgresql.JSONB(), nullable=False),
        sa.Column("timestamp_ms", sa.BigInteger(), nullable=False),
        sa.Column(
            "parked_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_parked_key", "parked", ["consumer_group", "order_key", "id"], unique=False)


def runtime_0002(op: Any) -> None:
    """``dead_letters.dedupe_key``: the dead-lettered record's inbox key, written to the
    inbox when the dead letter is resolved, so no other copy of it is applied later."""
    op.add_column("dead_letters", sa.Column("dedupe_key", sa.String(length=200), nullable=True))


def runtime_0003(op: Any) -> None:
    """``outbox.dead_at``/``dead_error``: a row Kafka refused for good, set aside by the
    relay (not deleted) until an operator retries it; its key's later rows wait."""
    op.add_column("outbox", sa.Column("dead_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("outbox", sa.Column("dead_error", sa.Text(), nullable=True))
    op.create_index(
        "ix_outbox_dead",
        "outbox",
        ["key", "id"],
        unique=False,
        postgresql_where=sa.text("dead_at IS NOT NULL"),
    )


def intents_traceparent(op: Any, table: str) -> None:
    """``<intent table>.traceparent``: the span that recorded the intent, continued by
    its rounds and its event (``services.runtime.intents``)."""
    op.add_column(table, sa.Column("traceparent", sa.String(length=55), nullable=True))
