"""A revision counter that every write a view shows moves on (``RunStore.revision``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07

Adds ``store_revision``: one row (id 1) whose ``counter`` each write transaction adds one to before it commits,
so a view cached on it sees every change (metrics added to an existing evaluation included), not only new rows.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "store_revision",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("counter", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_store_revision"),
    )
    op.bulk_insert(table, [{"id": 1, "counter": 0}])


def downgrade() -> None:
    op.drop_table("store_revision")
