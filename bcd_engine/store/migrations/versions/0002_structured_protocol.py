"""A run's protocol as data: kind, fold, folds and held-out dataset instead of one display string.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Existing rows are converted by the rules the code used to recognise protocols before this revision
(the Compare page's ``", fold k/K"`` pattern and ``"leave-one-dataset-out"`` prefix), so every string
bcd ever wrote becomes a protocol whose label is that same string:

- ``"<k>-fold CV (group-aware, stratified), fold <i>/<k>"`` -> kfold, fold i, folds k;
- ``"leave-one-dataset-out, held out <name>"`` -> lodo, held out name (any length: it is Text now);
- anything else -> holdout, which is what ``train`` does without an explicit split. Only runs created
  through the API with a protocol text of their own end up here with a new label; each one is
  logged as a warning with its id and old text.

Parsing protocol strings is allowed here and nowhere else. The labels are written out below rather
than imported, so that this revision keeps doing what it did when the code changes.

It also gives the CHECK constraints of ``runs`` and ``split_assignments`` the names the models give
them (``ck_runs_status``, ``ck_split_assignments_subset``): revision 0001 had them run through the
naming convention twice (``ck_runs_ck_runs_status``).

SQLite rebuilds the tables (batch mode). That copies ``runs`` and drops the original, which with
foreign keys on would cascade-delete every epoch, split, evaluation and artifact; the store turns
them off while it migrates, and this revision refuses to run on SQLite with them on.
"""

from __future__ import annotations

import logging
import re

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

KINDS = ("holdout", "kfold", "lodo", "external")
STATUSES = ("queued", "running", "completed", "failed", "cancelled", "interrupted")
SUBSET_CHECK = "subset IN ('train', 'val', 'test') OR subset LIKE 'fold%'"
HOLDOUT = "holdout (group-aware, stratified)"
KFOLD = re.compile(r".+, fold (?P<fold>\d+)/(?P<folds>\d+)")
LODO = "leave-one-dataset-out"

_log = logging.getLogger("bcd_engine.store.migrations")

_runs = sa.table(
    "runs",
    sa.column("id", sa.Integer()),
    sa.column("protocol", sa.String(64)),
    sa.column("protocol_kind", sa.String(16)),
    sa.column("protocol_fold", sa.Integer()),
    sa.column("protocol_folds", sa.Integer()),
    sa.column("protocol_held_out", sa.Text()),
)


def _parse(text: str) -> dict:
    """The structured protocol of an old protocol string: kind, fold, folds, held_out."""
    kfold = KFOLD.fullmatch(text)
    if kfold and int(kfold["folds"]) >= 2 and 1 <= int(kfold["fold"]) <= int(kfold["folds"]):
        return {"kind": "kfold", "fold": int(kfold["fold"]), "folds": int(kfold["folds"]), "held_out": None}
    if text.startswith(LODO):
        return {"kind": "lodo", "fold": None, "folds": None, "held_out": text.partition(", held out ")[2] or None}
    return {"kind": "holdout", "fold": None, "folds": None, "held_out": None}


def _label(kind: str, fold: int | None, folds: int | None, held_out: str | None) -> str:
    """The display string of a structured protocol (as ``Protocol.label`` gave it at this revision)."""
    if kind == "kfold":
        label = f"{folds}-fold CV (group-aware, stratified)"
        return label if fold is None else f"{label}, fold {fold}/{folds}"
    if kind == "lodo":
        return LODO if held_out is None else f"{LODO}, held out {held_out}"
    return {"holdout": HOLDOUT, "external": "external test set"}[kind]


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def _rename_check(batch, table: str, column: str, name: str, sqltext: str) -> None:
    """Give the CHECK constraint of ``table`` on ``column`` (whatever it is called now) the name ``name``."""
    for check in sa.inspect(op.get_bind()).get_check_constraints(table):
        if check["name"] != name and column in check["sqltext"]:
            batch.drop_constraint(op.f(check["name"]), type_="check")
            batch.create_check_constraint(op.f(name), sqltext)


def _refuse_sqlite_foreign_keys() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite" and bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
        raise RuntimeError(
            "revision 0002 rebuilds the runs table; on SQLite run it with foreign keys off "
            "(PRAGMA foreign_keys = OFF before the transaction), or the rebuild deletes every row that refers to a run"
        )


def upgrade() -> None:
    _refuse_sqlite_foreign_keys()
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("protocol_kind", sa.String(16), nullable=True))
        batch.add_column(sa.Column("protocol_fold", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("protocol_folds", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("protocol_held_out", sa.Text(), nullable=True))
    bind = op.get_bind()
    rows = bind.execute(sa.select(_runs.c.id, _runs.c.protocol)).all()
    values = [{"run_id": run_id, **_parse(text)} for run_id, text in rows]
    if values:
        bind.execute(
            _runs.update()
            .where(_runs.c.id == sa.bindparam("run_id"))
            .values(
                protocol_kind=sa.bindparam("kind"),
                protocol_fold=sa.bindparam("fold"),
                protocol_folds=sa.bindparam("folds"),
                protocol_held_out=sa.bindparam("held_out"),
            ),
            values,
        )
    for (run_id, text), new in zip(rows, values, strict=True):
        label = _label(new["kind"], new["fold"], new["folds"], new["held_out"])
        if label != text:
            _log.warning("run %s: protocol %r is not one bcd wrote; it is now %r", run_id, text, label)
    with op.batch_alter_table("runs") as batch:
        batch.alter_column("protocol_kind", existing_type=sa.String(16), nullable=False)
        batch.create_check_constraint(op.f("ck_runs_protocol_kind"), _one_of("protocol_kind", KINDS))
        batch.drop_column("protocol")
        _rename_check(batch, "runs", "status", "ck_runs_status", _one_of("status", STATUSES))
    with op.batch_alter_table("split_assignments") as batch:
        _rename_check(batch, "split_assignments", "subset", "ck_split_assignments_subset", SUBSET_CHECK)


def downgrade() -> None:
    """Back to one protocol string (longer than 64 characters: refused by PostgreSQL, as 0001's column
    would); the CHECK constraints keep their corrected names."""
    _refuse_sqlite_foreign_keys()
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("protocol", sa.String(64), nullable=True))
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(
            _runs.c.id, _runs.c.protocol_kind, _runs.c.protocol_fold, _runs.c.protocol_folds, _runs.c.protocol_held_out
        )
    ).all()
    if rows:
        bind.execute(
            _runs.update().where(_runs.c.id == sa.bindparam("run_id")).values(protocol=sa.bindparam("text")),
            [{"run_id": row[0], "text": _label(*row[1:])} for row in rows],
        )
    with op.batch_alter_table("runs") as batch:
        batch.alter_column("protocol", existing_type=sa.String(64), nullable=False)
        batch.drop_constraint(op.f("ck_runs_protocol_kind"), type_="check")
        batch.drop_column("protocol_held_out")
        batch.drop_column("protocol_folds")
        batch.drop_column("protocol_fold")
        batch.drop_column("protocol_kind")
