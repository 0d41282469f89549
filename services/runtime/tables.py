"""The runtime's tables, present in every service database (each service's first
migration creates them). They carry the processing rule: inbox (dedupe), consumer
positions, outbox, dead letters (which block an order key) and the blocked records behind them."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

inbox = Table(
    "inbox",
    metadata,
    Column("consumer_group", String(128), primary_key=True),
    Column("dedupe_key", String(200), primary_key=True),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_inbox_received_at", "received_at"),
)

consumer_positions = Table(
    "consumer_positions",
    metadata,
    Column("consumer_group", String(128), primary_key=True),
    Column("topic", String(249), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("next_offset", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("topic", String(249), nullable=False),
    Column("key", LargeBinary, nullable=True),
    Column("value", LargeBinary, nullable=False),
    Column("headers", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("sent_at", DateTime(timezone=True), nullable=True),
    #: set when Kafka refused the row for good (too large, say; the relay's ``dead``
    #: state): it is not sent again, and later rows of its key wait, until an operator
    #: runs ``paysaga outbox retry`` (which clears it); ``dead_error`` says why (the
    #: last refusal, kept after a retry)
    Column("dead_at", DateTime(timezone=True), nullable=True),
    Column("dead_error", Text, nullable=True),
    Index("ix_outbox_unsent", "id", postgresql_where=text("sent_at IS NULL")),
    Index("ix_outbox_sent_at", "sent_at"),
    Index("ix_outbox_dead", "key", "id", postgresql_where=text("dead_at IS NOT NULL")),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("consumer_group", String(128), nullable=False),
    Column("order_key", String(200), nullable=False),
    Column("topic", String(249), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("error_class", String(200), nullable=False),
    Column("error_message", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("first_failure_at", DateTime(timezone=True), nullable=False),
    #: the failed record's inbox key (None when it has none, e.g. invalid JSON): entered
    #: into the inbox when the dead letter is resolved, so a later copy is a duplicate
    Column("dedupe_key", String(200), nullable=True),
    Column("dead_lettered_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    #: set when the dead letter was replayed successfully or purged; the key is unblocked
    Column("resolved_at", DateTime(timezone=True), nullable=True),
    Column("resolution", String(32), nullable=True),
    Index(
        "ix_dead_letters_open",
        "consumer_group",
        "order_key",
        postgresql_where=text("resolved_at IS NULL"),
    ),
)

#: records of a key blocked by a dead letter, stored until it is replayed or purged
#: (the table keeps its first name)
blocked_records = Table(
    "parked",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("consumer_group", String(128), nullable=False),
    Column("order_key", String(200), nullable=False),
    Column("topic", String(249), nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("key", LargeBinary, nullable=True),
    Column("value", LargeBinary, nullable=False),
    Column("headers", JSONB, nullable=False),
    Column("timestamp_ms", BigInteger, nullable=False),
    Column("parked_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_parked_key", "consumer_group", "order_key", "id"),
)
