"""inventory: initial tables (the runtime's and the service's own, as first released).

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
        "reservations",
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("transaction_id", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("lines", postgresql.JSONB(), nullable=False),
        sa.Column("short_skus", postgresql.JSONB(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('reserved', 'failed', 'released', 'committed')", name="ck_reservations_state"
        ),
        sa.PrimaryKeyConstraint("order_id", "attempt", name="pk_reservations"),
    )
    op.create_table(
        "stock",
        sa.Column("sku", sa.String(length=64), nullable=False),
        sa.Column("available", sa.BigInteger(), nullable=False),
        sa.Column("reserved", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("sold", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("available >= 0", name="ck_stock_available_non_negative"),
        sa.CheckConstraint("reserved + sold <= available", name="ck_stock_within_available"),
        sa.CheckConstraint("reserved >= 0", name="ck_stock_reserved_non_negative"),
        sa.CheckConstraint("sold >= 0", name="ck_stock_sold_non_negative"),
        sa.PrimaryKeyConstraint("sku"),
    )
