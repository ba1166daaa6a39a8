"""The run store: every training run, its epochs, split, evaluations and artifacts, in one database.

SQLite (the default, ``settings.database_url()``) and PostgreSQL are supported. Opening a store
brings the schema to the newest Alembic revision and marks runs whose process died as interrupted.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import fields
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import (
    Engine,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from bcd_engine import settings
from bcd_engine.errors import RunNotFoundError, StoreError
from bcd_engine.store.models import (
    FINAL_STATUSES,
    Artifact,
    Dataset,
    Epoch,
    Evaluation,
    Prediction,
    RocPoint,
    Run,
    SplitAssignment,
    utcnow,
)
from bcd_engine.store.records import (
    ArtifactRecord,
    DatasetRecord,
    EpochRecord,
    EvaluationRecord,
    PredictionRecord,
    RocCurve,
    RunRecord,
)

SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10
_PG_MIGRATION_LOCK_KEY = 0x62636431  # "bcd1": pg_advisory_xact_lock key held while migrating
_ALEMBIC_INI = Path(__file__).with_name("alembic.ini")
_SUBSET = re.compile(r"(train|val|test|fold\d+)")

_R = TypeVar("_R")


def normalize_url(url: str | URL) -> URL:
    """Parse ``url``; bare ``postgresql://`` / ``postgres://`` URLs get the psycopg 3 driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def mask_url(url: str | URL) -> str:
    """``url`` as text with its password replaced by ``***`` (also for URLs that do not parse)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(url))


def make_engine(url: URL) -> Engine:
    """An engine with the store's connection settings.

    SQLite: WAL journal, a busy timeout, foreign keys on, and BEGIN emitted by SQLAlchemy
    (``BEGIN IMMEDIATE`` for writes, so writers queue on the lock instead of failing).
    PostgreSQL: a connect timeout and pre-ping (dashboards hold engines for hours).
    JSON values are written with NaN/inf as null and numpy values as plain numbers.
    """
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, json_serializer=_dumps)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
    return create_engine(
        url, json_serializer=_dumps, pool_pre_ping=True, connect_args=connect_args
    )


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (_sqlite_on_begin)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # A deferred transaction that reads and then writes fails at once with "database is locked"
    # when another process wrote in between; taking the write lock up front waits instead.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("bcd_write") else "BEGIN")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_jsonable(value), default=str)


def _metric(value: Any) -> float | None:
    """A float for a metric column; NaN becomes None (SQLite cannot keep NaN, so neither do we)."""
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _one_line(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc
    message = re.sub(r"\(Background on this error at: \S+\)", "", str(cause))
    message = " ".join(message.split()) or type(cause).__name__
    return message if len(message) <= 300 else message[:297] + "..."


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _record(cls: type[_R], row: Any) -> _R:
    return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})  # type: ignore[arg-type]


@functools.cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(Config(str(_ALEMBIC_INI)))


class RunStore:
    """All persistent state of training runs, behind a small typed API.

    Methods open one short transaction each, are safe to call from several threads and processes,
    return frozen records (never ORM rows) and raise :class:`StoreError` for database problems.
    """

    def __init__(self, url: str | None = None) -> None:
        """Open (creating or upgrading if needed) the store at ``url`` or ``settings.database_url()``."""
        raw = url or settings.database_url()
        self._masked = mask_url(raw)
        try:
            sa_url = normalize_url(raw)
            if sa_url.get_backend_name() == "sqlite" and sa_url.database not in (None, "", ":memory:"):
                # Only the file's own folder is created: a typo higher up should fail, not build a tree.
                Path(sa_url.database).parent.mkdir(exist_ok=True)
            self._engine = make_engine(sa_url)
        except (ImportError, OSError, SQLAlchemyError) as exc:
            raise StoreError(f"cannot open the run store at {self._masked}: {_one_line(exc)}") from None
        self._write_engine = self._engine.execution_options(bcd_write=True)
        try:
            self._migrate()
        except (SQLAlchemyError, CommandError, OSError) as exc:
            self._engine.dispose()
            raise StoreError(f"cannot open the run store at {self._masked}: {_one_line(exc)}") from None
        except StoreError:
            self._engine.dispose()
            raise
        self.recover_interrupted()

    @classmethod
    def open(cls, url: str | None = None) -> RunStore:
        """The store at ``url`` made ready for a process entry point (CLI, worker, app start):
        schema upgraded to the newest revision, runs whose process died marked interrupted."""
        return cls(url)

    @property
    def url(self) -> str:
        """The database URL with its password masked."""
        return self._masked

    def __repr__(self) -> str:
        return f"RunStore({self._masked!r})"

    def close(self) -> None:
        """Close the store's pooled connections (the store can still be used; it reconnects)."""
        self._engine.dispose()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- schema -------------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Upgrade the schema to the newest revision; only a read when it is already there.

        The upgrade runs in one transaction that first takes a lock every other opener waits for
        (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an advisory lock), then checks the revision again.
        """
        script = _script()
        head = script.get_current_head()
        with self._engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
        if current == head:
            return
        if current is not None and current not in {r.revision for r in script.walk_revisions()}:
            raise StoreError(
                f"the run store at {self._masked} has schema revision {current!r}, newer than this "
                f"version of bcd knows (newest: {head!r}); upgrade bcd"
            )
        with self._write_engine.connect() as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK_KEY})
            if MigrationContext.configure(conn).get_current_revision() != head:
                config = Config(str(_ALEMBIC_INI))
                config.attributes["connection"] = conn
                command.upgrade(config, "head")

    # -- sessions -----------------------------------------------------------------------------

    @contextmanager
    def _session(self, *, write: bool = False) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back on any error.

        SQLAlchemy errors become :class:`StoreError` naming the (masked) URL.
        """
        session = Session(self._write_engine if write else self._engine, expire_on_commit=False)
        try:
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            raise StoreError(f"run store {self._masked}: {_one_line(exc)}") from exc
        finally:
            session.close()

    @staticmethod
    def _require_run(session: Session, run_id: int) -> Run:
        run = session.get(Run, run_id)
        if run is None:
            raise RunNotFoundError(f"no run with id {run_id} in the run store")
        return run

    # -- datasets -----------------------------------------------------------------------------

    def register_dataset(
        self, *, name: str, root: str | os.PathLike[str], n_images: int, class_counts: Mapping[str, int]
    ) -> int:
        """Record a dataset folder and return its id; a root seen before keeps its id, gets new counts."""
        root = str(root)
        counts = {str(k): int(v) for k, v in class_counts.items()}
        with self._session(write=True) as s:
            row = s.scalar(select(Dataset).where(Dataset.root == root))
            if row is None:
                try:
                    with s.begin_nested():  # PostgreSQL: another process may insert the same root
                        row = Dataset(name=name, root=root, n_images=n_images, class_counts=counts)
                        s.add(row)
                except IntegrityError:
                    row = s.scalars(select(Dataset).where(Dataset.root == root)).one()
            row.name, row.n_images, row.class_counts = name, int(n_images), counts
            s.flush()
            return row.id

    def list_datasets(self) -> list[DatasetRecord]:
        """Every registered dataset, by name."""
        with self._session() as s:
            rows = s.scalars(select(Dataset).order_by(Dataset.name, Dataset.id))
            return [_record(DatasetRecord, r) for r in rows]

    # -- run lifecycle ------------------------------------------------------------------------

    def create_run(
        self,
        *,
        backbone: str,
        protocol: str,
        config: Mapping[str, Any],
        dataset_id: int | None = None,
        status: str = "queued",
    ) -> int:
        """Record a new run (queued unless told otherwise) and return its id."""
        with self._session(write=True) as s:
            run = Run(
                backbone=backbone,
                protocol=protocol,
                config=dict(config),
                status=status,
                dataset_id=dataset_id,
                cancel_requested=False,
            )
            s.add(run)
            s.flush()
            return run.id

    @staticmethod
    def _running(environment: Mapping[str, Any] | None, worker_id: str | None) -> dict[str, Any]:
        now = utcnow()
        return {
            "status": "running",
            "started_at": now,
            "heartbeat_at": now,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "environment": None if environment is None else dict(environment),
            "worker_id": worker_id,
        }

    def start_run(
        self, run_id: int, *, environment: Mapping[str, Any], worker_id: str | None = None
    ) -> None:
        """Mark a run as running in this process (host, pid, environment, first heartbeat).

        The run must be queued, or already running without a process or in this one (created with
        ``status="running"``, or taken by :meth:`claim_next_queued` here); anything else (cancelled,
        finished, running elsewhere) raises :class:`StoreError`.
        """
        values = self._running(environment, worker_id)
        startable = or_(
            Run.status == "queued",
            and_(
                Run.status == "running",
                or_(Run.pid.is_(None), and_(Run.host == values["host"], Run.pid == values["pid"])),
            ),
        )
        with self._session(write=True) as s:
            result = s.execute(update(Run).where(Run.id == run_id, startable).values(**values))
            if result.rowcount == 0:
                run = self._require_run(s, run_id)
                where = f" (pid {run.pid} on {run.host})" if run.status == "running" else ""
                raise StoreError(f"run {run_id} is {run.status}{where}; it cannot be started here")

    def claim_next_queued(
        self, *, worker_id: str, environment: Mapping[str, Any] | None = None
    ) -> RunRecord | None:
        """Atomically take the oldest queued run and mark it running here; None when none is queued.

        Two workers never get the same run (PostgreSQL: ``FOR UPDATE SKIP LOCKED``; SQLite: the
        write lock; both: the update only applies while the run is still queued).
        """
        with self._session(write=True) as s:
            tried: list[int] = []
            while True:
                run_id = s.scalar(
                    select(Run.id)
                    .where(Run.status == "queued", Run.id.not_in(tried))
                    .order_by(Run.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                if run_id is None:
                    return None
                result = s.execute(
                    update(Run)
                    .where(Run.id == run_id, Run.status == "queued")
                    .values(**self._running(environment, worker_id))
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:
                    return _record(RunRecord, s.get_one(Run, run_id))
                tried.append(run_id)

    def update_run_config(self, run_id: int, config: Mapping[str, Any]) -> None:
        """Replace a run's config (training adds what it learns from the data, such as class names)."""
        with self._session(write=True) as s:
            if s.execute(update(Run).where(Run.id == run_id).values(config=dict(config))).rowcount == 0:
                raise RunNotFoundError(f"no run with id {run_id} in the run store")

    def heartbeat(self, run_id: int) -> None:
        """Note that the run's process is still alive."""
        with self._session(write=True) as s:
            if s.execute(update(Run).where(Run.id == run_id).values(heartbeat_at=utcnow())).rowcount == 0:
                raise RunNotFoundError(f"no run with id {run_id} in the run store")

    def request_cancel(self, run_id: int) -> None:
        """Ask for a run to stop: a queued run is cancelled at once, a running one is flagged.

        The training loop polls :meth:`is_cancel_requested`; finished runs are left as they are.
        """
        with self._session(write=True) as s:
            queued = s.execute(
                update(Run)
                .where(Run.id == run_id, Run.status == "queued")
                .values(status="cancelled", cancel_requested=True, finished_at=utcnow())
            )
            if queued.rowcount:
                return
            running = s.execute(
                update(Run).where(Run.id == run_id, Run.status == "running").values(cancel_requested=True)
            )
            if running.rowcount == 0:
                self._require_run(s, run_id)

    def is_cancel_requested(self, run_id: int) -> bool:
        """Whether someone asked this run to stop."""
        with self._session() as s:
            flag = s.scalar(select(Run.cancel_requested).where(Run.id == run_id))
            if flag is None:
                raise RunNotFoundError(f"no run with id {run_id} in the run store")
            return bool(flag)

    def log_epoch(
        self,
        run_id: int,
        *,
        phase: int,
        epoch: int,
        train_loss: float | None,
        train_accuracy: float | None,
        val_loss: float | None = None,
        val_accuracy: float | None = None,
        learning_rate: float | None = None,
        seconds: float | None = None,
    ) -> None:
        """Record one epoch's metrics (NaN is kept as None) and refresh the run's heartbeat."""
        with self._session(write=True) as s:
            if s.execute(update(Run).where(Run.id == run_id).values(heartbeat_at=utcnow())).rowcount == 0:
                raise RunNotFoundError(f"no run with id {run_id} in the run store")
            s.add(
                Epoch(
                    run_id=run_id,
                    phase=int(phase),
                    epoch=int(epoch),
                    train_loss=_metric(train_loss),
                    train_accuracy=_metric(train_accuracy),
                    val_loss=_metric(val_loss),
                    val_accuracy=_metric(val_accuracy),
                    learning_rate=_metric(learning_rate),
                    seconds=_metric(seconds),
                )
            )

    def finish_run(
        self,
        run_id: int,
        *,
        status: str,
        error: str | None = None,
        test_accuracy: float | None = None,
        macro_auc: float | None = None,
    ) -> None:
        """Close a run with a final status (completed/failed/cancelled/interrupted) and its headline metrics."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"finish_run needs one of {', '.join(FINAL_STATUSES)}, not {status!r}")
        with self._session(write=True) as s:
            run = self._require_run(s, run_id)
            now = utcnow()
            run.status = status
            run.finished_at = now
            run.seconds = (now - run.started_at).total_seconds() if run.started_at else None
            run.error = error
            run.test_accuracy = _metric(test_accuracy)
            run.macro_auc = _metric(macro_auc)

    def recover_interrupted(self, *, stale_after_s: float = 600) -> list[int]:
        """Mark dead 'running' runs as 'interrupted' and return their ids.

        A run is dead when it runs on this host under a pid that no longer exists, or when its
        heartbeat is older than ``stale_after_s`` (any host). Only reads when nothing is dead.
        """
        host = socket.gethostname()
        cutoff = utcnow() - timedelta(seconds=stale_after_s)
        last_sign = func.coalesce(Run.heartbeat_at, Run.started_at, Run.created_at)
        with self._session() as s:
            rows = s.execute(
                select(Run.id, Run.host, Run.pid, Run.started_at, last_sign.label("last_sign")).where(
                    Run.status == "running"
                )
            ).all()
        dead: list[tuple[Any, Any, str]] = []
        for row in rows:
            if row.host == host and row.pid is not None and not _pid_alive(row.pid):
                reason = f"interrupted: its process (pid {row.pid} on {host}) is gone"
                dead.append((row, Run.pid == row.pid, reason))
            elif row.last_sign < cutoff:
                reason = (
                    f"interrupted: no heartbeat since {row.last_sign:%Y-%m-%d %H:%M:%S} UTC "
                    f"(over {stale_after_s:g} s) from pid {row.pid} on {row.host}"
                )
                dead.append((row, last_sign < cutoff, reason))
        if not dead:
            return []
        recovered: list[int] = []
        with self._session(write=True) as s:
            for row, still_dead, reason in dead:
                now = utcnow()
                result = s.execute(
                    update(Run)
                    .where(Run.id == row.id, Run.status == "running", still_dead)
                    .values(
                        status="interrupted",
                        error=reason,
                        finished_at=now,
                        seconds=(now - row.started_at).total_seconds() if row.started_at else None,
                    )
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount:
                    recovered.append(row.id)
        return recovered

    # -- splits -------------------------------------------------------------------------------

    def save_split(self, run_id: int, assignments: Sequence[Mapping[str, Any]]) -> None:
        """Replace the run's split with ``assignments`` (path, class_name, subset, group_id), in one transaction.

        ``subset`` is train, val, test or a fold label such as fold0.
        """
        rows = []
        for a in assignments:
            if not _SUBSET.fullmatch(str(a["subset"])):
                raise ValueError(f"subset must be train, val, test or foldN, not {a['subset']!r}")
            group = a.get("group_id")
            rows.append(
                {
                    "run_id": run_id,
                    "path": str(a["path"]),
                    "class_name": str(a["class_name"]),
                    "subset": str(a["subset"]),
                    "group_id": None if group is None else str(group),
                }
            )
        with self._session(write=True) as s:
            self._require_run(s, run_id)
            s.execute(delete(SplitAssignment).where(SplitAssignment.run_id == run_id))
            if rows:
                s.execute(insert(SplitAssignment), rows)

    def get_split(self, run_id: int) -> list[dict[str, Any]]:
        """The run's split as dicts with path, class_name, subset and group_id, in saved order."""
        with self._session() as s:
            self._require_run(s, run_id)
            rows = s.scalars(
                select(SplitAssignment).where(SplitAssignment.run_id == run_id).order_by(SplitAssignment.id)
            )
            return [
                {"path": r.path, "class_name": r.class_name, "subset": r.subset, "group_id": r.group_id}
                for r in rows
            ]

    # -- evaluations --------------------------------------------------------------------------

    def save_evaluation(
        self,
        run_id: int,
        *,
        name: str,
        data_dir: str | os.PathLike[str] | None,
        metrics: Mapping[str, Any],
        class_names: Sequence[str],
        confusion_matrix: Sequence[Sequence[int]],
        roc: Mapping[str, Mapping[str, Any]],
        predictions: Sequence[Mapping[str, Any]],
    ) -> int:
        """Record an evaluation with its ROC curves and per-image predictions, all or nothing.

        ``roc`` maps a class to ``{"fpr": [...], "tpr": [...], "thresholds": [...], "auc": float}``;
        each prediction has path, true_class, predicted_class and probabilities (one per class).
        """
        with self._session(write=True) as s:
            self._require_run(s, run_id)
            evaluation = Evaluation(
                run_id=run_id,
                name=name,
                data_dir=None if data_dir is None else str(data_dir),
                metrics=dict(metrics),
                class_names=[str(c) for c in class_names],
                confusion_matrix=[[int(n) for n in row] for row in confusion_matrix],
                roc_auc={str(c): _metric(curve.get("auc")) for c, curve in roc.items()},
            )
            s.add(evaluation)
            s.flush()
            points = [
                {
                    "evaluation_id": evaluation.id,
                    "class_name": str(class_name),
                    "point_index": i,
                    "fpr": float(fpr),
                    "tpr": float(tpr),
                    "threshold": float(threshold),
                }
                for class_name, curve in roc.items()
                for i, (fpr, tpr, threshold) in enumerate(
                    zip(curve["fpr"], curve["tpr"], curve["thresholds"], strict=True)
                )
            ]
            if points:
                s.execute(insert(RocPoint), points)
            rows = [
                {
                    "evaluation_id": evaluation.id,
                    "path": str(p["path"]),
                    "true_class": str(p["true_class"]),
                    "predicted_class": str(p["predicted_class"]),
                    "probabilities": [float(x) for x in p["probabilities"]],
                }
                for p in predictions
            ]
            if rows:
                s.execute(insert(Prediction), rows)
            return evaluation.id

    def get_evaluations(self, run_id: int) -> list[EvaluationRecord]:
        """The run's evaluations, oldest first, with metrics, confusion matrix and ROC curves."""
        with self._session() as s:
            self._require_run(s, run_id)
            evaluations = list(
                s.scalars(select(Evaluation).where(Evaluation.run_id == run_id).order_by(Evaluation.id))
            )
            points: dict[tuple[int, str], list[RocPoint]] = {}
            for p in s.scalars(
                select(RocPoint)
                .where(RocPoint.evaluation_id.in_([e.id for e in evaluations]))
                .order_by(RocPoint.evaluation_id, RocPoint.class_name, RocPoint.point_index)
            ):
                points.setdefault((p.evaluation_id, p.class_name), []).append(p)
            records = []
            for e in evaluations:
                roc = {}
                for class_name, auc in e.roc_auc.items():
                    curve = points.get((e.id, class_name), [])
                    roc[class_name] = RocCurve(
                        fpr=[p.fpr for p in curve],
                        tpr=[p.tpr for p in curve],
                        thresholds=[p.threshold for p in curve],
                        auc=auc,
                    )
                records.append(
                    EvaluationRecord(
                        id=e.id,
                        run_id=e.run_id,
                        name=e.name,
                        data_dir=e.data_dir,
                        created_at=e.created_at,
                        metrics=e.metrics,
                        class_names=e.class_names,
                        confusion_matrix=e.confusion_matrix,
                        roc=roc,
                    )
                )
            return records

    def get_predictions(self, evaluation_id: int) -> list[PredictionRecord]:
        """The per-image predictions of one evaluation, in saved order."""
        with self._session() as s:
            if s.get(Evaluation, evaluation_id) is None:
                raise StoreError(f"no evaluation with id {evaluation_id} in the run store")
            rows = s.scalars(
                select(Prediction).where(Prediction.evaluation_id == evaluation_id).order_by(Prediction.id)
            )
            return [_record(PredictionRecord, r) for r in rows]

    # -- artifacts ----------------------------------------------------------------------------

    def save_artifact(
        self, run_id: int, *, kind: str, path: str | os.PathLike[str], sha256: str, size_bytes: int
    ) -> int:
        """Record a file the run produced and return the record's id."""
        with self._session(write=True) as s:
            self._require_run(s, run_id)
            artifact = Artifact(
                run_id=run_id, kind=kind, path=str(path), sha256=sha256, size_bytes=int(size_bytes)
            )
            s.add(artifact)
            s.flush()
            return artifact.id

    def get_artifacts(self, run_id: int) -> list[ArtifactRecord]:
        """The run's artifacts, oldest first."""
        with self._session() as s:
            self._require_run(s, run_id)
            rows = s.scalars(select(Artifact).where(Artifact.run_id == run_id).order_by(Artifact.id))
            return [_record(ArtifactRecord, r) for r in rows]

    # -- reading runs -------------------------------------------------------------------------

    def get_run(self, run_id: int) -> RunRecord:
        """One run; :class:`RunNotFoundError` for an unknown id."""
        with self._session() as s:
            return _record(RunRecord, self._require_run(s, run_id))

    def list_runs(self, *, status: str | None = None, limit: int | None = None) -> list[RunRecord]:
        """Runs, newest first, optionally only those with ``status`` and at most ``limit``."""
        query = select(Run).order_by(Run.created_at.desc(), Run.id.desc()).limit(limit)
        if status is not None:
            query = query.where(Run.status == status)
        with self._session() as s:
            return [_record(RunRecord, r) for r in s.scalars(query)]

    def get_epochs(self, run_id: int) -> list[EpochRecord]:
        """The run's epochs by phase and epoch."""
        with self._session() as s:
            self._require_run(s, run_id)
            rows = s.scalars(select(Epoch).where(Epoch.run_id == run_id).order_by(Epoch.phase, Epoch.epoch))
            return [_record(EpochRecord, r) for r in rows]

    def delete_run(self, run_id: int) -> None:
        """Delete a run and, through ON DELETE CASCADE, everything recorded about it."""
        with self._session(write=True) as s:
            if s.execute(delete(Run).where(Run.id == run_id)).rowcount == 0:
                raise RunNotFoundError(f"no run with id {run_id} in the run store")


__all__ = ["RunStore", "make_engine", "mask_url", "normalize_url"]
