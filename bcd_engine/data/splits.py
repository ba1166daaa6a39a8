"""Train/validation/test splits that keep near-duplicate groups together and classes balanced.

Both the hold-out split and k-fold use scikit-learn's ``StratifiedGroupKFold``: a group (an
image and its near-duplicates) never straddles two subsets, and every subset keeps roughly the
overall class proportions. A hold-out split is made of whole folds: ``n_folds`` is chosen so that
a whole number of folds comes closest to the requested fractions (0.15/0.15 -> 20 folds, 3 + 3).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from bcd_engine.data.scan import ScanResult
from bcd_engine.errors import ConfigError, DataError

SUBSETS = ("train", "val", "test")
MAX_HOLDOUT_FOLDS = 20
DEFAULT_FRACTION = 0.15  # of the images, for validation and for test, unless a config says otherwise
MAX_HELD_OUT = 0.9  # validation + test stay below this fraction of the images: at least a tenth trains


@dataclass(frozen=True, eq=False)
class Split:
    """Sorted indices into ``ScanResult.images`` for each subset, with the settings that made them."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int | None
    val_fraction: float
    test_fraction: float

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Split):
            return NotImplemented
        return all(np.array_equal(getattr(self, s), getattr(other, s)) for s in SUBSETS) and (
            self.seed,
            self.val_fraction,
            self.test_fraction,
        ) == (other.seed, other.val_fraction, other.test_fraction)

    __hash__ = None  # type: ignore[assignment]

    def assignments(self, scan: ScanResult) -> list[dict[str, Any]]:
        """One row per image (path, class_name, subset, group_id), in image order, for storing with a run."""
        groups = scan.groups
        subset_of = {int(i): name for name in SUBSETS for i in getattr(self, name)}
        return [
            {
                "path": record.path,
                "class_name": record.class_name,
                "subset": subset_of[i],
                "group_id": int(groups[i]),
            }
            for i, record in enumerate(scan.images)
            if i in subset_of
        ]


def holdout_split(
    labels: Iterable[int] | np.ndarray,
    groups: Iterable[int] | np.ndarray,
    *,
    val_fraction: float = DEFAULT_FRACTION,
    test_fraction: float = DEFAULT_FRACTION,
    seed: int = 0,
) -> Split:
    """Stratified, group-aware, seeded train/val/test split (val_fraction or test_fraction may be 0; the
    fractions follow :func:`check_fractions`)."""
    y, g = _check_arrays(labels, groups)
    check_fractions(val_fraction, test_fraction)
    n_folds, n_test, n_val = _fold_plan(val_fraction, test_fraction, _max_folds(y, g))
    fold_of = np.empty(len(y), dtype=np.int64)
    for k, (_, fold_idx) in enumerate(_stratified_group_folds(y, g, n_folds, seed)):
        fold_of[fold_idx] = k
    return Split(
        train=np.flatnonzero(fold_of >= n_test + n_val),
        val=np.flatnonzero((fold_of >= n_test) & (fold_of < n_test + n_val)),
        test=np.flatnonzero(fold_of < n_test),
        seed=seed,
        val_fraction=float(val_fraction),
        test_fraction=float(test_fraction),
    )


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """The one rule for a hold-out split's fractions, which ``TrainConfig`` and :func:`holdout_split` both apply:
    each a number in [0, 1), together below ``MAX_HELD_OUT``; ConfigError otherwise."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= MAX_HELD_OUT:
        raise ConfigError(
            f"val_fraction + test_fraction must be below {MAX_HELD_OUT} to leave at least a tenth of the images "
            f"for training, got {val_fraction} + {test_fraction}"
        )


def group_kfold(
    labels: Iterable[int] | np.ndarray,
    groups: Iterable[int] | np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified group k-fold with shuffling: ``folds`` sorted (train_idx, test_idx) pairs."""
    y, g = _check_arrays(labels, groups)
    limit = _max_folds(y, g)
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= limit:
        raise ConfigError(
            f"folds must be an integer from 2 to {limit} (the number of groups and of images in the "
            f"largest class bound it), got {folds!r}"
        )
    return [(np.sort(tr), np.sort(te)) for tr, te in _stratified_group_folds(y, g, folds, seed)]


