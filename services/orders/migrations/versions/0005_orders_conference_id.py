"""orders: orders.conference_id — the checkout's conference (OrderRegistered), for the
operator console's filter; null for orders registered before it and orders without one.

Revision ID: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("orders", sa.Column("conference_id", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("orders", "conference_id")
