"""payments: unmatched_payments indexed by payment intent in every state — opening an
attempt reads the intent's parked payments and the ones an operator gave back; the
second read scanned the whole table, which only grows.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_unmatched_intent", table_name="unmatched_payments")
    op.create_index("ix_unmatched_intent", "unmatched_payments", ["payment_intent_id"])


def downgrade() -> None:
    op.drop_index("ix_unmatched_intent", table_name="unmatched_payments")
    op.create_index(
        "ix_unmatched_intent",
        "unmatched_payments",
        ["payment_intent_id"],
        postgresql_where="state = 'parked'",
    )
