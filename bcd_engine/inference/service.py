"""One shared, bounded inference queue for a server process (the dashboard), whatever the number of visitors.

Every model call of the process runs on one thread, one small step at a time (a batch of images, a
Grad-CAM), taking the visitors in turn (round robin by visitor, then by job) so that one visitor's
thousand images or many tabs never hold up another's one image by more than one step. So however many
sessions there are, the models are loaded once and at most one batch of decoded images is in flight.
At most ``max_jobs`` jobs wait, ``max_jobs_per_visitor`` of one visitor, and a visitor sends at most
``images_per_minute`` images; past any of those :meth:`InferenceQueue.submit` raises
:class:`~bcd_engine.errors.BusyError` saying which. A job is dropped, between two steps, once it is
cancelled or its ``alive()`` says its visitor has gone. :func:`shared_queue` is the process's one queue:
it lives as long as the process, whatever any cache holds.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator
from typing import Any

from bcd_engine.errors import BusyError, CancelledError

MAX_JOBS = 32  # waiting and running, all visitors together
MAX_JOBS_PER_VISITOR = 3  # waiting and running, one visitor (all their tabs)
IMAGES_PER_MINUTE = 2000  # one visitor's images over the last minute (an upload holds at most 1,000)
# Images one step of a visitor's job should hold: what another visitor's turn may wait for. On 2 cores a ResNet50
# step of 4 images x 8 test-time views takes about 1.5 s and is as fast per image as a step of 16 (about 6 s).
STEP_IMAGES = 4
_WINDOW_S = 60.0

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
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

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
    """Runs the jobs of every visitor on one thread, a step of each visitor's in turn."""

    def __init__(
        self,
        *,
        max_jobs: int = MAX_JOBS,
        max_jobs_per_visitor: int = MAX_JOBS_PER_VISITOR,
        images_per_minute: int = IMAGES_PER_MINUTE,
    ) -> None:
        self.max_jobs = max_jobs
        self.max_jobs_per_visitor = max_jobs_per_visitor
        self.images_per_minute = images_per_minute
        self._turns: OrderedDict[object, deque[Job]] = OrderedDict()  # visitor -> their waiting jobs, in turn order
        self._running: tuple[object, Job] | None = None  # the (visitor, job) whose step the thread runs now
        self._sent: dict[object, deque[tuple[float, int]]] = {}  # visitor -> (time, images) of the last minute
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(
        self, steps: Steps, *, alive: Callable[[], bool] | None = None, visitor: object = None, images: int = 0
    ) -> Job:
        """Queue the generator ``steps`` (see :data:`Steps`) for ``visitor`` (any hashable key), who sends
        ``images`` images with it; BusyError, and ``steps`` closed, when the queue or the visitor's share is full.

        A job without a visitor takes its own turns and has no share to keep to (the command line, tests).
        """
        job = Job(steps, alive)
        key = job if visitor is None else visitor
        with self._lock:
            try:
                self._admit(visitor, images)
            except BusyError:
                steps.close()
                raise
            self._turns.setdefault(key, deque()).append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="bcd-inference", daemon=True)
                self._thread.start()
            self._lock.notify()
        return job

    def _admit(self, visitor: object, images: int) -> None:
        """Charge ``images`` to ``visitor``'s minute, or raise BusyError naming the limit reached (under the lock)."""
        if self._count() >= self.max_jobs:
            raise BusyError(f"the server is busy ({self.max_jobs} jobs in its queue); try again in a minute")
        if visitor is None:
            return
        mine = self._count(visitor)
        if mine >= self.max_jobs_per_visitor:
            raise BusyError(f"you already have {mine} jobs waiting; wait for them to finish before starting another")
        now = time.monotonic()
        for key in list(self._sent):  # forget what left the window, and visitors with nothing in it
            window = self._sent[key]
            while window and window[0][0] <= now - _WINDOW_S:
                window.popleft()
            if not window:
                del self._sent[key]
        window = self._sent.setdefault(visitor, deque())
        sent = sum(n for _, n in window)
        if sent + images > self.images_per_minute:
            wait = _WINDOW_S - (now - window[0][0]) if window else _WINDOW_S
            raise BusyError(
                f"you sent {sent} images in the last minute and may send {self.images_per_minute} a "
                f"minute; try these {images} again in {wait:.0f} s"
            )
        window.append((now, images))

    def call(
        self, function: Callable[[], Any], *, alive: Callable[[], bool] | None = None, visitor: object = None
    ) -> Job:
        """Queue one call of ``function`` as a one-step job of one image."""

        def steps() -> Steps:
            return function()
            yield (0, 1)  # never reached: it makes this a generator

        return self.submit(steps(), alive=alive, visitor=visitor, images=1)

    @property
    def waiting(self) -> int:
        """Jobs queued or running now."""
        with self._lock:
            return self._count()

    def _count(self, visitor: object = None) -> int:
        """Jobs queued or running now: all of them, or ``visitor``'s not yet cancelled (a page run that the
        visitor replaced cancels its job, which leaves at its next turn without running a step) (under the lock)."""
        if visitor is None:
            return sum(map(len, self._turns.values())) + (self._running is not None)
        running = self._running is not None and self._running[0] == visitor
        return sum(not job.cancelled for job in self._turns.get(visitor, ())) + running

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._turns:
                    self._lock.wait()
                key, jobs = next(iter(self._turns.items()))  # the visitor whose turn it is
                job = jobs.popleft()
                if not jobs:
                    del self._turns[key]
                self._running = (key, job)
            more = job._step()
            with self._lock:
                self._running = None
                if more:
                    self._turns.setdefault(key, deque()).append(job)  # behind the visitor's other jobs
                if key in self._turns:  # behind every other visitor, those who came during the step included
                    self._turns.move_to_end(key)


_shared: InferenceQueue | None = None
_shared_lock = threading.Lock()


def shared_queue() -> InferenceQueue:
    """The process's one inference queue, made on first use and kept for the life of the process."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = InferenceQueue()
        return _shared
