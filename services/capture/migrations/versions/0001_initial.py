"""capture: initial tables (the runtime's and the service's own, as first released).

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from services.runtime.migrations import runtime_0001

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    runtime_0001(op)
    op.create_table(
        "captures",
        sa.Column("transaction_id", sa.Text(), nullable=False),
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
        sa.Column("authorized_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("capture_id", sa.Text(), nullable=True),
        sa.Column("outcome_reason", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'in_flight', 'unknown', 'captured', 'declined', 'expired', 'failed', 'sale_confirmed')",
            name="ck_captures_state",
        ),
        sa.PrimaryKeyConstraint("transaction_id"),
        sa.UniqueConstraint("idempotency_key"),
    )
    op.create_index(
        "ix_captures_due",
        "captures",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("state IN ('pending', 'unknown')"),
    )
    op.create_index(
        "ix_captures_leased",
        "captures",
        ["lease_until"],
        unique=False,
        postgresql_where=sa.text("state = 'in_flight'"),
    )
    op.create_index(op.f("ix_captures_order_id"), "captures", ["order_id"], unique=False)
