"""payments: orders.earlier_intents — the payment intents of an order's earlier attempts
(a confirmation for one of them is rejected; one for an intent the order has not seen
yet is parked until a retry brings it).

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "orders",
        sa.Column("earlier_intents", postgresql.JSONB(), server_default="[]", nullable=False),
    )
