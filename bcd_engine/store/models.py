"""ORM tables of the run store (SQLAlchemy 2.0 style).

The schema itself is created and changed only by the Alembic revisions in ``migrations/versions``;
these classes must stay in step with them (``tests/test_store.py`` checks that they do).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, composite, mapped_column, relationship

from bcd_engine.errors import RecordError
from bcd_engine.store.records import PROTOCOL_KINDS, Protocol

RUN_STATUSES = ("queued", "running", "completed", "failed", "cancelled", "interrupted")
FINAL_STATUSES = ("completed", "failed", "cancelled", "interrupted")

NAMING_CONVENTION = {
    "pk": "pk_%(table_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
}


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise RecordError(f"naive datetime {value!r}: the run store keeps timezone-aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


_CASCADE = {"ondelete": "CASCADE"}


class SqlDataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    root: Mapped[str] = mapped_column(Text, unique=True)
    n_images: Mapped[int] = mapped_column(Integer)
    class_counts: Mapped[dict[str, Any]]
    synthetic: Mapped[bool] = mapped_column(default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SqlRun(Base):
    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint(_one_of("status", RUN_STATUSES), name="status"),
        CheckConstraint(_one_of("protocol_kind", PROTOCOL_KINDS), name="protocol_kind"),
        Index("ix_runs_status_created_at", "status", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    backbone: Mapped[str] = mapped_column(String(64))
    protocol_kind: Mapped[str] = mapped_column(String(16))
    protocol_fold: Mapped[int | None] = mapped_column(Integer)
    protocol_folds: Mapped[int | None] = mapped_column(Integer)
    protocol_held_out: Mapped[str | None] = mapped_column(Text)
    protocol: Mapped[Protocol] = composite("protocol_kind", "protocol_fold", "protocol_folds", "protocol_held_out")
    config: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    environment: Mapped[dict[str, Any] | None]
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    worker_id: Mapped[str | None] = mapped_column(String(255))
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    dataset: Mapped[SqlDataset | None] = relationship(lazy="joined")
    test_accuracy: Mapped[float | None] = mapped_column(Float)
    macro_auc: Mapped[float | None] = mapped_column(Float)
    progress_phase: Mapped[str | None] = mapped_column(String(80))
    progress_done: Mapped[int | None] = mapped_column(Integer)
    progress_total: Mapped[int | None] = mapped_column(Integer)
    progress_unit: Mapped[str | None] = mapped_column(String(16))
    progress_started_at: Mapped[datetime | None]
    progress_updated_at: Mapped[datetime | None]


class SqlEpoch(Base):
    __tablename__ = "epochs"
    __table_args__ = (UniqueConstraint("run_id", "phase", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", **_CASCADE))
    phase: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float)
    train_accuracy: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    val_accuracy: Mapped[float | None] = mapped_column(Float)
    learning_rate: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float | None] = mapped_column(Float)


class SqlSplitAssignment(Base):
    __tablename__ = "split_assignments"
    __table_args__ = (
        CheckConstraint("subset IN ('train', 'val', 'test') OR subset LIKE 'fold%'", name="subset"),
        Index("ix_split_assignments_run_id_subset", "run_id", "subset"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", **_CASCADE))
    path: Mapped[str] = mapped_column(Text)
    class_name: Mapped[str] = mapped_column(String(255))
    subset: Mapped[str] = mapped_column(String(32))
    group_id: Mapped[str | None] = mapped_column(String(255))


class SqlEvaluation(Base):
    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", **_CASCADE), index=True)
    name: Mapped[str] = mapped_column(String(64))
    data_dir: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    metrics: Mapped[dict[str, Any]]
    class_names: Mapped[list[Any]]
    confusion_matrix: Mapped[list[Any]]
    roc_auc: Mapped[dict[str, Any]]


class SqlRocPoint(Base):
    """One point of one class's one-vs-rest ROC curve; ``point_index`` keeps the curve's order."""

    __tablename__ = "roc_points"
    __table_args__ = (UniqueConstraint("evaluation_id", "class_name", "point_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.id", **_CASCADE))
    class_name: Mapped[str] = mapped_column(String(255))
    point_index: Mapped[int] = mapped_column(Integer)
    fpr: Mapped[float] = mapped_column(Float)
    tpr: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)


class SqlPrediction(Base):
    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.id", **_CASCADE), index=True)
    path: Mapped[str] = mapped_column(Text)
    true_class: Mapped[str] = mapped_column(String(255))
    predicted_class: Mapped[str] = mapped_column(String(255))
    probabilities: Mapped[list[Any]]


class SqlArtifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", **_CASCADE), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SqlStoreRevision(Base):
    """The store's one revision counter (row id 1): each write transaction adds one (``RunStore.revision``)."""

    __tablename__ = "store_revision"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    counter: Mapped[int] = mapped_column(BigInteger)
