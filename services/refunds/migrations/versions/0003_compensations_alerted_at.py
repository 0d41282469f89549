"""refunds: compensations.alerted_at — the alarm (CompensationFailed) raised for a row
that is still looked up after its rounds were spent with the outcome unknown.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "compensations", sa.Column("alerted_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("compensations", "alerted_at")
