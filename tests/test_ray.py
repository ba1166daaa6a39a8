"""Runs and folds on a real local Ray cluster (2 CPUs, started once for the module): the store says what to
train, Ray trains it; cancelling, a killed Ray worker process and a dataset a node cannot see."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import APP, workspace_store

from bcd_engine.cli import main
from bcd_engine.models.config import TrainConfig
from bcd_engine.protocols.crossval import cross_validate
from bcd_engine.store import Protocol, RunStore
from bcd_engine.training import queue

ray = pytest.importorskip("ray")
from bcd_engine.training import ray_executor  # noqa: E402 - only with Ray installed

CLASSES = ["Benign", "Early", "Pre", "Pro"]


@pytest.fixture(scope="module")
def cluster():
    """A private local Ray cluster with 2 CPUs and a small object store, shared by the module's tests (never one
    a `ray start` left running)."""
    ray.init(
        address="local", num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, logging_level="ERROR"
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory, cluster) -> RunStore:
    """One store for the module: its tasks share one runtime environment, so Ray reuses their worker processes
    (TensorFlow imported once) from test to test."""
    root = tmp_path_factory.mktemp("ray-store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
        yield workspace_store(root, patch)


def tiny(backbone: str = "scratch_cnn", **overrides) -> TrainConfig:
    values = dict(weights="none", image_size=32, epochs=1, batch_size=8, dense_units=8, augment=1, patience=1)
    return TrainConfig.for_backbone(backbone, **{**values, **overrides})


def long_run(store: RunStore, data: Path) -> int:
    """A queued run that trains for minutes unless stopped (many epochs, no early stop)."""
    return queue.queue_run(store, tiny(epochs=2000, patience=2000), data)


def in_background(**options) -> tuple[threading.Thread, list]:
    """``run_ray_worker(once=True)`` in a thread; the list gets its result."""
    result: list = []
    thread = threading.Thread(
        target=lambda: result.append(ray_executor.run_ray_worker(address=None, once=True, poll_seconds=0.5, **options)),
        daemon=True,
    )
    thread.start()
    return thread, result


def wait_until_training(store: RunStore, run_id: int, timeout: float = 120) -> None:
    """Until a Ray task has taken the run over and logged an epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = store.get_run(run_id)
        if run.pid not in (None, os.getpid()) and store.get_epochs(run_id):
            return
        assert run.status in ("queued", "running"), (run.status, run.error)
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} did not start training on Ray within {timeout} s")


def test_queued_runs_train_on_ray_and_a_missing_dataset_fails_clearly(store, synthetic_dataset, tmp_path):
    ids = [
        queue.queue_run(store, tiny("scratch_cnn"), synthetic_dataset),
        queue.queue_run(store, tiny("mobilenetv2"), synthetic_dataset),
    ]
    unseen = store.create_run(
        backbone="scratch_cnn",
        protocol=Protocol.holdout(),
        config={"train": tiny().to_dict(), "data_dir": str(tmp_path / "not-here")},
    )
    done = ray_executor.run_ray_worker(address=None, once=True, poll_seconds=0.5)
    assert sorted(done, key=lambda d: d["run_id"]) == [
        {"run_id": ids[0], "status": "completed"},
        {"run_id": ids[1], "status": "completed"},
        {"run_id": unseen, "status": "failed"},
    ]
    node = ray.util.get_node_ip_address()
    for run_id in ids:
        run = store.get_run(run_id)
        assert run.worker_id.startswith(f"ray:{node}:") and run.pid != os.getpid()
        assert run.test_accuracy is not None and store.get_artifacts(run_id)
    error = store.get_run(unseen).error
    assert error.startswith("DataError: data folder") and f"is not visible on node {node}" in error
    status = ray_executor.cluster_status("auto", store=store)
    assert status["cpus"] == 2 and len(status["nodes"]) == 1 and status["running"] == [] and status["queued"] == 0


def test_cv_on_ray_gives_the_folds_and_json_of_the_local_executor(store, synthetic_dataset):
    config = tiny("scratch_cnn")
    local = cross_validate(config, synthetic_dataset, folds=2, store=store)
    on_ray = cross_validate(config, synthetic_dataset, folds=2, store=store, executor=ray_executor.RayExecutor(None))
    local, on_ray = local.to_dict(), on_ray.to_dict()  # compared in the shape the CLI's JSON has
    assert json.loads(json.dumps(on_ray)).keys() == local.keys()
    assert on_ray["protocol"] == local["protocol"]
    strip = [{k: v for k, v in row.items() if k not in ("run_id", "accuracy", "macro_auc")} for row in local["folds"]]
    assert [
        {k: v for k, v in row.items() if k not in ("run_id", "accuracy", "macro_auc")} for row in on_ray["folds"]
    ] == strip
    assert [row.keys() for row in on_ray["folds"]] == [row.keys() for row in local["folds"]]
    for row in on_ray["folds"]:
        run = store.get_run(row["run_id"])
        assert run.status == "completed" and run.protocol == Protocol.kfold(row["fold"], folds=2)
        assert run.pid != os.getpid()
        assert store.get_split(row["run_id"]) == store.get_split(local["folds"][row["fold"] - 1]["run_id"])


