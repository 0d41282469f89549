"""orders: orders.payment_intent_id nullable — unknown while paysaga requests the
attempt's payment from the gateway (docs/contract.md §3.7).

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.alter_column("orders", "payment_intent_id", existing_type=sa.String(64), nullable=True)
