"""A running run says which phase it is in and how far that phase has come.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07

Adds ``runs.progress_phase`` (e.g. "features (train views)"), ``progress_done`` of ``progress_total``
``progress_unit``\\ s (total 0: a phase that is not counted), and when the phase started and was last reported,
so a page shows every phase (scanning, loading, feature extraction, epochs, evaluation, saving) with its rate and
time left. Old runs have none (NULL).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("progress_phase", sa.String(80)),
    ("progress_done", sa.Integer()),
    ("progress_total", sa.Integer()),
    ("progress_unit", sa.String(16)),
    ("progress_started_at", sa.DateTime(timezone=True)),
    ("progress_updated_at", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    for name, type_ in _COLUMNS:
        op.add_column("runs", sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        for name, _ in reversed(_COLUMNS):
            batch.drop_column(name)
