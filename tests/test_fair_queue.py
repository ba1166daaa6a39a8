"""Fair shares on the shared inference queue: visitors take turns, each within a few jobs and images a minute."""

from __future__ import annotations

import threading

import pytest

from bcd_engine.errors import BusyError
from bcd_engine.inference.service import InferenceQueue

WAIT = 30  # seconds a test waits for an event at most (never a fixed sleep)


def _steps(name: str, n: int, log: list[str], gate: threading.Event, started: threading.Event | None = None):
    for i in range(n):
        if started is not None:
            started.set()
        assert gate.wait(WAIT)
        log.append(f"{name}{i}")
        yield i + 1, n
    return name


def test_one_visitors_thirty_jobs_hold_up_anothers_one_by_one_step():
    queue, log, gate, started = InferenceQueue(max_jobs_per_visitor=30), [], threading.Event(), threading.Event()
    many = [
        queue.submit(_steps(f"a{k}.", 2, log, gate, started if k == 0 else None), visitor="session a", images=16)
        for k in range(30)
    ]
    assert started.wait(WAIT)  # the thread is inside the first step of session a's first job
    one = queue.submit(_steps("b.", 1, log, gate), visitor="session b", images=1)
    gate.set()
    assert one.wait(WAIT) and all(job.wait(WAIT) for job in many)
    assert log[:2] == ["a0.0", "b.0"], log[:5]  # answered right after the step that was running
    assert one.result() == "b."


def test_a_visitor_over_their_share_of_jobs_is_told_so_and_others_still_get_in():
    queue, log, gate = InferenceQueue(max_jobs_per_visitor=3), [], threading.Event()
    mine = [queue.submit(_steps(f"a{k}.", 1, log, gate), visitor="ip 203.0.113.7") for k in range(3)]
    closed = threading.Event()

    def refused():
        try:
            yield 0, 1
        finally:
            closed.set()

    generator = refused()
    next(generator)
    with pytest.raises(BusyError, match="you already have 3 jobs waiting; wait for them"):
        queue.submit(generator, visitor="ip 203.0.113.7")
    assert closed.is_set()
    other = queue.submit(_steps("b.", 1, log, gate), visitor="ip 198.51.100.2")
    gate.set()
    assert other.wait(WAIT) and all(job.wait(WAIT) for job in mine)
    assert queue.submit(_steps("a3.", 1, log, gate), visitor="ip 203.0.113.7").wait(WAIT)  # room once they ended


def test_a_visitor_past_their_images_a_minute_is_refused_until_the_minute_passes():
    queue = InferenceQueue(images_per_minute=1000)
    log, gate = [], threading.Event()
    gate.set()
    assert queue.submit(_steps("a.", 1, log, gate), visitor="session a", images=990).wait(WAIT)
    with pytest.raises(BusyError, match="you sent 990 images in the last minute and may send 1000 a minute"):
        queue.submit(_steps("a2.", 1, log, gate), visitor="session a", images=11)
    assert queue.submit(_steps("b.", 1, log, gate), visitor="session b", images=1000).wait(WAIT)
    assert queue.submit(_steps("a3.", 1, log, gate), visitor="session a", images=10).wait(WAIT)  # within the minute


def test_the_whole_queue_still_has_one_bound_for_all_visitors():
    queue, log, gate = InferenceQueue(max_jobs=4), [], threading.Event()
    jobs = [queue.submit(_steps(f"v{k}.", 1, log, gate), visitor=f"session {k}") for k in range(4)]
    with pytest.raises(BusyError, match="the server is busy"):
        queue.submit(_steps("late.", 1, log, gate), visitor="session late")
    gate.set()
    assert all(job.wait(WAIT) for job in jobs)


def test_jobs_a_visitor_cancelled_leave_room_in_their_share_at_once():
    queue, log, gate = InferenceQueue(max_jobs_per_visitor=2), [], threading.Event()
    replaced = [queue.submit(_steps(f"old{k}.", 1, log, gate), visitor="session a") for k in range(2)]
    for job in replaced:  # the visitor changed their upload twice: each page run cancels its job
        job.cancel()
    current = queue.submit(_steps("new.", 1, log, gate), visitor="session a")
    gate.set()
    assert current.wait(WAIT) and all(job.wait(WAIT) for job in replaced)
    assert "new.0" in log
