"""Engine-side helpers for the Streamlit dashboard: plain data in, plain data (or DataFrames) out.

The pages call these instead of TensorFlow or SQL, so everything here is testable without Streamlit.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import worker
from .archives import is_zip
from .backbones import BACKBONES
from .config import TrainConfig
from .datasets import ScanResult, load_image
from .diagnosis import Source, sources_from_archive
from .errors import BCDError
from .explain import explain_source
from .store import RunStore
from .store.records import EvaluationRecord, RunRecord
from .synthetic import DEMO_DATASET_NAME, ensure_demo_dataset

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # one image
MAX_ARCHIVE_UPLOAD_BYTES = 200 * 1024 * 1024  # one zip archive (also .streamlit/config.toml)
KAGGLE_DATASET = "mehradaria/leukemia"
TWIN_FOLDERS = ("Original", "Segmented")

# Accuracies reported by the thesis (train / validation) and by the dataset's authors.
THESIS_REFERENCE = [
    {"model": "VGG16", "train_accuracy": 0.94, "val_accuracy": 0.94, "source": "thesis (reported)"},
    {"model": "VGG19", "train_accuracy": 0.94, "val_accuracy": 0.91, "source": "thesis (reported)"},
    {"model": "ResNet50", "train_accuracy": 0.89, "val_accuracy": 0.87, "source": "thesis (reported)"},
    {"model": "InceptionV3", "train_accuracy": 0.90, "val_accuracy": 0.80, "source": "thesis (reported)"},
    {"model": "Ghaderzadeh et al. 2022 (dataset authors)", "train_accuracy": None, "val_accuracy": 0.9985,
     "source": "dataset authors (reported)"},
]


def demo_mode(secret: object = None) -> bool:
    """Demo mode (browse and diagnose only): ``BCD_DEMO_MODE`` or a ``demo_mode`` secret set to a true value."""
    values = [os.environ.get("BCD_DEMO_MODE", ""), "" if secret is None else str(secret)]
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in values)


# -- datasets -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetChoice:
    label: str
    root: str
    synthetic: bool = False


def dataset_choices(store: RunStore) -> list[DatasetChoice]:
    """The built-in SYNTHETIC demo set first, then the datasets registered in the store."""
    demo = str(ensure_demo_dataset())
    choices = [DatasetChoice(f"SYNTHETIC demo set ({DEMO_DATASET_NAME}, not medical data)", demo, True)]
    choices += [DatasetChoice(f"{d.name}: {d.n_images} images ({d.root})", d.root)
                for d in store.list_datasets() if d.root != demo]
    return choices


def samples_by_class(scan: ScanResult) -> dict[str, list[str]]:
    """Readable image paths of each class, in scan order."""
    out: dict[str, list[str]] = {name: [] for name in scan.class_names}
    for record in scan.images:
        out[record.class_name].append(record.path)
    return out


def page_of(items: list, page: int, per_page: int) -> tuple[list, int]:
    """Items on ``page`` (1-based, clamped) and the number of pages."""
    n_pages = max(1, math.ceil(len(items) / per_page))
    page = min(max(1, page), n_pages)
    return items[(page - 1) * per_page: page * per_page], n_pages


def image_stats(scan: ScanResult, *, per_class: int = 40, seed: int = 0) -> pd.DataFrame:
    """Per-image size and colour statistics for up to ``per_class`` images of each class (a fixed sample).

    Columns: class, path, width, height, kb, mean_r/g/b, std (grey), brightness.
    """
    rng = np.random.default_rng(seed)
    records = {r.path: r for r in scan.images}
    rows = []
    for class_name, paths in samples_by_class(scan).items():
        chosen = paths if len(paths) <= per_class else sorted(rng.choice(paths, per_class, replace=False))
        for path in chosen:
            record = records[path]
            pixels = load_image(path, image_size=64).reshape(-1, 3).astype(np.float64)
            mean = pixels.mean(axis=0)
            rows.append({"class": class_name, "path": path, "width": record.width, "height": record.height,
                         "kb": record.size_bytes / 1024, "mean_r": mean[0], "mean_g": mean[1], "mean_b": mean[2],
                         "std": pixels.mean(axis=1).std(), "brightness": mean.mean()})
    return pd.DataFrame(rows)


def class_summary(stats: pd.DataFrame) -> pd.DataFrame:
    """Mean of each statistic per class (from :func:`image_stats`)."""
    return stats.drop(columns="path").groupby("class").mean().round(1)


def twin_root(root: str | os.PathLike) -> Path | None:
    """For ``.../Original`` return ``.../Segmented`` (and back) when that twin folder exists."""
    root = Path(root)
    if root.name not in TWIN_FOLDERS:
        return None
    other = root.parent / TWIN_FOLDERS[1 - TWIN_FOLDERS.index(root.name)]
    return other if other.is_dir() else None


def twin_of(path: str | os.PathLike, root: str | os.PathLike) -> Path | None:
    """The same file (``<Class>/<name>``) in the twin folder, when it exists."""
    other = twin_root(root)
    if other is None:
        return None
    candidate = other / Path(path).resolve().relative_to(Path(root).resolve())
    return candidate if candidate.is_file() else None


def download_kaggle_dataset() -> tuple[Path | None, str]:
    """Download the ALL dataset with kagglehub; (folder, message), folder None with a clear reason on failure."""
    try:
        import kagglehub

        path = Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except ImportError:
        return None, "kagglehub is not installed (pip install kagglehub); use a local folder instead."
    except Exception as exc:  # noqa: BLE001 - network, credentials, quota: all mean "not now"
        return None, (f"Could not download {KAGGLE_DATASET}: offline or no Kaggle credentials "
                      f"({type(exc).__name__}: {str(exc)[:200]}). Use a local folder instead.")
    originals = sorted(path.rglob("Original"))
    folder = originals[0] if originals else path
    return folder, f"Downloaded to {folder}"


# -- queue and runs -------------------------------------------------------------------------------


def queue_run(store: RunStore, config: TrainConfig, data_dir: str | os.PathLike) -> int:
    """Scan ``data_dir`` (``DataError`` when unusable), put one run in the queue (status queued); its id.

    Scanning first turns an unusable folder into a clear error before anything is queued.
    """
    from .datasets import scan_dataset
    from .training import PROTOCOL_HOLDOUT

    scan = scan_dataset(data_dir)
    return store.create_run(backbone=config.backbone, protocol=PROTOCOL_HOLDOUT,
                            config={"train": config.to_dict(), "data_dir": scan.root,
                                    "class_names": list(scan.class_names)})


def demo_config() -> TrainConfig:
    """A tiny scratch-CNN configuration that trains on the demo set on a CPU in about a minute."""
    return TrainConfig.for_backbone("scratch_cnn", image_size=64, epochs=15, patience=8, batch_size=16,
                                    dense_units=64)


def queue_demo_run(store: RunStore) -> int:
    """Queue the demo model on the SYNTHETIC demo set."""
    return queue_run(store, demo_config(), ensure_demo_dataset())


def ensure_worker(store: RunStore) -> bool:
    """Start a background worker when runs are queued and none is alive; True when one was started."""
    if worker.live_worker() is not None or not store.list_runs(status="queued", limit=1):
        return False
    worker.spawn_worker()
    return True


def best_completed_run(store: RunStore) -> RunRecord | None:
    """The completed run with the highest test accuracy (newest first on ties), or None."""
    runs = [r for r in store.list_runs(status="completed") if r.test_accuracy is not None]
    return max(runs, key=lambda r: r.test_accuracy, default=None)


def holdout_evaluation(store: RunStore, run_id: int) -> EvaluationRecord | None:
    """The run's evaluation on its own test split (the newest one), or None."""
    tests = [e for e in store.get_evaluations(run_id) if e.name == "test"]
    return tests[-1] if tests else None


