"""The shared inference queue: every session's model calls on one thread, in turns, bounded, dropped when unwanted."""

from __future__ import annotations

import threading

import pytest

from bcd_engine.errors import BusyError, CancelledError, ImageLoadError
from bcd_engine.inference.service import InferenceQueue


def _steps(name: str, n: int, log: list[str], gate: threading.Event | None = None):
    for i in range(n):
        if gate is not None:
            gate.wait(10)
        log.append(f"{name}{i}")
        yield i + 1, n
    return f"{name} done"


def test_jobs_take_turns_so_a_big_one_does_not_hold_up_a_small_one():
    queue, log, gate = InferenceQueue(), [], threading.Event()
    big = queue.submit(_steps("big", 6, log, gate))
    small = queue.submit(_steps("small", 1, log, gate))
    gate.set()
    assert small.wait(10) and big.wait(10)
    assert log.index("small0") <= 2, log
    assert big.result() == "big done" and small.result() == "small done"
    assert big.progress == (6, 6)


def test_a_full_queue_refuses_new_work_and_closes_it():
    queue, log, gate = InferenceQueue(max_jobs=2), [], threading.Event()
    first = queue.submit(_steps("a", 1, log, gate))
    second = queue.submit(_steps("b", 1, log, gate))
    closed = []

    def refused():
        try:
            yield 0, 1
        finally:
            closed.append(True)

    generator = refused()
    next(generator)  # started, so that closing it runs its finally
    with pytest.raises(BusyError, match="busy"):
        queue.submit(generator)
    assert closed == [True]
    gate.set()
    assert first.wait(10) and second.wait(10)
    assert queue.submit(_steps("c", 1, log)).wait(10)  # room again once the others ended


def test_a_cancelled_job_or_one_whose_visitor_left_is_dropped_between_steps():
    queue, log, gate = InferenceQueue(), [], threading.Event()
    cancelled = queue.submit(_steps("cancelled", 50, log, gate))
    present = {"here": True}
    departed = queue.submit(_steps("departed", 50, log, gate), alive=lambda: present["here"])
    cancelled.cancel()
    present["here"] = False
    gate.set()
    assert cancelled.wait(10) and departed.wait(10)
    assert sum(entry.startswith("cancelled") for entry in log) <= 1  # at most the step already running
    assert sum(entry.startswith("departed") for entry in log) <= 1
    for job in (cancelled, departed):
        with pytest.raises(CancelledError, match="dropped"):
            job.result()


def test_a_failing_job_returns_its_error_and_the_queue_goes_on():
    queue = InferenceQueue()

    def fails():
        yield 1, 2
        raise ImageLoadError("not a recognised image format")

    failing = queue.submit(fails())
    assert failing.wait(10)
    with pytest.raises(ImageLoadError, match="not a recognised"):
        failing.result()
    one_call = queue.call(lambda: threading.current_thread().name)
    assert one_call.wait(10) and one_call.result() == "bcd-inference"  # every call runs on the queue's thread


def test_a_job_ends_in_the_turn_of_its_last_step_not_a_round_later():
    queue, gate, seen = InferenceQueue(), threading.Event(), []
    jobs = {}

    def big():
        for i in range(4):
            gate.wait(10)
            seen.append(jobs["small"].done)
            yield i + 1, 4

    jobs["big"] = queue.submit(big())
    jobs["small"] = queue.submit(_steps("small", 1, [], gate))
    gate.set()
    assert jobs["big"].wait(10)
    assert seen[1:] == [True, True, True]  # over before big's second step, though its generator had not returned
