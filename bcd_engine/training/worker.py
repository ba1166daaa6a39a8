"""The background training worker: takes queued runs from the store and trains them one after another.

``python -m bcd_engine worker`` runs :func:`run_worker`. Claiming is atomic in the store, so several
workers (on one or several machines) never train the same run twice. A worker keeps a heartbeat file
under the cache folder (pid, host, time) so the dashboard can tell whether one is alive, and removes it
when it leaves, so the next worker can start at once; the run's own heartbeat in the store is kept by
:func:`bcd_engine.training.run.train`, whoever calls it. The module keeps no state: whether a worker lives
is read from the heartbeat file and the OS, and a worker this process starts is waited for by a thread of
its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from bcd_engine import settings
from bcd_engine.files import atomic_write_text
from bcd_engine.models.config import TrainConfig
from bcd_engine.processes import pid_alive
from bcd_engine.store import JobQueue, JobRecord, RunStore
from bcd_engine.training.monitor import repeating
from bcd_engine.training.run import train

HEARTBEAT_SECONDS = 10.0
STALE_AFTER_SECONDS = 60.0
POLL_SECONDS = 2.0  # between looks at an empty queue
CANCEL_CHECK_SECONDS = 2.0  # how often a running job looks whether it was asked to stop
JOB_RUN_PROTOCOLS = {"cv": "kfold", "lodo": "lodo"}  # the protocol of the runs a job kind trains
JobRunner = Callable[[RunStore, JobRecord], dict]  # runs a claimed job; its result (bcd_engine.protocols.jobs)
log = logging.getLogger("bcd.worker")


def heartbeat_file() -> Path:
    """Where the live worker notes its pid: ``<cache_dir>/worker.json``."""
    return settings.cache_dir() / "worker.json"


def log_file() -> Path:
    """Where a worker started by the dashboard writes its output: ``<cache_dir>/worker.log``."""
    return settings.cache_dir() / "worker.log"


def write_heartbeat(pid: int | None = None, worker_id: str | None = None) -> None:
    """Note that the worker ``pid`` (default: this process) is alive now."""
    atomic_write_text(
        heartbeat_file(),
        json.dumps(
            {"pid": pid or os.getpid(), "host": socket.gethostname(), "worker_id": worker_id, "time": time.time()}
        ),
    )


def remove_heartbeat(worker_id: str | None) -> None:
    """Remove the heartbeat file if it still names this process as ``worker_id``; another worker's is kept."""
    path = heartbeat_file()
    taken = path.with_name(f".{path.name}.{os.getpid()}.leaving")
    try:
        os.replace(path, taken)  # atomic: a heartbeat another worker writes from now on is not touched
        beat = json.loads(taken.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        beat = {}
    if (beat.get("pid"), beat.get("host"), beat.get("worker_id")) != (os.getpid(), socket.gethostname(), worker_id):
        with contextlib.suppress(OSError):  # put it back, unless a newer heartbeat is there already
            os.link(taken, path)
    taken.unlink(missing_ok=True)


def live_worker() -> dict | None:
    """The heartbeat of a live worker on this host, or None (no file, process gone, or stale); reads only."""
    try:
        beat = json.loads(heartbeat_file().read_text())
    except (OSError, ValueError):
        return None
    if beat.get("host") != socket.gethostname() or time.time() - beat.get("time", 0) > STALE_AFTER_SECONDS:
        return None
    return beat if pid_alive(int(beat["pid"])) else None


def spawn_worker(*options: str) -> subprocess.Popen:
    """Start ``python -m bcd_engine worker --once [options]`` detached (own session, output to the log file);
    the process. ``options`` are more of the worker's command-line options (``--executor ray ...``).

    A daemon thread waits for the process, so its exit status is collected as soon as it leaves (no zombie
    lingers) without anyone keeping a list of the workers started.
    """
    log_path = log_file()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bcd_engine", "worker", "--once", *options],
            cwd=settings.PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(settings.PROJECT_ROOT)},
        )
    threading.Thread(target=process.wait, name=f"bcd-worker-{process.pid}-waiter", daemon=True).start()
    write_heartbeat(process.pid)  # so a second page load does not start another one meanwhile
    return process