def runs_frame(store: RunStore) -> pd.DataFrame:
    """One row per run with its headline numbers, for the runs table."""
    rows = []
    for run in store.list_runs():
        evaluation = holdout_evaluation(store, run.id) if run.status == "completed" else None
        metrics = evaluation.metrics if evaluation else {}
        spec = BACKBONES.get(run.backbone)
        train_cfg = run.config.get("train", {})
        rows.append({
            "id": run.id, "backbone": run.backbone, "status": run.status, "protocol": run.protocol,
            "test_accuracy": run.test_accuracy, "macro_auc": run.macro_auc, "macro_f1": metrics.get("macro_f1"),
            "parameters_M": (metrics["parameters"] / 1e6) if metrics.get("parameters") else None,
            "backbone_params_M": spec.params_millions if spec else None,
            "weights": train_cfg.get("weights") or "none", "image_size": train_cfg.get("image_size"),
            "seconds": run.seconds, "created": run.created_at, "error": run.error,
        })
    return pd.DataFrame(rows, columns=["id", "backbone", "status", "protocol", "test_accuracy", "macro_auc",
                                       "macro_f1", "parameters_M", "backbone_params_M", "weights", "image_size",
                                       "seconds", "created", "error"])


def epochs_frame(store: RunStore, run_ids: list[int]) -> pd.DataFrame:
    """Long table of epochs (run, phase, epoch, step, metric, value, split) for curves; step counts across phases."""
    rows = []
    for run_id in run_ids:
        for step, e in enumerate(store.get_epochs(run_id), start=1):
            for metric in ("accuracy", "loss"):
                for split in ("train", "val"):
                    rows.append({"run": f"run {run_id}", "phase": e.phase, "epoch": e.epoch, "step": step,
                                 "metric": metric, "split": split, "value": getattr(e, f"{split}_{metric}")})
    return pd.DataFrame(rows, columns=["run", "phase", "epoch", "step", "metric", "split", "value"])


