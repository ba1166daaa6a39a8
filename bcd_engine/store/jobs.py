"""Protocol jobs: a k-fold CV, a leave-one-dataset-out, a classical baseline or a robustness check, queued for the
worker as one unit.

A training run is a row of ``runs``; a protocol makes runs of its own (one per fold or round) or none at all (the
classical baseline), so the queue keeps it apart, in ``jobs``: its kind, its parameters, its status (the runs'
statuses), and when done its result as JSON (the protocol's ``to_dict()``, as the CLI prints it). The worker claims
jobs atomically like runs (:meth:`JobQueue.claim_next`), and a job whose worker died is marked interrupted.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, Index, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, mapped_column

from bcd_engine.errors import RecordError, RunNotFoundError
from bcd_engine.processes import pid_alive
from bcd_engine.store.models import FINAL_STATUSES, RUN_STATUSES, Base, _one_of, utcnow
from bcd_engine.store.runs import RunStore

JOB_KINDS = ("cv", "lodo", "baseline", "robustness")
JOB_NAMES = {
    "cv": "k-fold cross-validation",
    "lodo": "leave-one-dataset-out",
    "baseline": "classical baseline",
    "robustness": "colour robustness",
}


class SqlJob(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_one_of("kind", JOB_KINDS), name="kind"),
        CheckConstraint(_one_of("status", RUN_STATUSES), name="status"),
        Index("ix_jobs_status_created_at", "status", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    worker_id: Mapped[str | None] = mapped_column(String(255))
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None]


@dataclass(frozen=True)
class JobRecord:
    """A queued, running or finished protocol job; ``result`` is the protocol's JSON once completed."""

    id: int
    kind: str
    params: dict[str, Any]
    status: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker_id: str | None
    cancel_requested: bool
    error: str | None
    result: dict[str, Any] | None

    @property
    def name(self) -> str:
        """The job in words: ``job 2: k-fold cross-validation (resnet50, 5 folds)``."""
        params = self.params
        detail = [params[key] for key in ("backbone", "model") if params.get(key)]
        detail += [f"{params['folds']} folds"] if params.get("folds") else []
        detail += [f"of run {params['run_id']}"] if params.get("run_id") is not None else []
        return f"job {self.id}: {JOB_NAMES[self.kind]}" + (f" ({', '.join(map(str, detail))})" if detail else "")


def _record(job: SqlJob) -> JobRecord:
    return JobRecord(
        id=job.id,
        kind=job.kind,
        params=dict(job.params),
        status=job.status,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        worker_id=job.worker_id,
        cancel_requested=job.cancel_requested,
        error=job.error,
        result=None if job.result is None else dict(job.result),
    )


class JobQueue:
    """The protocol jobs of one run store (its ``jobs`` table), each method one short transaction."""

    def __init__(self, store: RunStore) -> None:
        self.store = store

    def _require(self, session, job_id: int) -> SqlJob:
        job = session.get(SqlJob, job_id)
        if job is None:
            raise RunNotFoundError(f"no job with id {job_id} in the run store")
        return job

    def put(self, kind: str, params: dict[str, Any]) -> int:
        """Queue a job of ``kind`` (one of :data:`JOB_KINDS`) with its JSON ``params``; its id."""
        if kind not in JOB_KINDS:
            raise RecordError(f"job kind must be one of {', '.join(JOB_KINDS)}, not {kind!r}")
        with self.store._session(write=True) as s:
            job = SqlJob(kind=kind, params=params, status="queued")
            s.add(job)
            s.flush()
            return job.id

    def claim_next(self, *, worker_id: str) -> JobRecord | None:
        """Take the oldest queued job for ``worker_id`` (now running, with this host and pid), or None."""
        with self.store._session(write=True) as s:
            while True:
                job_id = s.scalar(
                    select(SqlJob.id).where(SqlJob.status == "queued").order_by(SqlJob.created_at, SqlJob.id).limit(1)
                )
                if job_id is None:
                    return None
                taken = s.execute(
                    update(SqlJob)
                    .where(SqlJob.id == job_id, SqlJob.status == "queued")
                    .values(
                        status="running",
                        started_at=utcnow(),
                        worker_id=worker_id,
                        host=socket.gethostname(),
                        pid=os.getpid(),
                    )
                ).rowcount
                if taken:
                    return _record(self._require(s, job_id))

    def finish(
        self, job_id: int, *, status: str, result: dict[str, Any] | None = None, error: str | None = None
    ) -> None:
        """Close a job with a final ``status`` and its ``result`` (completed) or ``error``."""
        if status not in FINAL_STATUSES:
            raise RecordError(f"a job finishes as one of {', '.join(FINAL_STATUSES)}, not {status!r}")
        with self.store._session(write=True) as s:
            job = self._require(s, job_id)
            job.status, job.result, job.error, job.finished_at = status, result, error, utcnow()

    def request_cancel(self, job_id: int) -> None:
        """Ask a job to stop: a queued job is cancelled at once, a running one is flagged (its worker stops it)."""
        with self.store._session(write=True) as s:
            job = self._require(s, job_id)
            if job.status == "queued":
                job.status, job.finished_at, job.error = "cancelled", utcnow(), "cancelled before it started"
            elif job.status == "running":
                job.cancel_requested = True

    def get(self, job_id: int) -> JobRecord:
        with self.store._session() as s:
            return _record(self._require(s, job_id))

    def list(self, *, status: str | None = None, kind: str | None = None, limit: int | None = None) -> list[JobRecord]:
        """Jobs, newest first, optionally of one ``status`` and ``kind``."""
        query = select(SqlJob).order_by(SqlJob.created_at.desc(), SqlJob.id.desc()).limit(limit)
        if status is not None:
            query = query.where(SqlJob.status == status)
        if kind is not None:
            query = query.where(SqlJob.kind == kind)
        with self.store._session() as s:
            return [_record(job) for job in s.scalars(query)]

    def recover_interrupted(self) -> list[int]:
        """Mark running jobs of this host whose process is gone as interrupted; their ids."""
        host = socket.gethostname()
        with self.store._session() as s:
            running = s.execute(select(SqlJob.id, SqlJob.host, SqlJob.pid).where(SqlJob.status == "running")).all()
        dead = [job_id for job_id, on, pid in running if on == host and (pid is None or not pid_alive(pid))]
        for job_id in dead:
            with self.store._session(write=True) as s:
                s.execute(
                    update(SqlJob)
                    .where(SqlJob.id == job_id, SqlJob.status == "running")
                    .values(status="interrupted", finished_at=utcnow(), error="interrupted: its worker process died")
                )
        return dead
