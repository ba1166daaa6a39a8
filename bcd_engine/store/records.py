"""Plain, frozen records that the run store hands to callers.

ORM rows never leave the store; every public read returns one of these instead, so callers can keep
them after the session is gone and pass them between threads.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class DatasetRecord:
    """A dataset folder that runs were trained on."""

    id: int
    name: str
    root: str
    n_images: int
    class_counts: dict[str, int]
    created_at: datetime


@dataclass(frozen=True)
class RunRecord:
    """One training run: its configuration, lifecycle and headline metrics."""

    id: int
    backbone: str
    protocol: str
    config: dict[str, Any]
    status: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    seconds: float | None
    error: str | None
    environment: dict[str, Any] | None
    host: str | None
    pid: int | None
    heartbeat_at: datetime | None
    cancel_requested: bool
    worker_id: str | None
    dataset_id: int | None
    test_accuracy: float | None
    macro_auc: float | None


@dataclass(frozen=True)
class EpochRecord:
    """Metrics of one epoch of one training phase (phase 0: frozen backbone, 1: fine-tuning, ...).

    A NaN metric (a diverged loss) is stored and returned as ``None``.
    """

    run_id: int
    phase: int
    epoch: int
    train_loss: float | None
    train_accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    learning_rate: float | None
    seconds: float | None


@dataclass(frozen=True)
class RocCurve:
    """One-vs-rest ROC curve of one class; ``thresholds[0]`` may be ``inf`` (as scikit-learn gives)."""

    fpr: list[float]
    tpr: list[float]
    thresholds: list[float]
    auc: float | None


@dataclass(frozen=True)
class EvaluationRecord:
    """One evaluation of a run's model on a data set (``name`` e.g. ``"test"`` or ``"external"``)."""

    id: int
    run_id: int
    name: str
    data_dir: str | None
    created_at: datetime
    metrics: dict[str, Any]
    class_names: list[str]
    confusion_matrix: list[list[int]]
    roc: dict[str, RocCurve]


@dataclass(frozen=True)
class PredictionRecord:
    """The model's output for one image of an evaluation."""

    id: int
    evaluation_id: int
    path: str
    true_class: str
    predicted_class: str
    probabilities: list[float]


@dataclass(frozen=True)
class ArtifactRecord:
    """A file a run produced (``kind`` e.g. ``"model"``), with its checksum."""

    id: int
    run_id: int
    kind: str
    path: str
    sha256: str
    size_bytes: int
    created_at: datetime
