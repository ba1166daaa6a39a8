"""The class worker: one child process per server that trains every class-mode head, away from the web server.

Streamlit collects garbage and clears Keras' session after every script run (each refresh of each open page); in
the server's own process that stalls a training thread for seconds at a time (on a busy two-core machine a head that
trains in 3 s took over a minute). A child process of its own trains at the machine's speed. The class queue's thread
drives it one step at a time over a pipe (:class:`RemoteTraining`), so the queue still takes the sessions in turn,
an epoch each, and the child holds at most one step of work at once. The child loads each pack once and keeps it.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path

from bcd_engine.classroom.pack import ClassPack, load_pack, prepare_pack
from bcd_engine.classroom.session import (
    MAX_SECONDS,
    ClassResult,
    EpochScores,
    HeadSettings,
    HeadTraining,
    TrainingJob,
)
from bcd_engine.errors import BCDError
from bcd_engine.inference.service import Steps

# Which pack a training uses: (class folder, pack name) of a saved pack, or None for the SYNTHETIC default pack,
# which the worker computes in memory on first use (nothing written).
PackRef = tuple[str, str] | None


class ClassWorker:
    """The child process (:func:`serve` on its end of a socket pair) and the socket to it; one request at a time
    (a lock keeps the socket's turns). The child ends when the socket closes, with the server.

    A plain subprocess, not ``multiprocessing``'s spawn: that would run the server's ``__main__``, which inside a
    Streamlit script run is the app's own script.
    """

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-c", f"from bcd_engine.classroom.worker import serve; serve({theirs.fileno()})"],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        self._conn = Connection(ours.detach())
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def request(self, message: tuple, *, reply: bool = True):
        """Send ``message``; with ``reply`` wait for the answer and return it (its error raised as a BCDError)."""
        with self._lock:
            try:
                self._conn.send(message)
                if not reply:
                    return None
                kind, payload = self._conn.recv()
            except (EOFError, OSError) as exc:
                raise BCDError("the class worker stopped; start the training again") from exc
        if kind == "error":
            raise payload
        return payload

    def prepare(self, source: PackRef) -> None:
        """Have the worker load (or, for the default, compute) the pack now, before a student asks for it."""
        self.request(("prepare", 0, source), reply=False)


_worker: ClassWorker | None = None
_worker_lock = threading.Lock()


def class_worker() -> ClassWorker:
    """The server's class worker, started on first use and again if it has died."""
    global _worker
    with _worker_lock:
        if _worker is None or not _worker.alive:
            _worker = ClassWorker()
        return _worker


_job_ids = itertools.count(1)


class RemoteTraining(TrainingJob):
    """A :class:`~bcd_engine.classroom.session.HeadTraining` run by the class worker: the same ``settings``,
    ``history`` (an epoch at a time, as the worker reports them) and :meth:`steps` (its result a ClassResult).

    ``max_views`` is what the pack holds (the settings are checked against it here, and again in the worker).
    """

    def __init__(
        self, source: PackRef, settings: HeadSettings, *, max_views: int, max_seconds: float = MAX_SECONDS
    ) -> None:
        super().__init__(settings, max_views=max_views, max_seconds=max_seconds)
        self.source = source

    def steps(self) -> Steps:
        """One worker step per step (yielding (epochs done, epochs)); returns the ClassResult. Closing it early
        (the job dropped) drops the training in the worker too."""
        worker = class_worker()
        job_id = next(_job_ids)
        worker.request(("open", job_id, self.source, self.settings, self.max_seconds))
        result: ClassResult | None = None
        try:
            while result is None:
                new, result = worker.request(("step", job_id))
                recorded = self._record(new)
                if result is None:
                    yield recorded, self.settings.epochs
            return result
        finally:
            if result is None and worker.alive:
                worker.request(("close", job_id), reply=False)


def _serve(conn) -> None:
    """The worker's loop: open, step and close trainings as the server asks, until the pipe closes."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    packs: dict[object, tuple[object, ClassPack]] = {}
    jobs: dict[int, tuple[HeadTraining, Steps]] = {}
    while True:
        try:
            kind, job_id, *args = conn.recv()
        except EOFError:
            return
        try:
            if kind == "prepare":
                _pack(packs, args[0])
            elif kind == "open":
                source, settings, max_seconds = args
                training = HeadTraining(_pack(packs, source), settings, max_seconds=max_seconds)
                jobs[job_id] = (training, training.steps())
                conn.send(("opened", None))
            elif kind == "step":
                conn.send(("step", _step(jobs, job_id)))
            elif kind == "close" and job_id in jobs:
                jobs.pop(job_id)[1].close()
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the server as a BCDError
            jobs.pop(job_id, None)
            if kind in ("open", "step"):
                error = exc if isinstance(exc, BCDError) else BCDError(f"{type(exc).__name__}: {exc}")
                conn.send(("error", error))


def _step(jobs: dict[int, tuple[HeadTraining, Steps]], job_id: int) -> tuple[list[EpochScores], ClassResult | None]:
    """Advance one training by a step: (the epochs it added, its result once it has ended)."""
    training, steps = jobs[job_id]
    done = len(training.history)
    try:
        next(steps)
    except StopIteration as stop:
        del jobs[job_id]
        return training.history[done:], stop.value
    return training.history[done:], None


def _pack(packs: dict, source: PackRef) -> ClassPack:
    """The pack ``source`` names, loaded once (again when its folder has been rewritten)."""
    if source is None:
        key, stamp = None, None
    else:
        key = Path(*source)
        stamp = (key / "pack.json").stat().st_mtime_ns if (key / "pack.json").exists() else None
    if key not in packs or packs[key][0] != stamp:
        packs[key] = (stamp, prepare_pack(None, use_feature_cache=False) if key is None else load_pack(key))
    return packs[key][1]


def serve(fd: int) -> None:
    """The class worker process's entry point: serve the server on the socket ``fd`` until it closes."""
    _serve(Connection(fd))
