"""The run API: every training run, its dataset, epochs, split, evaluations and artifacts, in one database.

``RunStore(url)`` only connects (it writes nothing and refuses a schema that is not this bcd's newest);
process entry points use ``RunStore.open(url)``, which creates or upgrades the schema and marks runs
whose process died as interrupted. How the database is reached and migrated is :mod:`bcd_engine.store.engine`'s.
A read-only store (see there) raises :class:`StoreError` on every write.
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
import typing
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Select, and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from bcd_engine import settings
from bcd_engine.errors import RecordError, RunNotFoundError, StoreError
from bcd_engine.processes import pid_alive
from bcd_engine.store.artifacts import sweep_temp_files
from bcd_engine.store.engine import (
    connect,
    is_transient,
    mask_url,
    one_line,
    require_newest_schema,
    upgrade_schema,
)
from bcd_engine.store.models import (
    FINAL_STATUSES,
    RUN_STATUSES,
    SqlArtifact,
    SqlDataset,
    SqlEpoch,
    SqlEvaluation,
    SqlPrediction,
    SqlRocPoint,
    SqlRun,
    SqlSplitAssignment,
    SqlStoreRevision,
    utcnow,
)
from bcd_engine.store.records import (
    TEST_EVALUATION,
    ArtifactRecord,
    DatasetRecord,
    EpochRecord,
    EvaluationRecord,
    PredictionRecord,
    Protocol,
    RocCurve,
    RunDataset,
    RunProgress,
    RunRecord,
    latest_evaluation,
)

_SUBSET = re.compile(r"(train|val|test|fold\d+)")

_R = TypeVar("_R")
TRANSIENT_RETRY_S = 10.0  # how long a call waits out a lost or refused database connection (RunStore._begin)


class ScoredEvaluation(typing.Protocol):
    """An evaluation as :func:`bcd_engine.evaluation.metrics.evaluate_probabilities` computes it."""

    class_names: list[str]
    metrics: dict[str, Any]
    confusion_matrix: list[list[int]]
    roc: dict[str, Any]
    predicted: Sequence[int]


@contextmanager
def _checked(what: str) -> Iterator[None]:
    """Turn the errors of reading the caller's ``what`` (a missing key, a wrong type or value) into RecordError."""
    try:
        yield
    except KeyError as exc:
        raise RecordError(f"{what}: missing {exc}") from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise RecordError(f"{what}: {exc}") from None


def _metric(value: Any) -> float | None:
    """A float for a metric column; NaN becomes None (SQLite cannot keep NaN, so neither do we)."""
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _require_status(status: str, allowed: Sequence[str], *, what: str = "status must be") -> None:
    if status not in allowed:
        raise RecordError(f"{what} one of {', '.join(allowed)}, not {status!r}")


def _record(cls: type[_R], row: Any) -> _R:
    return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})  # type: ignore[arg-type]


def _with_status(query: Select, status: str | None) -> Select:
    """``query`` over runs kept to those with ``status`` (a known status; all runs when None)."""
    if status is None:
        return query
    _require_status(status, RUN_STATUSES)
    return query.where(SqlRun.status == status)


def _run_record(run: SqlRun) -> RunRecord:
    """The record of ``run`` with the dataset it was trained on (``run.dataset`` loaded with it)."""
    values = {f.name: getattr(run, f.name) for f in fields(RunRecord) if f.name != "dataset"}
    return RunRecord(**values, dataset=_run_dataset(run))


def _run_dataset(run: SqlRun) -> RunDataset:
    """The run's registered dataset; for an old run without one, what its config says (the dataset summary
    training recorded, or else the name of its data folder)."""
    if run.dataset is not None:
        return RunDataset(name=run.dataset.name, n_images=run.dataset.n_images, synthetic=run.dataset.synthetic)
    recorded = run.config.get("dataset")
    if recorded:
        return RunDataset(name=recorded["name"], n_images=recorded["n_images"], synthetic=bool(recorded["synthetic"]))
    return RunDataset(name=Path(run.config.get("data_dir") or "").name or "unknown", n_images=None, synthetic=False)


