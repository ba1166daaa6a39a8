"""One shared, bounded inference queue for a server process (the dashboard), whatever the number of visitors.

Every model call of the process runs on one thread, one small step at a time (a batch of images, a
Grad-CAM), taking the jobs in turn so that one visitor's thousand images never hold up another's one.
So however many sessions there are, the models are loaded once and at most one batch of decoded
images is in flight. At most ``max_jobs`` jobs wait; past that :meth:`InferenceQueue.submit` raises
:class:`~bcd_engine.errors.BusyError`. A job is dropped, between two steps, once it is cancelled or
its ``alive()`` says its visitor has gone.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

from bcd_engine.errors import BusyError, CancelledError

MAX_JOBS = 32  # waiting and running, all visitors together

Steps = Generator[tuple[int, int], None, Any]  # yields (done, total) after each step, returns the result
# (once done == total it is expected to return without more work)


class Job:
    """One visitor's work in the queue: progress, then its result or its error."""

    def __init__(self, steps: Steps, alive: Callable[[], bool] | None) -> None:
        self._steps = steps
        self._alive = alive
        self._finished = threading.Event()
        self._cancelled = threading.Event()
        self.progress: tuple[int, int] = (0, 0)
        self._result: Any = None
        self._error: BaseException | None = None

    def cancel(self) -> None:
        """Drop the job before its next step (a step already running ends first)."""
        self._cancelled.set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the job has ended (finished, failed or been dropped) within ``timeout`` seconds."""
        return self._finished.wait(timeout)

    def result(self) -> Any:
        """The job's result; its error re-raised; :class:`CancelledError` when it was dropped."""
        if not self._finished.is_set():
            raise RuntimeError("the job has not ended yet; wait() for it first")
        if self._error is not None:
            raise self._error
        return self._result

    def _wanted(self) -> bool:
        if self._cancelled.is_set():
            return False
        try:
            return self._alive is None or bool(self._alive())
        except Exception:  # noqa: BLE001 - a broken liveness check must not stop the queue; keep the job
            return True

    def _step(self) -> bool:
        """Run one step; True while steps remain."""
        if not self._wanted():
            self._steps.close()
            self._end(error=CancelledError("dropped: its visitor left or cancelled it"))
            return False
        try:
            self.progress = next(self._steps)
            if self.progress[0] >= self.progress[1]:  # all done: end now rather than a turn later
                next(self._steps)
            return True
        except StopIteration as stop:
            self._end(result=stop.value)
        except Exception as exc:  # noqa: BLE001 - the job's own error goes back to its caller
            self._end(error=exc)
        return False

    def _end(self, *, result: Any = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._finished.set()


class InferenceQueue:
    """Runs the jobs of every session on one thread, a step of each in turn."""

    def __init__(self, *, max_jobs: int = MAX_JOBS) -> None:
        self.max_jobs = max_jobs
        self._jobs: deque[Job] = deque()
        self._running = 0  # 1 while the thread runs a step of a job it has taken out of _jobs
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, steps: Steps, *, alive: Callable[[], bool] | None = None) -> Job:
        """Queue the generator ``steps`` (see :data:`Steps`); BusyError when ``max_jobs`` are already queued."""
        job = Job(steps, alive)
        with self._lock:
            if len(self._jobs) + self._running >= self.max_jobs:
                steps.close()
                raise BusyError(f"the server is busy ({self.max_jobs} jobs in its queue); try again in a minute")
            self._jobs.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="bcd-inference", daemon=True)
                self._thread.start()
            self._lock.notify()
        return job

    def call(self, function: Callable[[], Any], *, alive: Callable[[], bool] | None = None) -> Job:
        """Queue one call of ``function`` as a one-step job."""
        def steps() -> Steps:
            return function()
            yield (0, 1)  # never reached: it makes this a generator

        return self.submit(steps(), alive=alive)

    @property
    def waiting(self) -> int:
        """Jobs queued or running now."""
        with self._lock:
            return len(self._jobs) + self._running

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._jobs:
                    self._lock.wait()
                job = self._jobs.popleft()
                self._running = 1
            more = job._step()
            with self._lock:
                self._running = 0
                if more:
                    self._jobs.append(job)  # to the back: the others get their turn first
