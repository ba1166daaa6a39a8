"""The background training worker: takes queued runs from the store and trains them one after another.

``python -m bcd_engine worker`` runs :func:`run_worker`. Claiming is atomic in the store, so several
workers (on one or several machines) never train the same run twice. A worker keeps a heartbeat file
under the cache folder (pid, host, time) so the dashboard can tell whether one is alive; the run's own
heartbeat in the store is kept by :func:`bcd_engine.training.run.train`, whoever calls it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bcd_engine import settings
from bcd_engine.files import atomic_write_text
from bcd_engine.models.config import TrainConfig
from bcd_engine.processes import pid_alive
from bcd_engine.store import RunStore
from bcd_engine.training.monitor import repeating
from bcd_engine.training.run import train

HEARTBEAT_SECONDS = 10.0
STALE_AFTER_SECONDS = 60.0
POLL_SECONDS = 2.0  # between looks at an empty queue
log = logging.getLogger("bcd.worker")


def heartbeat_file() -> Path:
    """Where the live worker notes its pid: ``<cache_dir>/worker.json``."""
    return settings.cache_dir() / "worker.json"


def log_file() -> Path:
    """Where a worker started by the dashboard writes its output: ``<cache_dir>/worker.log``."""
    return settings.cache_dir() / "worker.log"


def write_heartbeat(pid: int | None = None, worker_id: str | None = None) -> None:
    """Note that the worker ``pid`` (default: this process) is alive now."""
    atomic_write_text(heartbeat_file(), json.dumps({"pid": pid or os.getpid(), "host": socket.gethostname(),
                                                    "worker_id": worker_id, "time": time.time()}))


def live_worker() -> dict | None:
    """The heartbeat of a live worker on this host, or None (no file, process gone, or stale)."""
    try:
        beat = json.loads(heartbeat_file().read_text())
    except (OSError, ValueError):
        return None
    if beat.get("host") != socket.gethostname() or time.time() - beat.get("time", 0) > STALE_AFTER_SECONDS:
        return None
    return beat if pid_alive(int(beat["pid"])) else None


def spawn_worker() -> int:
    """Start ``python -m bcd_engine worker --once`` detached (own session, output to the log file); its pid."""
    log_path = log_file()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bcd_engine", "worker", "--once"],
            cwd=settings.PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, "PYTHONPATH": str(settings.PROJECT_ROOT)},
        )
    write_heartbeat(process.pid)  # so a second page load does not start another one meanwhile
    return process.pid


def train_claimed(store: RunStore, run, worker_id: str) -> str:
    """Train one claimed run; return its final status (a failure is logged, never raised)."""
    try:
        with repeating(lambda: write_heartbeat(worker_id=worker_id), every_s=HEARTBEAT_SECONDS,
                       name=f"bcd-worker-{worker_id}"):
            config = TrainConfig.from_dict(run.config["train"])
            return train(config, run.config["data_dir"], store=store, run_id=run.id).status
    except Exception as exc:  # noqa: BLE001 - one bad run must not stop the queue
        log.error("run %s failed: %s: %s", run.id, type(exc).__name__, exc)
        if store.get_run(run.id).status == "running":  # failed before train() could close it
            store.finish_run(run.id, status="failed", error=f"{type(exc).__name__}: {exc}")
        return "failed"


def run_worker(*, store: RunStore, worker_id: str | None = None, once: bool = False,
               poll_seconds: float = POLL_SECONDS) -> list[dict]:
    """Train queued runs one after another; return ``[{"run_id", "status"}, ...]`` for the runs taken.

    With ``once`` the worker stops when the queue is empty; otherwise it polls every ``poll_seconds``.
    """
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    done: list[dict] = []
    while True:
        write_heartbeat(worker_id=worker_id)
        store.recover_interrupted()
        run = store.claim_next_queued(worker_id=worker_id)
        if run is None:
            if once:
                return done
            time.sleep(poll_seconds)
            continue
        log.info("worker %s: training run %s (%s)", worker_id, run.id, run.backbone)
        status = train_claimed(store, run, worker_id)
        log.info("worker %s: run %s %s", worker_id, run.id, status)
        done.append({"run_id": run.id, "status": status})


def ensure_worker(store: RunStore) -> bool:
    """Start a background worker when runs are queued and none is alive; True when one was started."""
    if live_worker() is not None or not store.list_runs(status="queued", limit=1):
        return False
    spawn_worker()
    return True
