"""payments: payment requests (docs/contract.md §3.7) — the payment_requests intent table, and
orders.payment_intent_id nullable while an attempt's payment is being requested.

Revision ID: 0005
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.alter_column("orders", "payment_intent_id", existing_type=sa.String(64), nullable=True)
    op.create_table(
        "payment_requests",
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("context", postgresql.JSONB(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claim_token", sa.String(length=32), nullable=True),
        sa.Column("cause_event_id", sa.String(length=64), nullable=False),
        sa.Column("cause_saga_seq", sa.Integer(), nullable=True),
        sa.Column("correlation_id", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payment_method", sa.String(length=32), nullable=False),
        sa.Column("payment_intent_id", sa.String(length=64), nullable=True),
        sa.Column("expires_at", sa.Text(), nullable=True),
        sa.Column("outcome_reason", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'in_flight', 'unknown', 'requested', 'refused', 'failed')",
            name="ck_payment_requests_state",
        ),
        sa.PrimaryKeyConstraint("order_id", "attempt"),
        sa.UniqueConstraint("idempotency_key"),
    )
    op.create_index(
        "ix_payment_requests_due",
        "payment_requests",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("state IN ('pending', 'unknown')"),
    )
    op.create_index(
        "ix_payment_requests_leased",
        "payment_requests",
        ["lease_until"],
        unique=False,
        postgresql_where=sa.text("state = 'in_flight'"),
    )
    op.create_index(
        op.f("ix_payment_requests_order_id"), "payment_requests", ["order_id"], unique=False
    )
