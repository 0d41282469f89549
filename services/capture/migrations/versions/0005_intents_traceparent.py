"""capture: captures.traceparent — the span that recorded the intent (its trace goes on).

Revision ID: 0005
"""

from alembic import op

from services.runtime.migrations import intents_traceparent

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    intents_traceparent(op, "captures")


def downgrade() -> None:
    op.drop_column("captures", "traceparent")
