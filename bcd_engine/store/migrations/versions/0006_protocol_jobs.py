"""Protocol jobs (k-fold CV, leave-one-dataset-out, classical baseline, robustness) queued for the worker.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

Adds ``jobs``: one row per protocol queued from the dashboard, with its kind, its parameters (JSON), the status a
run has (queued, running, completed, failed, cancelled, interrupted), who runs it, a cancel flag, and its result
(the protocol's JSON) or error. The runs a job trains are ordinary rows of ``runs``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_KINDS = "kind IN ('cv', 'lodo', 'baseline', 'robustness')"
_STATUSES = "status IN ('queued', 'running', 'completed', 'failed', 'cancelled', 'interrupted')"


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("worker_id", sa.String(255), nullable=True),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.CheckConstraint(_KINDS, name="ck_jobs_kind"),
        sa.CheckConstraint(_STATUSES, name="ck_jobs_status"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_status_created_at", "jobs", ["status", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_created_at", table_name="jobs")
    op.drop_table("jobs")
