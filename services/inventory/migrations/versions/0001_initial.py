"""inventory: initial tables.

Revision ID: 0001
"""

from alembic import op

from services.inventory import store
from services.runtime.migrate import create_initial

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_initial(op, store.metadata)
