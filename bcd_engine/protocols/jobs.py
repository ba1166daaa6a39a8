"""Protocols queued from the dashboard: put a k-fold CV, a leave-one-dataset-out, a classical baseline or a
robustness check in the store's job queue, and run a claimed job as the CLI would.

The worker (:func:`bcd_engine.training.worker.run_worker`) claims jobs when no training run is queued and hands
each to :func:`run_job`. A CV or LODO job trains its folds or rounds as ordinary runs (so Compare shows them as it
shows the CLI's); with ``BCD_RAY_ADDRESS`` set they go to that Ray cluster as parallel tasks. Every job's result is
the JSON the matching CLI command prints, stored with the job.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bcd_engine import settings
from bcd_engine.data.scan import scan_dataset
from bcd_engine.errors import ConfigError, RunNotFoundError
from bcd_engine.models.backbones import require_weights_file
from bcd_engine.models.config import TrainConfig
from bcd_engine.protocols.baselines import MODELS, cross_validate_classical, train_classical_baseline
from bcd_engine.protocols.crossval import cross_validate
from bcd_engine.protocols.lodo import leave_one_dataset_out
from bcd_engine.protocols.robustness import colour_robustness_of_run
from bcd_engine.store import JobQueue, JobRecord, RunStore
from bcd_engine.training.executor import Executor, LocalExecutor


def _root(data_dir: str | os.PathLike, **scan_options: Any) -> str:
    """The scanned folder's absolute path (``DataError`` when it is not a usable dataset)."""
    return scan_dataset(data_dir, **scan_options).root


def queue_cv(store: RunStore, config: TrainConfig, data_dir: str | os.PathLike, *, folds: int) -> int:
    """Queue a ``folds``-fold cross-validation of ``config`` on ``data_dir`` (``cv``); the job's id."""
    if folds < 2:
        raise ConfigError(f"folds must be >= 2, got {folds}")
    require_weights_file(config.weights)
    params = {"backbone": config.backbone, "train": config.to_dict(), "data_dir": _root(data_dir), "folds": folds}
    return JobQueue(store).put("cv", params)


def queue_lodo(
    store: RunStore, config: TrainConfig, datasets: dict[str, str | os.PathLike], label_map: dict | None = None
) -> int:
    """Queue a leave-one-dataset-out of ``config`` over ``datasets`` (name -> folder; ``lodo``); the job's id.

    ``label_map`` maps a dataset name to ``{folder class: shared label}``, as ``lodo --label-map`` reads it.
    """
    if len(datasets) < 2:
        raise ConfigError(f"leave-one-dataset-out needs at least 2 datasets, got {len(datasets)}")
    if label_map is not None and not isinstance(label_map, dict):
        raise ConfigError('the label map must be a JSON object {"<dataset>": {"<folder class>": "<shared label>"}}')
    require_weights_file(config.weights)
    roots = {name: _root(folder, allow_single_class=True) for name, folder in datasets.items()}
    params = {"backbone": config.backbone, "train": config.to_dict(), "datasets": roots, "label_map": label_map}
    return JobQueue(store).put("lodo", params)


def queue_baseline(
    store: RunStore, data_dir: str | os.PathLike, *, model: str = MODELS[0], folds: int | None = None, seed: int = 0
) -> int:
    """Queue the classical baseline (``baseline``: hold-out, or ``folds``-fold CV) on ``data_dir``; the job's id."""
    if model not in MODELS:
        raise ConfigError(f"model must be one of {', '.join(MODELS)}, not {model!r}")
    if folds is not None and folds < 2:
        raise ConfigError(f"folds must be >= 2, got {folds}")
    return JobQueue(store).put("baseline", {"model": model, "data_dir": _root(data_dir), "folds": folds, "seed": seed})


def queue_robustness(store: RunStore, run_id: int) -> int:
    """Queue the colour-robustness check of completed run ``run_id`` (``robustness``); the job's id."""
    run = store.get_run(run_id)
    if run.status != "completed":
        raise RunNotFoundError(f"run {run_id} is {run.status}; only a completed run can be checked")
    return JobQueue(store).put("robustness", {"run_id": run_id, "backbone": run.backbone})


def job_executor() -> Executor:
    """Where a job's folds or rounds train: the Ray cluster at ``BCD_RAY_ADDRESS``, else here one after another."""
    address = settings.ray_address()
    if address is None:
        return LocalExecutor()
    from bcd_engine.training.ray_executor import RayExecutor

    return RayExecutor(address)


def run_job(store: RunStore, job: JobRecord, *, executor: Executor | None = None) -> dict:
    """Run a claimed job with its stored parameters; its result, the JSON its CLI command prints."""
    params = job.params
    if job.kind in ("cv", "lodo"):
        config = TrainConfig.from_dict(params["train"])
        executor = executor or job_executor()
        if job.kind == "cv":
            return cross_validate(
                config, params["data_dir"], folds=params["folds"], store=store, executor=executor
            ).to_dict()
        return leave_one_dataset_out(
            config, params["datasets"], params["label_map"], store=store, executor=executor
        ).to_dict()
    if job.kind == "baseline":
        scan = scan_dataset(params["data_dir"])
        options = {"seed": params["seed"], "model": params["model"]}
        if params["folds"] is None:
            return {"data_dir": scan.root, **train_classical_baseline(scan, **options)}
        return {"data_dir": scan.root, **cross_validate_classical(scan, folds=params["folds"], **options)}
    result = colour_robustness_of_run(params["run_id"], store=store)
    return {"data_dir": str(Path(store.get_run(params["run_id"]).config["data_dir"])), **result}
