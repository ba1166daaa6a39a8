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


def run_worker(
    *, store: RunStore, worker_id: str | None = None, once: bool = False, poll_seconds: float = POLL_SECONDS
) -> list[dict]:
    """Train queued runs one after another; return ``[{"run_id", "status"}, ...]`` for the runs taken.

    With ``once`` the worker stops when the queue is empty; otherwise it polls every ``poll_seconds``.
    However it leaves, it removes its heartbeat file. A ``once`` worker looks at the queue again after
    removing it: a run queued while the dashboard still saw this worker alive is trained, not stranded.
    """
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    done: list[dict] = []
    try:
        while True:
            write_heartbeat(worker_id=worker_id)
            store.recover_interrupted()
            run = store.claim_next_queued(worker_id=worker_id)
            if run is None:
                if once:
                    remove_heartbeat(worker_id)
                    if not store.list_runs(status="queued", limit=1):
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
    """Start a background worker (with more command-line ``options``, as :func:`spawn_worker`) when runs are
    queued and none is alive; True when one was started."""
    if live_worker() is not None or not store.list_runs(status="queued", limit=1):
        return False
    spawn_worker(*options)
    return True


def _runs(n: int) -> str:
    return f"{n} run{'' if n == 1 else 's'}"


def worker_status(store: RunStore) -> dict:
    """What the background worker is doing: ``{"state", "text", "running", "queued", "pid"}``.

    ``state`` is ``idle`` (nothing queued or running: no worker needed), ``training`` (``running`` holds the
    ids of the running runs), ``starting`` (runs are queued and a live worker has not taken one yet) or
    ``waiting`` (runs are queued and no worker lives; :func:`ensure_worker` starts one). ``queued`` counts
    the queued runs, ``pid`` is the live worker's on this host (or None), ``text`` says it in one sentence.
    """
    beat = live_worker()
    running = sorted(store.list_runs(status="running"), key=lambda run: run.id)
    queued = store.count_runs(status="queued")
    if running:
        more = f"; {queued} more queued" if queued else ""
        names = ", ".join(f"{run.id} ({run.backbone})" for run in running)
        state, text = "training", f"Training run{'s' if len(running) > 1 else ''} {names}{more}."
    elif not queued:
        state, text = "idle", "No worker needed: no run is queued."
    elif beat is not None:
        state, text = "starting", f"A worker is starting; {_runs(queued)} queued."
    else:
        state, text = "waiting", f"{_runs(queued)} queued; a worker will start."
    return {
        "state": state,
        "text": text,
        "running": [run.id for run in running],
        "queued": queued,
        "pid": beat["pid"] if beat is not None else None,
    }