def split_from_assignments(
    scan: ScanResult, assignments: Iterable[Mapping[str, Any]], *, seed: int | None = None
) -> Split:
    """Rebuild a stored split (rows from :meth:`Split.assignments`) against a scan, matching by path."""
    index = {path: i for i, path in enumerate(scan.paths)}
    members: dict[str, list[int]] = {name: [] for name in SUBSETS}
    seen: set[str] = set()
    missing: list[str] = []
    for row in assignments:
        path, subset = row["path"], row["subset"]
        if subset not in members:
            raise DataError(f"stored split has an unknown subset {subset!r} for {path} (expected one of {SUBSETS})")
        if path in seen:
            raise DataError(f"stored split lists {path} more than once")
        seen.add(path)
        if path not in index:
            missing.append(path)
            continue
        members[subset].append(index[path])
    if missing:
        raise DataError(
            f"stored split names {len(missing)} image(s) that are not in the scanned dataset {scan.root}, "
            f"e.g. {missing[0]}"
        )
    total = sum(len(v) for v in members.values())
    if total == 0:
        raise DataError("stored split is empty")
    return Split(
        train=np.array(sorted(members["train"]), dtype=np.int64),
        val=np.array(sorted(members["val"]), dtype=np.int64),
        test=np.array(sorted(members["test"]), dtype=np.int64),
        seed=seed,
        val_fraction=len(members["val"]) / total,
        test_fraction=len(members["test"]) / total,
    )


def _check_arrays(
    labels: Iterable[int] | np.ndarray, groups: Iterable[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and groups as 1-D arrays of equal, non-zero length."""
    y = np.asarray(labels if isinstance(labels, np.ndarray) else list(labels))
    g = np.asarray(groups if isinstance(groups, np.ndarray) else list(groups))
    if y.ndim != 1 or g.ndim != 1:
        raise ConfigError(f"labels and groups must be 1-D, got shapes {y.shape} and {g.shape}")
    if len(y) != len(g):
        raise ConfigError(f"labels and groups must have the same length, got {len(y)} and {len(g)}")
    if len(y) == 0:
        raise ConfigError("cannot split an empty dataset")
    return y, g


def _max_folds(y: np.ndarray, g: np.ndarray) -> int:
    """Most folds StratifiedGroupKFold can make: one group per fold, and the largest class in every fold."""
    return int(min(len(np.unique(g)), np.unique(y, return_counts=True)[1].max()))


def _fold_plan(val_fraction: float, test_fraction: float, max_folds: int) -> tuple[int, int, int]:
    """(n_folds, test folds, val folds) whose whole-fold fractions come closest to the requested ones."""
    best: tuple[float, int, int, int] | None = None
    for n_folds in range(2, min(MAX_HOLDOUT_FOLDS, max_folds) + 1):
        n_test = max(1, round(test_fraction * n_folds)) if test_fraction > 0 else 0
        n_val = max(1, round(val_fraction * n_folds)) if val_fraction > 0 else 0
        if n_test + n_val >= n_folds:
            continue
        error = abs(n_test / n_folds - test_fraction) + abs(n_val / n_folds - val_fraction)
        if best is None or error < best[0] - 1e-9:
            best = (error, n_folds, n_test, n_val)
    if best is None:
        raise ConfigError(
            f"too few images or groups to make train/val/test subsets (at most {max_folds} folds possible; "
            f"val_fraction={val_fraction}, test_fraction={test_fraction})"
        )
    return best[1], best[2], best[3]


def _stratified_group_folds(
    y: np.ndarray, g: np.ndarray, n_folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Small classes with fewer members than folds are fine: they land in as many folds as they can.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return list(splitter.split(np.zeros((len(y), 1)), y, g))