def train_claimed(store: RunStore, run, worker_id: str) -> str:
    """Train one claimed run, keeping this worker's heartbeat file; its final status (see :func:`train_stored`)."""
    with repeating(
        lambda: write_heartbeat(worker_id=worker_id), every_s=HEARTBEAT_SECONDS, name=f"bcd-worker-{worker_id}"
    ):
        return train_stored(store, run)


def train_stored(store: RunStore, run) -> str:
    """Train a claimed run with its stored config and data folder; its final status (a failure is logged
    and recorded on the run, never raised)."""
    try:
        config = TrainConfig.from_dict(run.config["train"])
        return train(config, run.config["data_dir"], store=store, run_id=run.id).status
    except Exception as exc:  # noqa: BLE001 - one bad run must not stop the queue
        log.error("run %s failed: %s: %s", run.id, type(exc).__name__, exc)
        if store.get_run(run.id).status == "running":  # failed before train() could close it
            store.finish_run(run.id, status="failed", error=f"{type(exc).__name__}: {exc}")
        return "failed"


def _cancel_job_runs(store: RunStore, job: JobRecord) -> None:
    """Pass a job's cancel on to the runs it trains: those of its protocol started since the job began."""
    kind = JOB_RUN_PROTOCOLS.get(job.kind)
    for run in store.list_runs(status="running"):
        if run.protocol.kind == kind and job.started_at is not None and run.created_at >= job.started_at:
            store.request_cancel(run.id)


def run_claimed_job(store: RunStore, job: JobRecord, run_job: JobRunner, worker_id: str) -> str:
    """Run a claimed protocol job, keeping the worker's heartbeat and passing a cancel on to its runs; its final
    status (a failure is recorded on the job, never raised)."""
    jobs = JobQueue(store)

    def beat() -> None:
        write_heartbeat(worker_id=worker_id)
        if jobs.get(job.id).cancel_requested:
            _cancel_job_runs(store, job)

    try:
        with repeating(beat, every_s=CANCEL_CHECK_SECONDS, name=f"bcd-job-{job.id}"):
            result = run_job(store, job)
    except Exception as exc:  # noqa: BLE001 - one bad job must not stop the queue
        log.error("job %s failed: %s: %s", job.id, type(exc).__name__, exc)
        status = "cancelled" if jobs.get(job.id).cancel_requested else "failed"
        jobs.finish(job.id, status=status, error=f"{type(exc).__name__}: {exc}")
        return status
    status = "cancelled" if jobs.get(job.id).cancel_requested else "completed"
    jobs.finish(job.id, status=status, result=result, error="cancelled by user" if status == "cancelled" else None)
    return status


def _queue_empty(store: RunStore, *, jobs: bool) -> bool:
    return not store.list_runs(status="queued", limit=1) and not (
        jobs and JobQueue(store).list(status="queued", limit=1)
    )


