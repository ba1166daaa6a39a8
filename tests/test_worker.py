"""The background worker: trains queued runs, never the same run twice, survives a bad run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import subprocess_env

from bcd_engine.inference.loading import load_run_model
from bcd_engine.models.config import TrainConfig
from bcd_engine.processes import pid_alive
from bcd_engine.reports import runs as run_tables
from bcd_engine.store import Protocol, RunStore
from bcd_engine.training import queue, worker

pytest.importorskip("keras")


@pytest.fixture
def store(tmp_path, monkeypatch) -> RunStore:
    monkeypatch.setenv("BCD_DATABASE_URL", f"sqlite:///{tmp_path / 'results.db'}")
    monkeypatch.setenv("BCD_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("BCD_CACHE_DIR", str(tmp_path / "cache"))
    return RunStore.open()


def tiny(backbone: str = "scratch_cnn") -> TrainConfig:
    return TrainConfig.for_backbone(
        backbone, weights="none", image_size=32, epochs=1, batch_size=8, dense_units=8, augment=1, patience=1
    )


def test_worker_once_trains_a_queued_run_to_completed(store, synthetic_dataset):
    run_id = queue.queue_run(store, tiny("mobilenetv2"), synthetic_dataset)
    assert store.get_run(run_id).status == "queued"
    done = worker.run_worker(once=True, store=store, worker_id="w1")
    assert done == [{"run_id": run_id, "status": "completed"}]
    run = store.get_run(run_id)
    assert run.status == "completed" and run.test_accuracy is not None
    assert store.get_epochs(run_id) and run_tables.holdout_evaluation(store, run_id) is not None
    assert run_tables.default_run(store).id == run_id
    assert load_run_model(run_id, store=store).class_names == ["Benign", "Early", "Pre", "Pro"]
    assert worker.run_worker(once=True, store=store) == []  # queue empty: returns at once


def test_a_failing_run_is_marked_failed_and_the_queue_goes_on(store, synthetic_dataset, tmp_path):

    bad = store.create_run(
        backbone="scratch_cnn",
        protocol=Protocol.holdout(),
        config={"train": tiny().to_dict(), "data_dir": str(tmp_path / "missing")},
    )
    good = queue.queue_run(store, tiny(), synthetic_dataset)
    done = worker.run_worker(once=True, store=store)
    assert done == [{"run_id": bad, "status": "failed"}, {"run_id": good, "status": "completed"}]
    assert "does not exist" in store.get_run(bad).error


def test_two_concurrent_workers_train_each_run_exactly_once(store, synthetic_dataset):
    ids = [queue.queue_run(store, tiny(), synthetic_dataset) for _ in range(3)]
    command = [sys.executable, "-m", "bcd_engine", "worker", "--once", "--json"]
    env = {**subprocess_env(), "TF_CPP_MIN_LOG_LEVEL": "2"}
    workers = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in outputs]
    taken = [d["run_id"] for out, _ in outputs for d in json.loads(out)["runs"]]
    assert sorted(taken) == ids  # every run once, none twice
    for run_id in ids:
        assert store.get_run(run_id).status == "completed"
        assert len(store.get_evaluations(run_id)) == 1


def test_heartbeat_file_tells_whether_a_worker_lives(store):
    assert worker.live_worker() is None
    worker.write_heartbeat()
    assert worker.live_worker()["pid"] == os.getpid()
    worker.write_heartbeat(pid=2**22 + 12345)  # no such process
    assert worker.live_worker() is None


def test_ensure_worker_starts_one_only_when_runs_wait_and_none_lives(store, synthetic_dataset, monkeypatch):
    started = []
    monkeypatch.setattr(worker, "spawn_worker", lambda: started.append(1))
    assert worker.ensure_worker(store) is False
    queue.queue_run(store, tiny(), synthetic_dataset)
    assert worker.ensure_worker(store) is True and started == [1]
    worker.write_heartbeat()
    assert worker.ensure_worker(store) is False and started == [1]


@pytest.fixture
def spawned(monkeypatch):
    """The workers spawn_worker() starts in this test (also through ensure_worker); any still running at its end is
    stopped."""
    processes: list[subprocess.Popen] = []
    spawn = worker.spawn_worker
    monkeypatch.setattr(worker, "spawn_worker", lambda *options: processes.append(spawn(*options)) or processes[-1])
    yield processes
    for process in processes:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=30)


def reaped(processes: list[subprocess.Popen]) -> bool:
    """Whether every process has left and its exit status was collected (by the thread that waits for it)."""
    return all(process.returncode is not None for process in processes)


def failing_run(store: RunStore, tmp_path) -> int:
    """Queue a run whose data folder does not exist: a worker takes it and fails it within a second."""
    return store.create_run(
        backbone="scratch_cnn",
        protocol=Protocol.holdout(),
        config={"train": tiny().to_dict(), "data_dir": str(tmp_path / "missing")},
    )


def wait_until(condition, *, timeout: float, what: str) -> float:
    """Poll ``condition`` every 0.2 s (as the dashboard would, only faster); the seconds it took to hold."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.2)
    return time.monotonic() - start


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc: zombies cannot be told apart")
def test_a_zombie_child_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # never waited for: it stays a zombie
    try:
        wait_until(lambda: not pid_alive(child.pid), timeout=30, what="the child exiting")
        os.kill(child.pid, 0)  # its process entry is still there: pid_alive said no to a zombie
    finally:
        child.wait()