class RunStore:
    """All persistent state of training runs, behind a small typed API.

    Methods open one short transaction each, are safe to call from several threads and processes,
    return frozen records (never ORM rows) and raise :class:`StoreError` for database problems.
    """

    def __init__(self, url: str | None = None) -> None:
        """Connect to the store at ``url`` or ``settings.database_url()``; this writes nothing.

        The schema must be this bcd's newest: a missing database, an empty one or an older schema
        raises :class:`StoreError` saying to open it once with :meth:`open` (which any
        ``python -m bcd_engine`` command does); so does one newer than this bcd knows.
        """
        self._connect(url, create=False)
        try:
            require_newest_schema(self._engines, self._masked)
        except BaseException:
            self._engines.reader.dispose()
            raise

    @classmethod
    def open(cls, url: str | None = None) -> RunStore:
        """The store at ``url`` made ready for a process entry point (CLI, worker, app start).

        Creates the SQLite file (and its own folder, not the ones above it) if needed, brings the
        schema to the newest revision, marks runs whose process died as interrupted
        (:meth:`recover_interrupted`) and removes the temporary files killed saves left in the run
        folders (:func:`~bcd_engine.store.artifacts.sweep_temp_files`). Safe to call from several
        processes at once. A read-only store is only checked, like ``RunStore(url)`` does.
        """
        store = cls.__new__(cls)
        store._connect(url, create=True)
        try:
            if store.read_only:
                require_newest_schema(store._engines, store._masked)
            else:
                upgrade_schema(store._engines, store._masked)
                store.recover_interrupted()
                sweep_temp_files()
        except BaseException:
            store._engines.reader.dispose()
            raise
        return store

    def _connect(self, url: str | None, *, create: bool) -> None:
        """Make the engines for ``url``; a SQLite file must exist unless ``create``. Nothing is read yet."""
        raw = url or settings.database_url()
        self._masked = mask_url(raw)
        self._engines = connect(raw, self._masked, create=create)
        self.read_only = self._engines.read_only
        self._file_identity: tuple[int, int] | None = None  # the (device, inode) a SQLite file had when first seen

    @property
    def url(self) -> str:
        """The database URL with its password masked."""
        return self._masked

    def __repr__(self) -> str:
        return f"RunStore({self._masked!r})"

    def close(self) -> None:
        """Close the store's pooled connections (the store can still be used; it reconnects)."""
        self._engines.reader.dispose()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- sessions -----------------------------------------------------------------------------

    @contextmanager
    def _session(self, *, write: bool = False, revises: bool = True) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back on any error.

        A write transaction adds one to the store's revision counter as its last statement (so the row lock
        it takes on PostgreSQL is held only until the commit), unless ``revises`` is False: a write no view
        shows, such as a heartbeat.

        SQLAlchemy errors become :class:`StoreError` naming the (masked) URL: :class:`RecordError`
        when the database refused the values (a constraint), or a column type did (a naive time).
        The connection is taken first, by :meth:`_begin`, which waits out a database server's restart.
        """
        if write and self.read_only:
            raise StoreError(f"the run store at {self._masked} is read-only; nothing can be saved to it")
        self._check_file()
        session = Session(self._engines.writer if write else self._engines.reader, expire_on_commit=False)
        try:
            self._begin(session)
            yield session
            if write and revises:
                counter = SqlStoreRevision.counter
                session.execute(update(SqlStoreRevision).where(SqlStoreRevision.id == 1).values(counter=counter + 1))
            session.commit()
        except SQLAlchemyError as exc:
            if isinstance(getattr(exc, "orig", None), RecordError):
                raise exc.orig from None
            error = RecordError if isinstance(exc, IntegrityError) else StoreError
            raise error(f"run store {self._masked}: {one_line(exc)}") from exc
        finally:
            session.close()

    @staticmethod
    def _begin(session: Session) -> None:
        """Take the session's connection and begin its transaction, trying again on a transient failure.

        A lost or refused connection (:func:`~bcd_engine.store.engine.is_transient`: the server restarting,
        connection refused or reset, closed by the server) is tried again with growing pauses for up to
        TRANSIENT_RETRY_S seconds, so a PostgreSQL restart of a few seconds costs a training run a wait, not the
        run (its heartbeat, epochs, cancel checks, finish and saves all come through here). Only taking the
        connection is retried: pooled connections are pinged first, so a restart between calls is met here; a
        connection lost inside a transaction fails that call (the block cannot safely be run twice). SQLite's
        errors, "database is locked" past its busy timeout included, are never retried.
        """
        deadline = time.monotonic() + TRANSIENT_RETRY_S
        pause = 0.1
        while True:
            try:
                session.connection()
                return
            except SQLAlchemyError as exc:
                if not is_transient(exc) or time.monotonic() + pause > deadline:
                    raise
            session.rollback()
            time.sleep(pause)
            pause = min(2 * pause, 2.0)

    def _check_file(self) -> None:
        """Raise :class:`StoreError` when the SQLite file was deleted or replaced since this store first saw it
        (its open connections would go on writing into the deleted file, and every result would be lost)."""
        if self._engines.file is None:
            return
        try:
            stat = self._engines.file.stat()
            identity = (stat.st_dev, stat.st_ino)
        except OSError:
            identity = None
        if self._file_identity is None and identity is not None:
            self._file_identity = identity
        elif identity != self._file_identity:
            self._engines.reader.dispose()
            raise StoreError(
                f"the run store file {self._masked} was deleted or replaced while this process was using it; "
                "nothing more is saved to it (restart the process to use the file there now)"
            )

    @staticmethod
    def _require_run(session: Session, run_id: int) -> SqlRun:
        run = session.get(SqlRun, run_id)
        if run is None:
            raise RunNotFoundError(f"no run with id {run_id} in the run store")
        return run

    # -- datasets -----------------------------------------------------------------------------

    def register_dataset(
        self,
        *,
        name: str,
        data_dir: str | os.PathLike[str],
        n_images: int,
        class_counts: Mapping[str, int],
        synthetic: bool = False,
    ) -> int:
        """Record the dataset folder ``data_dir`` (kept as the record's ``root``) and return its id; a folder seen
        before keeps its id, gets new counts.

        ``synthetic``: the folder was drawn by a program (the demo set), not taken from patients.
        """
        root = str(data_dir)
        with _checked("register_dataset"):
            n_images = int(n_images)
            counts = {str(k): int(v) for k, v in class_counts.items()}
        with self._session(write=True) as s:
            row = s.scalar(select(SqlDataset).where(SqlDataset.root == root))
            if row is None:
                try:
                    with s.begin_nested():  # PostgreSQL: another process may insert the same root
                        row = SqlDataset(
                            name=name, root=root, n_images=n_images, class_counts=counts, synthetic=bool(synthetic)
                        )
                        s.add(row)
                except IntegrityError:
                    row = s.scalars(select(SqlDataset).where(SqlDataset.root == root)).one()
            row.name, row.n_images, row.class_counts, row.synthetic = name, n_images, counts, bool(synthetic)
            s.flush()
            return row.id

    def list_datasets(self) -> list[DatasetRecord]:
        """Every registered dataset, by name."""
        with self._session() as s:
            rows = s.scalars(select(SqlDataset).order_by(SqlDataset.name, SqlDataset.id))
            return [_record(DatasetRecord, r) for r in rows]

    # -- run lifecycle ------------------------------------------------------------------------

    def create_run(
        self,
        *,
        backbone: str,
        protocol: Protocol,
        config: Mapping[str, Any],
        dataset_id: int | None = None,
        status: str = "queued",
    ) -> int:
        """Record a new run (queued unless told otherwise) under ``protocol`` and return its id."""
        if not isinstance(protocol, Protocol):
            raise RecordError(f"protocol must be a Protocol (e.g. Protocol.holdout()), not {protocol!r}")
        _require_status(status, RUN_STATUSES)
        with _checked("create_run config"):
            config = dict(config)
        with self._session(write=True) as s:
            run = SqlRun(
                backbone=backbone,
                protocol=protocol,
                config=config,
                status=status,
                dataset_id=dataset_id,
                cancel_requested=False,
            )
            s.add(run)
            s.flush()
            return run.id

    @staticmethod
    def _running(environment: Mapping[str, Any] | None, worker_id: str | None) -> dict[str, Any]:
        with _checked("environment"):
            environment = None if environment is None else dict(environment)
        now = utcnow()
        return {
            "status": "running",
            "started_at": now,
            "heartbeat_at": now,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "environment": environment,
            "worker_id": worker_id,
        }

    def start_run(self, run_id: int, *, environment: Mapping[str, Any], worker_id: str | None = None) -> None:
        """Mark a run as running in this process (host, pid, environment, first heartbeat).

        The run must be queued, or already running without a process or in this one (created with
        ``status="running"``, or taken by :meth:`claim_next_queued` here); anything else (cancelled,
        finished, running elsewhere) raises :class:`StoreError`. Without ``worker_id`` the one recorded by
        the claim is kept.
        """
        values = self._running(environment, worker_id)
        if worker_id is None:
            del values["worker_id"]
        startable = or_(
            SqlRun.status == "queued",
            and_(
                SqlRun.status == "running",
                or_(SqlRun.pid.is_(None), and_(SqlRun.host == values["host"], SqlRun.pid == values["pid"])),
            ),
        )
        with self._session(write=True) as s:
            result = s.execute(update(SqlRun).where(SqlRun.id == run_id, startable).values(**values))
            if result.rowcount == 0:
                run = self._require_run(s, run_id)
                where = f" (pid {run.pid} on {run.host})" if run.status == "running" else ""
                raise StoreError(f"run {run_id} is {run.status}{where}; it cannot be started here")

    def claim_next_queued(self, *, worker_id: str, environment: Mapping[str, Any] | None = None) -> RunRecord | None:
        """Atomically take the oldest queued run and mark it running here; None when none is queued.

        Two workers never get the same run (PostgreSQL: ``FOR UPDATE SKIP LOCKED``; SQLite: the
        write lock; both: the update only applies while the run is still queued).
        """
        with self._session(write=True) as s:
            tried: list[int] = []
            while True:
                run_id = s.scalar(
                    select(SqlRun.id)
                    .where(SqlRun.status == "queued", SqlRun.id.not_in(tried))
                    .order_by(SqlRun.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                if run_id is None:
                    return None
                result = s.execute(
                    update(SqlRun)
                    .where(SqlRun.id == run_id, SqlRun.status == "queued")
                    .values(**self._running(environment, worker_id))
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:
                    return _run_record(s.get_one(SqlRun, run_id))
                tried.append(run_id)

    def hand_over(self, run_id: int, *, claimed_by: str, worker_id: str) -> None:
        """Move a run that ``claimed_by`` claimed to this process (host, pid) under ``worker_id``.

        A driver that claims runs and has them trained elsewhere (a Ray task) hands each one to the process
        that trains it, so that process may start it and a dead one is found by its own pid. A run no
        longer running under that claim (cancelled meanwhile, recovered as interrupted) raises :class:`StoreError`.
        """
        values = {"host": socket.gethostname(), "pid": os.getpid(), "worker_id": worker_id, "heartbeat_at": utcnow()}
        with self._session(write=True) as s:
            claimed = and_(SqlRun.id == run_id, SqlRun.status == "running", SqlRun.worker_id == claimed_by)
            if s.execute(update(SqlRun).where(claimed).values(**values)).rowcount == 0:
                run = self._require_run(s, run_id)
                raise StoreError(
                    f"run {run_id} is {run.status} under worker {run.worker_id}, "
                    f"not running under {claimed_by}; it cannot be handed over"
                )

    def set_run_dataset(self, run_id: int, dataset_id: int) -> None:
        """Record that run ``run_id`` trains on the registered dataset ``dataset_id``."""
        with self._session(write=True) as s:
            if s.execute(update(SqlRun).where(SqlRun.id == run_id).values(dataset_id=dataset_id)).rowcount == 0:
                raise RunNotFoundError(f"no run with id {run_id} in the run store")

    def update_run_config(self, run_id: int, config: Mapping[str, Any]) -> None:
        """Replace a run's config (training adds what it learns from the data, such as class names)."""
        with _checked("update_run_config config"):
            config = dict(config)
        with self._session(write=True) as s:
            if s.execute(update(SqlRun).where(SqlRun.id == run_id).values(config=config)).rowcount == 0:
                raise RunNotFoundError(f"no run with id {run_id} in the run store")

    def heartbeat(self, run_id: int) -> None:
        """Note that the run's process is still alive (no view shows it, so :meth:`revision` stays as it is)."""
        with self._session(write=True, revises=False) as s:
            if s.execute(update(SqlRun).where(SqlRun.id == run_id).values(heartbeat_at=utcnow())).rowcount == 0:
                raise RunNotFoundError(f"no run with id {run_id} in the run store")

    def set_progress(
        self, run_id: int, *, phase: str, done: int, total: int, unit: str, started_at: datetime | None = None
    ) -> None:
        """Note where the run's current ``phase`` stands (``done`` of ``total`` ``unit``\\ s; total 0: not counted) and
        refresh its heartbeat. ``started_at`` is when the phase began (default: now, a new phase)."""
        now = utcnow()
        with _checked("set_progress"):
            values = {
                "progress_phase": str(phase)[:80],
                "progress_done": int(done),
                "progress_total": int(total),
                "progress_unit": str(unit)[:16],
                "progress_started_at": started_at or now,
                "progress_updated_at": now,
                "heartbeat_at": now,
            }
        with self._session(write=True) as s:
            if s.execute(update(SqlRun).where(SqlRun.id == run_id).values(**values)).rowcount == 0:
                raise RunNotFoundError(f"no run with id {run_id} in the run store")

    def get_progress(self, run_id: int) -> RunProgress | None:
        """The phase the run last reported (:meth:`set_progress`), or None when it reported none."""
        with self._session() as s:
            run = self._require_run(s, run_id)
            if run.progress_phase is None:
                return None
            return RunProgress(
                run_id=run.id,
                phase=run.progress_phase,
                done=run.progress_done or 0,
                total=run.progress_total or 0,
                unit=run.progress_unit or "",
                started_at=run.progress_started_at,
                updated_at=run.progress_updated_at,
            )

    def request_cancel(self, run_id: int) -> None:
        """Ask for a run to stop: a queued run is cancelled at once, a running one is flagged.

        The training loop polls :meth:`is_cancel_requested`; finished runs are left as they are.
        """
        with self._session(write=True) as s:
            queued = s.execute(
                update(SqlRun)
                .where(SqlRun.id == run_id, SqlRun.status == "queued")
                .values(status="cancelled", cancel_requested=True, finished_at=utcnow())
            )
            if queued.rowcount:
                return
            running = s.execute(
                update(SqlRun).where(SqlRun.id == run_id, SqlRun.status == "running").values(cancel_requested=True)
            )
            if running.rowcount == 0:
                self._require_run(s, run_id)

    def is_cancel_requested(self, run_id: int) -> bool:
        """Whether someone asked this run to stop."""
        with self._session() as s:
            flag = s.scalar(select(SqlRun.cancel_requested).where(SqlRun.id == run_id))
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
        with _checked("log_epoch"):
            epoch_row = SqlEpoch(
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
        with self._session(write=True) as s:
            if s.execute(update(SqlRun).where(SqlRun.id == run_id).values(heartbeat_at=utcnow())).rowcount == 0:
                raise RunNotFoundError(f"no run with id {run_id} in the run store")
            s.add(epoch_row)

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
        _require_status(status, FINAL_STATUSES, what="finish_run needs")
        with _checked("finish_run"):
            test_accuracy, macro_auc = _metric(test_accuracy), _metric(macro_auc)
        with self._session(write=True) as s:
            run = self._require_run(s, run_id)
            now = utcnow()
            run.status = status
            run.finished_at = now
            run.seconds = (now - run.started_at).total_seconds() if run.started_at else None
            run.error = error
            run.test_accuracy = test_accuracy
            run.macro_auc = macro_auc

    def recover_interrupted(self, *, stale_after_s: float = 600) -> list[int]:
        """Mark dead 'running' runs as 'interrupted' and return their ids.

        A run is dead when it runs on this host under a pid that no longer exists, or when its
        heartbeat is older than ``stale_after_s`` (any host). Only reads when nothing is dead.
        """
        host = socket.gethostname()
        cutoff = utcnow() - timedelta(seconds=stale_after_s)
        last_sign = func.coalesce(SqlRun.heartbeat_at, SqlRun.started_at, SqlRun.created_at)
        with self._session() as s:
            rows = s.execute(
                select(SqlRun.id, SqlRun.host, SqlRun.pid, SqlRun.started_at, last_sign.label("last_sign")).where(
                    SqlRun.status == "running"
                )
            ).all()
        dead: list[tuple[Any, Any, str]] = []
        for row in rows:
            if row.host == host and row.pid is not None and not pid_alive(row.pid):
                reason = f"interrupted: its process (pid {row.pid} on {host}) is gone"
                dead.append((row, SqlRun.pid == row.pid, reason))
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
                    update(SqlRun)
                    .where(SqlRun.id == row.id, SqlRun.status == "running", still_dead)
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
        with _checked("save_split assignment"):
            for a in assignments:
                if not _SUBSET.fullmatch(str(a["subset"])):
                    raise RecordError(f"subset must be train, val, test or foldN, not {a['subset']!r}")
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
            s.execute(delete(SqlSplitAssignment).where(SqlSplitAssignment.run_id == run_id))
            if rows:
                s.execute(insert(SqlSplitAssignment), rows)

    def get_split(self, run_id: int) -> list[dict[str, Any]]:
        """The run's split as dicts with path, class_name, subset and group_id, in saved order."""
        with self._session() as s:
            self._require_run(s, run_id)
            rows = s.scalars(
                select(SqlSplitAssignment).where(SqlSplitAssignment.run_id == run_id).order_by(SqlSplitAssignment.id)
            )
            return [
                {"path": r.path, "class_name": r.class_name, "subset": r.subset, "group_id": r.group_id} for r in rows
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
        with _checked("save_evaluation"):
            evaluation = SqlEvaluation(
                run_id=run_id,
                name=name,
                data_dir=None if data_dir is None else str(data_dir),
                metrics=dict(metrics),
                class_names=[str(c) for c in class_names],
                confusion_matrix=[[int(n) for n in row] for row in confusion_matrix],
                roc_auc={str(c): _metric(curve.get("auc")) for c, curve in roc.items()},
            )
            points = []
            for class_name, curve in roc.items():
                columns = [list(curve[key]) for key in ("fpr", "tpr", "thresholds")]
                if len({len(column) for column in columns}) > 1:
                    raise RecordError(
                        f"the ROC curve of {class_name!r} has {', '.join(str(len(c)) for c in columns)} "
                        "values of fpr, tpr and thresholds; they must match"
                    )
                points += [
                    {
                        "class_name": str(class_name),
                        "point_index": i,
                        "fpr": float(fpr),
                        "tpr": float(tpr),
                        "threshold": float(threshold),
                    }
                    for i, (fpr, tpr, threshold) in enumerate(zip(*columns, strict=True))
                ]
            rows = [
                {
                    "path": str(p["path"]),
                    "true_class": str(p["true_class"]),
                    "predicted_class": str(p["predicted_class"]),
                    "probabilities": [float(x) for x in p["probabilities"]],
                }
                for p in predictions
            ]
        with self._session(write=True) as s:
            self._require_run(s, run_id)
            s.add(evaluation)
            s.flush()
            if points:
                s.execute(insert(SqlRocPoint), [{**point, "evaluation_id": evaluation.id} for point in points])
            if rows:
                s.execute(insert(SqlPrediction), [{**row, "evaluation_id": evaluation.id} for row in rows])
            return evaluation.id

    def save_scored_evaluation(
        self,
        run_id: int,
        evaluation: ScoredEvaluation,
        *,
        name: str,
        data_dir: str | os.PathLike[str],
        paths: Sequence[str | os.PathLike[str]],
        y_true: Sequence[int],
        y_prob: Sequence[Sequence[float]],
    ) -> int:
        """Record ``evaluation`` of run ``run_id`` under ``name`` with one prediction per image; its id.

        ``paths``, ``y_true`` (class indices into ``evaluation.class_names``) and ``y_prob`` are aligned.
        """
        names = evaluation.class_names
        with _checked("save_scored_evaluation"):
            predictions = [
                {
                    "path": str(path),
                    "true_class": names[int(true)],
                    "predicted_class": names[int(predicted)],
                    "probabilities": list(prob),
                }
                for path, true, predicted, prob in zip(paths, y_true, evaluation.predicted, y_prob, strict=True)
            ]
        return self.save_evaluation(
            run_id,
            name=name,
            data_dir=data_dir,
            metrics=evaluation.metrics,
            class_names=names,
            confusion_matrix=evaluation.confusion_matrix,
            roc=evaluation.roc,
            predictions=predictions,
        )

    def latest_evaluation(self, run_id: int, name: str = TEST_EVALUATION) -> EvaluationRecord | None:
        """The run's newest evaluation called ``name`` (by default its evaluation on its own test split), or None."""
        return latest_evaluation(self.get_evaluations(run_id), name)

    def get_evaluations(self, run_id: int) -> list[EvaluationRecord]:
        """The run's evaluations, oldest first, with metrics, confusion matrix and ROC curves."""
        with self._session() as s:
            self._require_run(s, run_id)
            evaluations = list(
                s.scalars(select(SqlEvaluation).where(SqlEvaluation.run_id == run_id).order_by(SqlEvaluation.id))
            )
            points: dict[tuple[int, str], list[SqlRocPoint]] = {}
            for p in s.scalars(
                select(SqlRocPoint)
                .where(SqlRocPoint.evaluation_id.in_([e.id for e in evaluations]))
                .order_by(SqlRocPoint.evaluation_id, SqlRocPoint.class_name, SqlRocPoint.point_index)
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

    def add_evaluation_metrics(self, evaluation_id: int, metrics: Mapping[str, Any]) -> None:
        """Add ``metrics`` to an evaluation's metrics (a key already there is replaced)."""
        with _checked("add_evaluation_metrics"):
            extra = dict(metrics)
        with self._session(write=True) as s:
            row = s.get(SqlEvaluation, evaluation_id)
            if row is None:
                raise StoreError(f"no evaluation with id {evaluation_id} in the run store")
            row.metrics = {**row.metrics, **extra}

    def get_predictions(self, evaluation_id: int) -> list[PredictionRecord]:
        """The per-image predictions of one evaluation, in saved order."""
        with self._session() as s:
            if s.get(SqlEvaluation, evaluation_id) is None:
                raise StoreError(f"no evaluation with id {evaluation_id} in the run store")
            rows = s.scalars(
                select(SqlPrediction).where(SqlPrediction.evaluation_id == evaluation_id).order_by(SqlPrediction.id)
            )
            return [_record(PredictionRecord, r) for r in rows]

    # -- artifacts ----------------------------------------------------------------------------

    def save_artifact(
        self, run_id: int, *, kind: str, path: str | os.PathLike[str], sha256: str, size_bytes: int
    ) -> int:
        """Record a file the run produced and return the record's id."""
        with _checked("save_artifact"):
            artifact = SqlArtifact(run_id=run_id, kind=kind, path=str(path), sha256=sha256, size_bytes=int(size_bytes))
        with self._session(write=True) as s:
            self._require_run(s, run_id)
            s.add(artifact)
            s.flush()
            return artifact.id

    def get_artifacts(self, run_id: int) -> list[ArtifactRecord]:
        """The run's artifacts, oldest first."""
        with self._session() as s:
            self._require_run(s, run_id)
            rows = s.scalars(select(SqlArtifact).where(SqlArtifact.run_id == run_id).order_by(SqlArtifact.id))
            return [_record(ArtifactRecord, r) for r in rows]

    # -- reading runs -------------------------------------------------------------------------

    def get_run(self, run_id: int) -> RunRecord:
        """One run; :class:`RunNotFoundError` for an unknown id."""
        with self._session() as s:
            return _run_record(self._require_run(s, run_id))

    def list_runs(self, *, status: str | None = None, limit: int | None = None) -> list[RunRecord]:
        """Runs, newest first, optionally only those with ``status`` and at most ``limit``."""
        query = _with_status(select(SqlRun).order_by(SqlRun.created_at.desc(), SqlRun.id.desc()).limit(limit), status)
        with self._session() as s:
            return [_run_record(r) for r in s.scalars(query).unique()]

    def revision(self) -> str:
        """A token that changes with every write a view shows: runs, their status, config and dataset, epochs,
        splits, evaluations and metrics added to them, predictions, artifacts, datasets (a cache key for views of
        the store; only a bare :meth:`heartbeat` leaves it as it is)."""
        with self._session() as s:
            return str(s.scalar(select(SqlStoreRevision.counter).where(SqlStoreRevision.id == 1)))

    def get_epochs(self, run_id: int) -> list[EpochRecord]:
        """The run's epochs by phase and epoch."""
        with self._session() as s:
            self._require_run(s, run_id)
            rows = s.scalars(select(SqlEpoch).where(SqlEpoch.run_id == run_id).order_by(SqlEpoch.phase, SqlEpoch.epoch))
            return [_record(EpochRecord, r) for r in rows]

    def complete_imported_run(
        self,
        run_id: int,
        *,
        started_at: datetime | None,
        finished_at: datetime | None,
        seconds: float | None,
        host: str | None,
        environment: Mapping[str, Any] | None,
        test_accuracy: float | None,
        macro_auc: float | None,
    ) -> None:
        """Mark a run brought in from another store completed, with where and when it was trained there."""
        with _checked("complete_imported_run"):
            values = {
                "status": "completed",
                "error": None,
                "started_at": started_at,
                "finished_at": finished_at,
                "seconds": _metric(seconds),
                "host": None if host is None else str(host)[:255],
                "environment": None if environment is None else dict(environment),
                "test_accuracy": _metric(test_accuracy),
                "macro_auc": _metric(macro_auc),
            }
        with self._session(write=True) as s:
            run = self._require_run(s, run_id)
            for name, value in values.items():
                setattr(run, name, value)

    def delete_run(self, run_id: int) -> None:
        """Delete a run and, through ON DELETE CASCADE, everything recorded about it."""
        with self._session(write=True) as s:
            if s.execute(delete(SqlRun).where(SqlRun.id == run_id)).rowcount == 0:
                raise RunNotFoundError(f"no run with id {run_id} in the run store")

    def count_runs(self, *, status: str | None = None) -> int:
        """How many runs there are, optionally only those with ``status`` (counted in the database)."""
        query = _with_status(select(func.count(SqlRun.id)), status)
        with self._session() as s:
            return int(s.execute(query).scalar_one())
