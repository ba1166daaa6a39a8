"""A protocol job queued from the dashboard with a Ray cluster configured (``BCD_RAY_ADDRESS``): the Ray worker the
dashboard starts takes it, and its folds train as Ray tasks on the cluster (a real local cluster, 2 CPUs)."""

from __future__ import annotations

import os

import pytest
from helpers import workspace_store

from bcd_engine.models.config import TrainConfig
from bcd_engine.protocols import jobs as protocol_jobs
from bcd_engine.store import JobQueue

ray = pytest.importorskip("ray")
from bcd_engine.training import ray_executor  # noqa: E402 - only with Ray installed


@pytest.fixture
def ray_store(tmp_path):
    """A store, and a private local Ray cluster that ``BCD_RAY_ADDRESS`` names (never one a `ray start` left)."""
    ray.init(
        address="local", num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, logging_level="ERROR"
    )
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
            patch.setenv("BCD_RAY_ADDRESS", ray.get_runtime_context().gcs_address)
            yield workspace_store(tmp_path, patch)
    finally:
        ray.shutdown()


def test_a_queued_cv_job_is_taken_by_the_ray_worker_and_its_folds_train_on_the_cluster(ray_store, synthetic_dataset):
    config = TrainConfig.for_backbone(
        "scratch_cnn", weights="none", image_size=32, epochs=1, batch_size=8, dense_units=8, augment=1, patience=1
    )
    job_id = protocol_jobs.queue_cv(ray_store, config, synthetic_dataset, folds=2)
    done = ray_executor.run_ray_worker(address=None, once=True, poll_seconds=0.5, run_job=protocol_jobs.run_job)
    assert done == [{"job_id": job_id, "status": "completed"}]
    job = JobQueue(ray_store).get(job_id)
    assert [fold["fold"] for fold in job.result["folds"]] == [1, 2]
    folds = [ray_store.get_run(fold["run_id"]) for fold in job.result["folds"]]
    assert {run.status for run in folds} == {"completed"}
    assert all(run.pid not in (None, os.getpid()) for run in folds)  # trained in Ray's worker processes
