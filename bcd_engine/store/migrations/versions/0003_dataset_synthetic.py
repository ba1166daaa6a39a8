"""A dataset knows whether it is SYNTHETIC, and every run names its dataset in ``runs.dataset_id``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

Adds ``datasets.synthetic`` (false unless set). Until now only runs that ``train`` created itself had a
``dataset_id``; queued, rerun and Ray runs kept their dataset in the config (``"dataset"`` once trained,
``"data_dir"`` always). Existing rows are filled in from there: a run without a dataset gets the dataset
registered under its ``data_dir`` (when there is one), and a dataset is synthetic when a run trained on it
recorded so. Config keys are read here, as they were written then, rather than through the code.
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_runs = sa.table(
    "runs", sa.column("id", sa.Integer()), sa.column("config", sa.JSON()), sa.column("dataset_id", sa.Integer())
)
_datasets = sa.table(
    "datasets", sa.column("id", sa.Integer()), sa.column("root", sa.Text()), sa.column("synthetic", sa.Boolean())
)


def upgrade() -> None:
    op.add_column("datasets", sa.Column("synthetic", sa.Boolean(), nullable=False, server_default=sa.false()))
    conn = op.get_bind()
    by_root = {root: dataset_id for dataset_id, root in conn.execute(sa.select(_datasets.c.id, _datasets.c.root))}
    synthetic: set[int] = set()
    for run_id, config, dataset_id in conn.execute(sa.select(_runs.c.id, _runs.c.config, _runs.c.dataset_id)):
        config = json.loads(config) if isinstance(config, str) else (config or {})
        if dataset_id is None and config.get("data_dir") in by_root:
            dataset_id = by_root[config["data_dir"]]
            conn.execute(sa.update(_runs).where(_runs.c.id == run_id).values(dataset_id=dataset_id))
        if dataset_id is not None and (config.get("dataset") or {}).get("synthetic"):
            synthetic.add(dataset_id)
    if synthetic:
        conn.execute(sa.update(_datasets).where(_datasets.c.id.in_(synthetic)).values(synthetic=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("synthetic")
