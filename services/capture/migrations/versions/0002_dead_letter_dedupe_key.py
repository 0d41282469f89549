"""capture: the runtime's dead_letters.dedupe_key.

Revision ID: 0002
"""

from alembic import op

from services.runtime.migrations import runtime_0002

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    runtime_0002(op)