def run_worker(
    *,
    store: RunStore,
    worker_id: str | None = None,
    once: bool = False,
    poll_seconds: float = POLL_SECONDS,
    run_job: JobRunner | None = None,
) -> list[dict]:
    """Train queued runs one after another, and with ``run_job`` run queued protocol jobs when no run waits; return
    ``[{"run_id", "status"}, ...]`` for the runs taken and ``{"job_id", "status"}`` for the jobs.

    With ``once`` the worker stops when the queue is empty; otherwise it polls every ``poll_seconds``.
    However it leaves, it removes its heartbeat file. A ``once`` worker looks at the queue again after
    removing it: a run queued while the dashboard still saw this worker alive is trained, not stranded.
    """
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    done: list[dict] = []
    jobs = JobQueue(store)
    try:
        while True:
            write_heartbeat(worker_id=worker_id)
            store.recover_interrupted()
            run = store.claim_next_queued(worker_id=worker_id)
            if run is None and run_job is not None:
                jobs.recover_interrupted()
                if (job := jobs.claim_next(worker_id=worker_id)) is not None:
                    log.info("worker %s: running %s", worker_id, job.name)
                    status = run_claimed_job(store, job, run_job, worker_id)
                    log.info("worker %s: job %s %s", worker_id, job.id, status)
                    done.append({"job_id": job.id, "status": status})
                    continue
            if run is None:
                if once:
                    remove_heartbeat(worker_id)
                    if _queue_empty(store, jobs=run_job is not None):
                        return done
                else:
                    time.sleep(poll_seconds)
                continue
            log.info("worker %s: training run %s (%s)", worker_id, run.id, run.backbone)
            status = train_claimed(store, run, worker_id)
            log.info("worker %s: run %s %s", worker_id, run.id, status)
            done.append({"run_id": run.id, "status": status})
    except BaseException:  # stopped (Ctrl-C) or broken: it leaves all the same
        remove_heartbeat(worker_id)
        raise


def ensure_worker(store: RunStore, *options: str) -> bool:
    """Start a background worker (with more command-line ``options``, as :func:`spawn_worker`) when runs or
    protocol jobs are queued and none is alive; True when one was started."""
    if live_worker() is not None or _queue_empty(store, jobs=True):
        return False
    spawn_worker(*options)
    return True


def _runs(n: int) -> str:
    return f"{n} run{'' if n == 1 else 's'}"


def worker_status(store: RunStore) -> dict:
    """What the background worker is doing: ``{"state", "text", "running", "queued", "jobs_running", "jobs_queued",
    "pid"}``.

    ``state`` is ``idle`` (nothing queued or running: no worker needed), ``training`` (``running`` holds the
    ids of the running runs, ``jobs_running`` those of the running protocol jobs), ``starting`` (runs or jobs are
    queued and a live worker has not taken one yet) or ``waiting`` (they are queued and no worker lives;
    :func:`ensure_worker` starts one). ``queued`` counts the queued runs and ``jobs_queued`` the queued jobs,
    ``pid`` is the live worker's on this host (or None), ``text`` says it in one sentence.
    """
    beat = live_worker()
    running = sorted(store.list_runs(status="running"), key=lambda run: run.id)
    queued = store.count_runs(status="queued")
    jobs = JobQueue(store)
    running_jobs, queued_jobs = jobs.list(status="running"), len(jobs.list(status="queued"))
    waiting = ", ".join(
        part for part in (_runs(queued) if queued else "", _jobs(queued_jobs) if queued_jobs else "") if part
    )
    if running or running_jobs:
        parts = [
            f"Training run{'s' if len(running) > 1 else ''} " + ", ".join(f"{r.id} ({r.backbone})" for r in running)
        ]
        parts = (parts if running else []) + [f"running {job.name}" for job in running_jobs]
        more = str(queued) if queued and not queued_jobs else waiting  # "2 more queued" when only runs wait
        state, text = "training", "; ".join(parts) + (f"; {more} more queued" if more else "") + "."
        text = text[0].upper() + text[1:]
    elif not waiting:
        state, text = "idle", "No worker needed: no run is queued."
    elif beat is not None:
        state, text = "starting", f"A worker is starting; {waiting} queued."
    else:
        state, text = "waiting", f"{waiting} queued; a worker will start."
    return {
        "state": state,
        "text": text,
        "running": [run.id for run in running],
        "queued": queued,
        "jobs_running": [job.id for job in running_jobs],
        "jobs_queued": queued_jobs,
        "pid": beat["pid"] if beat is not None else None,
    }


def _jobs(n: int) -> str:
    return f"{n} protocol job{'' if n == 1 else 's'}"