def test_lodo_on_ray_gives_the_rounds_and_json_of_the_local_executor(store, tmp_path):
    from bcd_engine.data.synthetic import make_synthetic_dataset
    from bcd_engine.protocols.lodo import leave_one_dataset_out

    datasets = {
        name: str(make_synthetic_dataset(tmp_path / name, n_per_class=8, image_size=32, seed=seed, class_names=CLASSES))
        for seed, name in enumerate(("alpha", "beta"))
    }
    config = tiny("scratch_cnn")
    local = leave_one_dataset_out(config, datasets, store=store, workdir=tmp_path / "local")
    on_ray = leave_one_dataset_out(
        config, datasets, store=store, workdir=tmp_path / "ray", executor=ray_executor.RayExecutor(None)
    )
    local, on_ray = local.to_dict(), on_ray.to_dict()  # compared in the shape the CLI's JSON has
    assert json.loads(json.dumps(on_ray)).keys() == local.keys()
    assert [(r["held_out"], r["status"]) for r in on_ray["rounds"]] == [
        (r["held_out"], r["status"]) for r in local["rounds"]
    ]
    assert [r.keys() for r in on_ray["rounds"]] == [r.keys() for r in local["rounds"]]
    assert [r["status"] for r in on_ray["rounds"]] == ["completed", "completed"]
    for row in on_ray["rounds"]:
        run = store.get_run(row["run_id"])
        assert run.status == "completed" and run.protocol == Protocol.lodo(row["held_out"])
        assert run.pid != os.getpid()


def test_a_run_on_ray_is_cancelled_through_the_store(store, synthetic_dataset):
    run_id = long_run(store, synthetic_dataset)
    thread, result = in_background()
    wait_until_training(store, run_id)
    store.request_cancel(run_id)
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert result == [[{"run_id": run_id, "status": "cancelled"}]]
    assert store.get_run(run_id).status == "cancelled"


def test_a_killed_ray_worker_leaves_its_run_interrupted_and_the_others_going(store, synthetic_dataset):
    victim = long_run(store, synthetic_dataset)
    other = queue.queue_run(store, tiny(), synthetic_dataset)
    thread, result = in_background()
    wait_until_training(store, victim)
    os.kill(store.get_run(victim).pid, signal.SIGKILL)
    thread.join(timeout=180)
    assert not thread.is_alive()
    assert sorted(result[0], key=lambda d: d["run_id"]) == [
        {"run_id": victim, "status": "interrupted"},
        {"run_id": other, "status": "completed"},
    ]
    run = store.get_run(victim)
    assert run.status == "interrupted" and run.error.startswith("interrupted: ") and run.finished_at is not None
    with sqlite3.connect(Path(store.url.removeprefix("sqlite:///"))) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert store.list_runs(status="running") == []


def test_queue_command_prints_the_queued_run(store, synthetic_dataset, capfd):
    code = main(
        [
            "queue",
            "--data",
            str(synthetic_dataset),
            "--backbone",
            "scratch_cnn",
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--json",
        ]
    )
    out = capfd.readouterr()
    assert code == 0, out.err[-2000:]
    payload = json.loads(out.out)
    assert payload == {"run_id": payload["run_id"], "status": "queued"}
    run = store.get_run(payload["run_id"])
    assert run.status == "queued" and run.config["train"]["image_size"] == 32 and run.config["train"]["epochs"] == 1


def test_without_ray_the_cluster_options_say_how_to_install_it(store, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as it does where Ray is not installed
    code = main(["worker", "--executor", "ray", "--once"])
    assert code == 2
    assert "bcd: error: Ray is not installed: pip install -r requirements-cluster.txt" in capfd.readouterr().err


def test_the_train_page_hands_queued_runs_to_the_cluster_and_shows_it(store, synthetic_dataset, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from bcd_engine.training import worker

    address = ray.get_runtime_context().gcs_address
    monkeypatch.setenv("BCD_RAY_ADDRESS", address)
    spawned = []
    monkeypatch.setattr(worker, "spawn_worker", lambda *options: spawned.append(options) or 0)
    run_id = queue.queue_run(store, tiny(), synthetic_dataset)
    try:
        at = AppTest.from_file(APP, default_timeout=120)
        at.run()
        at.switch_page("pages/train.py").run()
        assert not at.exception, at.exception
        assert spawned and spawned[0] == ("--executor", "ray", "--ray-address", address)
        metrics = {m.label: m.value for m in at.metric}
        assert metrics["Nodes alive"] == "1" and metrics["CPUs free"].endswith(" of 2")
        assert metrics["GPUs free"] == "0 of 0" and metrics["Runs in flight"] == "0"
    finally:
        store.request_cancel(run_id)  # the module's later tests must not train it
