"""payments: unmatched_payments.refund_key / refund_requested_at — an operator's void or
refund is recorded (state ``refund_pending``, out of automatic matching) before the
gateway is called, so a lost answer can be settled by a look-up and never sent twice.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("unmatched_payments", sa.Column("refund_key", sa.Text(), nullable=True))
    op.add_column(
        "unmatched_payments",
        sa.Column("refund_requested_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("unmatched_payments", "refund_requested_at")
    op.drop_column("unmatched_payments", "refund_key")
