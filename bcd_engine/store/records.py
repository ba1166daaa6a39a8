"""Plain, frozen records that the run store hands to callers.

ORM rows never leave the store; every public read returns one of these instead, so callers can keep
them after the session is gone and pass them between threads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bcd_engine.errors import RecordError
from bcd_engine.progress import PhaseProgress

PROTOCOL_KINDS = ("holdout", "kfold", "lodo", "external")
TEST_EVALUATION = "test"  # the name of a run's evaluation on its own test split, stored by training

_KFOLD = "{folds}-fold CV (group-aware, stratified)"
_LODO = "leave-one-dataset-out"
_LABELS = {"holdout": "holdout (group-aware, stratified)", "external": "external test set"}


@dataclass(frozen=True)
class Protocol:
    """How a run's test figure is obtained, as data: its kind and, for k-fold and LODO, which round.

    ``kind`` is ``"holdout"`` (one group-aware, stratified train/val/test split), ``"kfold"`` (fold
    ``fold`` of ``folds`` group-aware folds), ``"lodo"`` (leave-one-dataset-out, ``held_out`` the
    dataset left out) or ``"external"`` (tested on a separate dataset). A k-fold or LODO protocol
    without its round (``fold`` or ``held_out`` None) is the protocol as a whole, as a summary over
    all rounds names it. Build one with the constructors; fields that do not fit the kind raise
    :class:`RecordError`. :attr:`label` is the text runs are shown with.

    >>> Protocol.kfold(2, folds=5).label
    '5-fold CV (group-aware, stratified), fold 2/5'
    >>> Protocol.lodo("pbc").label
    'leave-one-dataset-out, held out pbc'
    """

    kind: str
    fold: int | None = None
    folds: int | None = None
    held_out: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in PROTOCOL_KINDS:
            raise RecordError(f"protocol kind must be one of {', '.join(PROTOCOL_KINDS)}, not {self.kind!r}")
        given = {"fold": self.fold, "folds": self.folds, "held_out": self.held_out}
        allowed = {"kfold": {"fold", "folds"}, "lodo": {"held_out"}}.get(self.kind, set())
        extra = [name for name, value in given.items() if value is not None and name not in allowed]
        if extra:
            raise RecordError(f"a {self.kind} protocol has no {' or '.join(extra)}, got {given}")
        if self.kind == "kfold":
            if not _is_int(self.folds) or self.folds < 2:
                raise RecordError(f"a k-fold protocol needs folds >= 2, not {self.folds!r}")
            if self.fold is not None and not (_is_int(self.fold) and 1 <= self.fold <= self.folds):
                raise RecordError(f"fold must be 1 to {self.folds} (or None for all folds), not {self.fold!r}")
        if self.kind == "lodo" and self.held_out is not None and not (isinstance(self.held_out, str) and self.held_out):
            raise RecordError(f"held_out must name a dataset (or be None for every round), not {self.held_out!r}")

    @classmethod
    def holdout(cls) -> Protocol:
        """A group-aware, stratified hold-out split (what ``train`` does unless told otherwise)."""
        return cls("holdout")

    @classmethod
    def kfold(cls, fold: int | None = None, *, folds: int) -> Protocol:
        """Fold ``fold`` (1 to ``folds``) of a group-aware k-fold cross-validation; None: all folds."""
        return cls("kfold", fold=fold, folds=folds)

    @classmethod
    def lodo(cls, held_out: str | None = None) -> Protocol:
        """The leave-one-dataset-out round that holds out dataset ``held_out``; None: every round."""
        return cls("lodo", held_out=held_out)

    @classmethod
    def external(cls) -> Protocol:
        """A test on a dataset apart from the one trained on."""
        return cls("external")

    @property
    def label(self) -> str:
        """The protocol as text, e.g. ``"5-fold CV (group-aware, stratified), fold 2/5"``."""
        if self.kind == "kfold":
            label = _KFOLD.format(folds=self.folds)
            return label if self.fold is None else f"{label}, fold {self.fold}/{self.folds}"
        if self.kind == "lodo":
            return _LODO if self.held_out is None else f"{_LODO}, held out {self.held_out}"
        return _LABELS[self.kind]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DatasetRecord:
    """A dataset folder that runs were trained on; ``synthetic``: drawn by a program, not medical data."""

    id: int
    name: str
    root: str
    n_images: int
    class_counts: dict[str, int]
    synthetic: bool
    created_at: datetime


@dataclass(frozen=True)
class RunDataset:
    """The dataset a run was trained on, as the run is shown with it.

    ``n_images`` is None only for a run from before bcd recorded its dataset, whose folder was never registered.
    """

    name: str
    n_images: int | None
    synthetic: bool


@dataclass(frozen=True)
class RunRecord:
    """One training run: its configuration, lifecycle and headline metrics.

    ``dataset`` is the dataset it was trained on (its registered dataset, ``dataset_id``, whenever there is one).
    ``protocol`` is how its test figure was obtained (``protocol.label`` the same as text). ``seconds`` is
    ``finished_at - started_at``: from when the process that trains the run starts it (after scanning the
    data folder and setting up the device; the wait in the queue is not counted) until it is finished,
    evaluation and saving included. ``train`` reports the same figure.
    """

    id: int
    backbone: str
    protocol: Protocol
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
    dataset: RunDataset
    test_accuracy: float | None
    macro_auc: float | None


@dataclass(frozen=True)
class RunProgress:
    """The phase a running run is in: ``done`` of ``total`` ``unit``\\ s (``total`` 0: not counted, e.g. saving),
    reported at ``updated_at`` for a phase that started at ``started_at``."""

    run_id: int
    phase: str
    done: int
    total: int
    unit: str
    started_at: datetime
    updated_at: datetime

    @property
    def elapsed_s(self) -> float:
        """Seconds from the phase's start to its last report."""
        return (self.updated_at - self.started_at).total_seconds()

    def as_phase(self) -> PhaseProgress:
        """The same report as the training process made it: its share done, rate and time left."""
        return PhaseProgress(self.phase, self.done, self.total, self.unit, self.elapsed_s)

    @property
    def fraction(self) -> float | None:
        """Share of the phase done in 0..1; None for a phase that is not counted."""
        return self.as_phase().fraction

    @property
    def rate(self) -> float | None:
        """Units per second over the phase so far; None before the first is done."""
        return self.as_phase().rate

    @property
    def seconds_left(self) -> float | None:
        """Time the rest of the phase takes at :attr:`rate`, from ``updated_at``; None without a rate or a total."""
        return self.as_phase().seconds_left

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "phase": self.phase,
            "done": self.done,
            "total": self.total,
            "unit": self.unit,
            "started_at": self.started_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "rate": self.rate,
            "seconds_left": self.seconds_left,
        }


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


def latest_evaluation(evaluations: Iterable[EvaluationRecord], name: str = TEST_EVALUATION) -> EvaluationRecord | None:
    """The newest of ``evaluations`` called ``name``: by default the run's evaluation on its own test split."""
    named = [e for e in evaluations if e.name == name]
    return named[-1] if named else None


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