def test_a_spawned_worker_leaves_at_once_and_the_next_starts_right_after(store, spawned, tmp_path):
    process = worker.spawn_worker()
    pid = process.pid
    assert worker.live_worker()["pid"] == pid  # its heartbeat, written for it while it starts
    assert spawned == [process]
    wait_until(lambda: worker.live_worker() is None and reaped(spawned), timeout=40, what="the idle worker leaving")
    assert process.returncode == 0 and not pid_alive(pid)  # reaped by its waiting thread: no zombie left
    assert not worker.heartbeat_file().exists()
    run_id = failing_run(store, tmp_path)
    assert worker.ensure_worker(store) is True  # no wait for the old heartbeat to go stale
    wait_until(lambda: store.get_run(run_id).status == "failed", timeout=60, what="the queued run")
    wait_until(lambda: worker.live_worker() is None and reaped(spawned), timeout=40, what="the worker leaving")


def test_a_second_queued_run_starts_seconds_after_the_first_finishes(store, synthetic_dataset, spawned, tmp_path):
    first = queue.queue_run(store, tiny(), synthetic_dataset)
    assert worker.ensure_worker(store) is True
    wait_until(lambda: store.get_run(first).status == "completed", timeout=120, what="the first run")
    second = failing_run(store, tmp_path)  # queued as the worker leaves or after it left

    def taken() -> bool:
        worker.ensure_worker(store)  # what the Train page does every few seconds
        return store.get_run(second).status != "queued"

    # a worker's start-up at most, not the 60 s until the finished worker's heartbeat went stale
    wait_until(taken, timeout=30, what="the second run starting")
    wait_until(lambda: store.get_run(second).status == "failed", timeout=60, what="the second run")
    wait_until(lambda: worker.live_worker() is None and reaped(spawned), timeout=40, what="the worker leaving")


def test_a_leaving_worker_removes_its_own_heartbeat_and_never_another(store):
    path = worker.heartbeat_file()
    worker.write_heartbeat(pid=os.getppid(), worker_id="other")  # another process's
    worker.remove_heartbeat("me")
    assert json.loads(path.read_text())["worker_id"] == "other" and worker.live_worker()["pid"] == os.getppid()
    worker.write_heartbeat(worker_id="other")  # another worker in this process
    worker.remove_heartbeat("me")
    assert json.loads(path.read_text())["worker_id"] == "other"
    worker.write_heartbeat(worker_id="me")
    worker.remove_heartbeat("me")
    assert not path.exists()
    worker.remove_heartbeat("me")  # no file: nothing to do
    assert worker.run_worker(once=True, store=store, worker_id="me") == [] and not path.exists()
    assert list(path.parent.iterdir()) == []  # no temporary file left behind


def test_a_run_queued_as_a_once_worker_finds_the_queue_empty_is_still_trained(store, synthetic_dataset, monkeypatch):
    claim, late = store.claim_next_queued, []

    def claim_then_queue(**kwargs):
        run = claim(**kwargs)
        if run is None and not late:  # the dashboard queues a run just after the worker's look found none
            late.append(queue.queue_run(store, tiny(), synthetic_dataset))
        return run

    monkeypatch.setattr(store, "claim_next_queued", claim_then_queue)
    assert worker.run_worker(once=True, store=store) == [{"run_id": late[0], "status": "completed"}]
    assert not worker.heartbeat_file().exists()


def test_worker_status_says_what_the_worker_does(store, synthetic_dataset):
    assert worker.worker_status(store) == {
        "state": "idle",
        "text": "No worker needed: no run is queued.",
        "running": [],
        "queued": 0,
        "jobs_running": [],
        "jobs_queued": 0,
        "pid": None,
    }
    run_id = queue.queue_run(store, tiny(), synthetic_dataset)
    status = worker.worker_status(store)
    assert (status["state"], status["text"], status["queued"]) == ("waiting", "1 run queued; a worker will start.", 1)
    worker.write_heartbeat()
    status = worker.worker_status(store)
    assert (status["state"], status["text"], status["pid"]) == (
        "starting",
        "A worker is starting; 1 run queued.",
        os.getpid(),
    )
    store.claim_next_queued(worker_id="w1")
    queue.queue_run(store, tiny(), synthetic_dataset)
    status = worker.worker_status(store)
    assert (status["state"], status["running"], status["queued"]) == ("training", [run_id], 1)
    assert status["text"] == f"Training run {run_id} (scratch_cnn); 1 more queued."


def test_worker_status_counts_the_queue_in_the_store(store, synthetic_dataset, monkeypatch):
    for _ in range(3):
        queue.queue_run(store, tiny(), synthetic_dataset)
    loaded = []
    list_runs = store.list_runs
    monkeypatch.setattr(store, "list_runs", lambda **kwargs: loaded.append(kwargs) or list_runs(**kwargs))
    status = worker.worker_status(store)
    assert (status["state"], status["queued"]) == ("waiting", 3)
    assert {"status": "queued"} not in loaded  # counted by a query, not by loading every queued record
    assert (store.count_runs(), store.count_runs(status="queued"), store.count_runs(status="running")) == (3, 3, 0)