def per_class_frame(evaluation: EvaluationRecord) -> pd.DataFrame:
    """Precision, recall, specificity, F1, AUC and support per class."""
    per_class = evaluation.metrics.get("per_class", {})
    return pd.DataFrame([{"class": name, **per_class.get(name, {})} for name in evaluation.class_names])


def misclassified(store: RunStore, evaluation: EvaluationRecord, limit: int = 24) -> list[dict]:
    """Up to ``limit`` wrong predictions: path, true and predicted class, confidence in the prediction."""
    out = []
    for p in store.get_predictions(evaluation.id):
        if p.true_class != p.predicted_class:
            confidence = p.probabilities[evaluation.class_names.index(p.predicted_class)]
            out.append({"path": p.path, "true": p.true_class, "predicted": p.predicted_class,
                        "confidence": confidence})
    return out[:limit]


def upload_sources(uploads: list[tuple[str, bytes]]) -> tuple[list[Source], list[dict]]:
    """Uploaded (name, bytes) as diagnosis sources; zip archives are opened safely.

    Returns (sources, rejected): an upload over its size limit or an unsafe archive becomes a
    ``{"name", "error"}`` result, so one bad upload never costs the others.
    """
    sources, rejected = [], []
    for name, data in uploads:
        archive = is_zip(name, data[:4])
        limit = MAX_ARCHIVE_UPLOAD_BYTES if archive else MAX_UPLOAD_BYTES
        if len(data) > limit:
            rejected.append({"name": name, "error": f"file is {len(data) / 2**20:.1f} MB; "
                                                   f"the limit is {limit // 2**20} MB"})
        elif archive:
            try:
                sources += sources_from_archive(data, name=name)
            except BCDError as exc:
                rejected.append({"name": name, "error": str(exc)})
        else:
            sources.append(Source(name, data))
    return sources, rejected


def model_identity(run_id: int, *, store: RunStore) -> str:
    """What tells this run's model from any other, even one saved later under a reused run id:
    the run's creation time and its model's recorded sha256 (caches key on it)."""
    run = store.get_run(run_id)
    models = [a.sha256 for a in store.get_artifacts(run_id) if a.kind == "model"]
    return f"{run.created_at.isoformat()}/{models[-1] if models else 'no model'}"


def grad_cam_of(loaded, image: str | bytes, *, class_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image at the model's size, Grad-CAM heatmap in [0, 1]) of an image file or uploaded bytes for a loaded run."""
    image, cam = explain_source(loaded, image, class_index=class_index)
    return image, cam.heatmap
