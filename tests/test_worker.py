"""The background worker: trains queued runs, never the same run twice, survives a bad run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import subprocess_env

from bcd_engine.inference.loading import load_run_model
from bcd_engine.models.config import TrainConfig
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
    return TrainConfig.for_backbone(backbone, weights="none", image_size=32, epochs=1, batch_size=8,
                                    dense_units=8, augment=1, patience=1)


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

    bad = store.create_run(backbone="scratch_cnn", protocol=Protocol.holdout(),
                           config={"train": tiny().to_dict(), "data_dir": str(tmp_path / "missing")})
    good = queue.queue_run(store, tiny(), synthetic_dataset)
    done = worker.run_worker(once=True, store=store)
    assert done == [{"run_id": bad, "status": "failed"}, {"run_id": good, "status": "completed"}]
    assert "does not exist" in store.get_run(bad).error


def test_two_concurrent_workers_train_each_run_exactly_once(store, synthetic_dataset):
    ids = [queue.queue_run(store, tiny(), synthetic_dataset) for _ in range(3)]
    command = [sys.executable, "-m", "bcd_engine", "worker", "--once", "--json"]
    env = {**subprocess_env(), "TF_CPP_MIN_LOG_LEVEL": "2"}
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
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
