"""refunds: the runtime's outbox.dead_at/dead_error — rows Kafka refused for good.

Revision ID: 0004
"""

from alembic import op

from services.runtime.migrations import runtime_0003

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    runtime_0003(op)
