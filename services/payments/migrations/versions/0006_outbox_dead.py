"""payments: the runtime's outbox.dead_at/dead_error — rows Kafka refused for good.

Revision ID: 0006
"""

from alembic import op

from services.runtime.migrations import runtime_0003

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    runtime_0003(op)
