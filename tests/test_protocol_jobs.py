"""Protocols queued from the dashboard: the store's job queue, the worker running jobs, and a k-fold CV, a LODO, a
classical baseline and a colour-robustness check queued from the Train page that complete and show on the Compare
page."""

from __future__ import annotations

import json
import threading

import pytest
from helpers import APP
from streamlit.testing.v1 import AppTest
from test_app import frame_with

from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.synthetic import make_synthetic_dataset
from bcd_engine.errors import RecordError
from bcd_engine.protocols import jobs as protocol_jobs
from bcd_engine.store import JobQueue, Protocol, RunStore
from bcd_engine.training import queue, worker

LABEL_MAP = {
    "alpha": {"Benign": "benign", "Early": "malignant", "Pre": "malignant", "Pro": "malignant"},
    "beta": {"normal": "benign", "blast": "malignant"},
}


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Empty store, artifacts and cache under tmp_path; no worker process is ever spawned."""
    url = f"sqlite:///{tmp_path / 'results.db'}"
    monkeypatch.setenv("BCD_DATABASE_URL", url)
    monkeypatch.setenv("BCD_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("BCD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BCD_DEMO_MODE", raising=False)
    monkeypatch.delenv("BCD_RAY_ADDRESS", raising=False)
    spawned = []
    monkeypatch.setattr(worker, "spawn_worker", lambda *options: spawned.append(options) or 0)
    return {"url": url, "spawned": spawned, "store": RunStore.open(url)}


def test_the_job_queue_hands_each_job_out_once_and_cancels_a_queued_one_at_once(workspace):
    jobs = JobQueue(workspace)
    first = jobs.put("baseline", {"model": "svm", "data_dir": "/d", "folds": None, "seed": 0})
    second = jobs.put("robustness", {"run_id": 7, "backbone": "resnet50"})
    with pytest.raises(RecordError, match="job kind must be one of cv, lodo, baseline, robustness"):
        jobs.put("train", {})
    claimed = jobs.claim_next(worker_id="w1")
    assert (claimed.id, claimed.status, claimed.worker_id) == (first, "running", "w1")
    assert claimed.name == f"job {first}: classical baseline (svm)"
    jobs.request_cancel(second)
    assert jobs.get(second).status == "cancelled" and jobs.claim_next(worker_id="w2") is None
    jobs.request_cancel(first)
    assert jobs.get(first).cancel_requested and jobs.get(first).status == "running"
    jobs.finish(first, status="completed", result={"test_accuracy": 0.5})
    assert jobs.get(first).result == {"test_accuracy": 0.5}
    assert [job.id for job in jobs.list()] == [second, first]


def test_a_cancelled_job_passes_the_cancel_on_to_the_run_it_is_training(workspace):
    jobs = JobQueue(workspace)
    job_id = jobs.put("cv", {"backbone": "scratch_cnn", "folds": 2})
    seen = threading.Event()

    def fake_cv(store: RunStore, job) -> dict:
        """A fold that trains until it is told to stop, as train() does; the user cancels the job meanwhile."""
        run_id = store.create_run(backbone="scratch_cnn", protocol=Protocol.kfold(1, folds=2), config={})
        store.start_run(run_id, environment={})
        jobs.request_cancel(job.id)
        for _ in range(100):
            if store.is_cancel_requested(run_id):
                seen.set()
                store.finish_run(run_id, status="cancelled", error="cancelled by user")
                break
            threading.Event().wait(0.1)
        return {"folds": []}

    done = worker.run_worker(store=workspace, once=True, run_job=fake_cv)
    assert seen.is_set()
    assert done == [{"job_id": job_id, "status": "cancelled"}]
    assert jobs.get(job_id).status == "cancelled"


def _submit(at: AppTest, label: str) -> None:
    at.button(key=f"FormSubmitter:train_form-{label}").click().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])


def test_a_cv_a_lodo_a_baseline_and_a_robustness_check_queued_from_the_train_page_complete_and_show_in_compare(
    isolated, synthetic_dataset, tmp_path
):
    alpha = make_synthetic_dataset(tmp_path / "alpha", n_per_class=5, image_size=32, seed=1)
    beta = make_synthetic_dataset(
        tmp_path / "beta", n_per_class=6, image_size=32, seed=2, class_names=("normal", "blast")
    )
    store = isolated["store"]
    queue.register_dataset(store, scan_dataset(synthetic_dataset))  # as the Explorer's "Train on this dataset" does
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    at.switch_page("pages/train.py").run()
    at.multiselect(key="train_backbones_sel").set_value(["scratch_cnn"])
    at.radio(key="train_protocol").set_value("cv").run()
    for key, value in (("image_size", 32), ("epochs", 1), ("batch_size", 8), ("dense_units", 8), ("augment", 1)):
        at.number_input(key=f"train_{key}").set_value(value)
    at.text_input(key="train_folder").input(str(synthetic_dataset))
    at.number_input(key="train_folds").set_value(2)
    _submit(at, "Queue cross-validation")

    at.radio(key="train_protocol").set_value("lodo").run()
    at.text_area(key="train_lodo_folders").input(f"alpha={alpha}\nbeta={beta}")
    at.text_area(key="train_lodo_map").input(json.dumps(LABEL_MAP))
    _submit(at, "Queue leave-one-dataset-out")

    options = at.selectbox(key="train_baseline_dataset").options
    at.selectbox(key="train_baseline_dataset").select_index(
        next(i for i, o in enumerate(options) if str(synthetic_dataset) in o)
    )
    at.number_input(key="train_baseline_folds").set_value(2)
    at.button(key="FormSubmitter:train_baseline_form-Queue baseline").click().run()
    assert not at.exception and not at.error

    cv, lodo, baseline = sorted(JobQueue(store).list(), key=lambda job: job.id)
    assert [(job.kind, job.status) for job in (cv, lodo, baseline)] == [
        ("cv", "queued"),
        ("lodo", "queued"),
        ("baseline", "queued"),
    ]
    assert cv.params["folds"] == 2 and cv.params["train"]["image_size"] == 32
    assert lodo.params["datasets"] == {"alpha": str(alpha), "beta": str(beta)} and lodo.params["label_map"] == LABEL_MAP
    assert isolated["spawned"]  # the page asked for a worker
    assert list(frame_with(at, "what", "result")["status"]) == ["queued"] * 3

    done = worker.run_worker(store=store, once=True, run_job=protocol_jobs.run_job)
    assert done == [{"job_id": job.id, "status": "completed"} for job in (cv, lodo, baseline)]
    folds = [run for run in store.list_runs() if run.protocol.kind == "kfold"]
    rounds = [run for run in store.list_runs() if run.protocol.kind == "lodo"]
    assert sorted(run.protocol.fold for run in folds) == [1, 2] and {r.status for r in folds} == {"completed"}
    assert sorted(run.protocol.held_out for run in rounds) == ["alpha", "beta"]

    at.run()
    jobs_table = frame_with(at, "what", "result").set_index("job")
    assert list(jobs_table["status"]) == ["completed"] * 3
    assert jobs_table.loc[cv.id, "result"].startswith("mean accuracy ")
    assert "held out alpha: " in jobs_table.loc[lodo.id, "result"]

    at.switch_page("pages/compare.py").run()
    assert not at.exception, at.exception
    assert list(frame_with(at, "cross-validation", "folds")["folds"]) == ["2 of 2 completed"]
    assert sorted(frame_with(at, "held-out dataset")["held-out dataset"]) == ["alpha", "beta"]
    (row,) = frame_with(at, "model", "± std").to_dict("records")
    assert (row["model"], row["dataset"]) == ("svm", synthetic_dataset.name)
    assert 0 <= row["test accuracy"] <= 1 and "2-fold" in row["protocol"]

    # The colour-robustness check of a fold's run, queued from the Train page's form, run and shown in Compare.
    at.switch_page("pages/train.py").run()
    checked = folds[0].id
    at.selectbox(key="train_robustness_run").set_value(checked)
    at.button(key="FormSubmitter:train_robustness_form-Queue robustness check").click().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    (robustness,) = [job for job in JobQueue(store).list() if job.kind == "robustness"]
    assert robustness.params == {"run_id": checked, "backbone": "scratch_cnn"} and robustness.status == "queued"
    assert worker.run_worker(store=store, once=True, run_job=protocol_jobs.run_job) == [
        {"job_id": robustness.id, "status": "completed"}
    ]
    at.switch_page("pages/compare.py").run()
    assert not at.exception, at.exception
    table = frame_with(at, "test images", "colour-only accuracy")
    assert list(table["test images"]) == ["original", "grayscale", "reinhard"] and set(table["run"]) == {checked}
    assert table["model accuracy"].between(0, 1).all() and table["colour-only accuracy"].between(0, 1).all()
