"""payments: payment_requests.traceparent — the span that recorded the intent (its trace goes on).

Revision ID: 0007
"""

from alembic import op

from services.runtime.migrations import intents_traceparent

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    intents_traceparent(op, "payment_requests")


def downgrade() -> None:
    op.drop_column("payment_requests", "traceparent")
