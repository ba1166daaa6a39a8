"""k-fold cross-validation: stratified, group-aware folds, one stored run per fold."""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass

import numpy as np

from bcd_engine.data.scan import ScanResult, scan_dataset
from bcd_engine.data.splits import Split, group_kfold, holdout_split
from bcd_engine.errors import ConfigError
from bcd_engine.evaluation.confidence import sample_std
from bcd_engine.models.config import TrainConfig
from bcd_engine.store import Protocol, RunStore
from bcd_engine.training.executor import Executor, LocalExecutor
from bcd_engine.training.run import train

DEFAULT_FOLDS = 5  # the thesis' k-fold cross-validation


@dataclass(frozen=True)
class FoldResult:
    """One fold of a cross-validation: its stored run, its sizes and its test figures."""

    fold: int
    run_id: int
    n_train: int
    n_test: int
    accuracy: float | None
    macro_auc: float | None


@dataclass(frozen=True)
class CrossValidationResult:
    """What :func:`cross_validate` reports: each fold, and the folds' mean and sample std of accuracy and macro
    AUC (None where a fold lacks the figure)."""

    protocol: str
    folds: tuple[FoldResult, ...]
    mean: dict[str, float | None]
    std: dict[str, float | None]

    def to_dict(self) -> dict:
        """The JSON shape ``cv --json`` prints: ``{"protocol", "folds": [{"fold", "run_id", "n_train", "n_test",
        "accuracy", "macro_auc"}], "mean": {...}, "std": {...}}``."""
        return {
            "protocol": self.protocol,
            "folds": [asdict(fold) for fold in self.folds],
            "mean": dict(self.mean),
            "std": dict(self.std),
        }


def fold_splits(labels, groups, *, folds: int, val_fraction: float, seed: int) -> list[Split]:
    """One Split per fold: the fold is the test set; validation is carved group-aware from the rest."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    splits = []
    for train_rest, test in group_kfold(labels, groups, folds=folds, seed=seed):
        inner = holdout_split(
            labels[train_rest], groups[train_rest], val_fraction=val_fraction, test_fraction=0.0, seed=seed
        )
        splits.append(
            Split(
                train=np.sort(train_rest[inner.train]),
                val=np.sort(train_rest[inner.val]),
                test=np.sort(test),
                seed=seed,
                val_fraction=val_fraction,
                test_fraction=1 / folds,
            )
        )
    return splits


def cross_validate(
    config: TrainConfig,
    data_dir: str | os.PathLike,
    *,
    folds: int = DEFAULT_FOLDS,
    store: RunStore,
    progress: bool = False,
    executor: Executor | None = None,
) -> CrossValidationResult:
    """Train and test ``config`` on each of ``folds`` group-aware folds; per-fold metrics, mean and std.

    Each fold is stored in ``store`` as its own run, under
    ``Protocol.kfold(fold, folds=folds)``. Every fold trains on the one scan its split was made from,
    so the split's indices name the same files. The folds train one after another here unless ``executor``
    runs them elsewhere (the Ray executor: in parallel, without progress bars); the result is the same.
    """
    if folds < 2:
        raise ConfigError(f"folds must be >= 2, got {folds}")
    scan = scan_dataset(data_dir, progress=progress)
    splits = fold_splits(scan.labels, scan.groups, folds=folds, val_fraction=config.val_fraction, seed=config.seed)
    executor = executor or LocalExecutor()
    work = functools.partial(
        _train_fold,
        config=config,
        data_dir=data_dir,
        scan=scan,
        folds=folds,
        progress=progress and isinstance(executor, LocalExecutor),
    )
    results = tuple(executor.map(work, list(enumerate(splits, start=1)), store=store))
    summary = summarise_folds([asdict(fold) for fold in results])
    return CrossValidationResult(Protocol.kfold(folds=folds).label, results, summary["mean"], summary["std"])


def _train_fold(
    store: RunStore,
    fold_split: tuple[int, Split],
    *,
    config: TrainConfig,
    data_dir: str | os.PathLike,
    scan: ScanResult,
    folds: int,
    progress: bool,
) -> FoldResult:
    """Train and test one fold."""
    fold, split = fold_split
    result = train(
        config,
        data_dir,
        store=store,
        split=split,
        scan=scan,
        progress=progress,
        protocol=Protocol.kfold(fold, folds=folds),
    )
    return FoldResult(fold, result.run_id, result.n_train, result.n_test, result.test_accuracy, result.macro_auc)


def summarise_folds(rows: list[dict]) -> dict:
    """``{"mean": {...}, "std": {...}}`` of the folds' accuracy and macro AUC (None when a fold lacks one), from
    one row per fold with those keys (a :class:`FoldResult` as a dict, or a classical baseline's fold).

    The std is the sample standard deviation (:func:`bcd_engine.evaluation.confidence.sample_std`).
    """
    summary = {}
    for stat, fn in (("mean", lambda values: float(np.mean(values))), ("std", sample_std)):
        summary[stat] = {
            key: fn([r[key] for r in rows]) if all(r[key] is not None for r in rows) else None
            for key in ("accuracy", "macro_auc")
        }
    return summary
