"""Hold-out splits and k-fold: group integrity, stratification, determinism, stored splits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.splits import (
    MAX_HELD_OUT,
    Split,
    check_fractions,
    group_kfold,
    holdout_split,
    split_from_assignments,
)
from bcd_engine.errors import ConfigError, DataError

CLASS_SHARES = (0.15, 0.3, 0.3, 0.25)


def _labels_and_groups(n: int = 800, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced labels; about a fifth of the images sit in same-class groups of 2 or 3."""
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.choice(len(CLASS_SHARES), size=n, p=CLASS_SHARES))
    groups = np.arange(n)
    i = 0
    while i < n - 3:
        size = int(rng.choice([1, 1, 1, 1, 1, 1, 1, 2, 2, 3]))
        if size > 1 and labels[i] == labels[i + size - 1]:
            groups[i : i + size] = groups[i]
        i += size
    return labels, groups


def _subset_of(split: Split, n: int) -> np.ndarray:
    subset = np.full(n, -1)
    for k, idx in enumerate((split.train, split.val, split.test)):
        subset[idx] = k
    return subset


def _assert_partition(split: Split, n: int) -> None:
    parts = [split.train, split.val, split.test]
    for part in parts:
        assert part.dtype.kind == "i" and np.array_equal(part, np.sort(part))
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


def _assert_groups_whole(subset: np.ndarray, groups: np.ndarray) -> None:
    for g in np.unique(groups):
        assert len(set(subset[groups == g].tolist())) == 1, f"group {g} straddles subsets"


FRACTIONS = [(0.15, 0.15), (0.1, 0.2), (0.2, 0.1), (0.0, 0.2), (0.25, 0.25), (0.0, 0.3), (0.05, 0.1)]


@pytest.mark.parametrize(("val_fraction", "test_fraction"), FRACTIONS)
def test_holdout_is_a_group_safe_stratified_partition(val_fraction: float, test_fraction: float) -> None:
    labels, groups = _labels_and_groups()
    n = len(labels)
    split = holdout_split(labels, groups, val_fraction=val_fraction, test_fraction=test_fraction, seed=3)
    _assert_partition(split, n)
    _assert_groups_whole(_subset_of(split, n), groups)
    assert (split.seed, split.val_fraction, split.test_fraction) == (3, val_fraction, test_fraction)
    overall = np.bincount(labels, minlength=4) / n
    for part, wanted in ((split.val, val_fraction), (split.test, test_fraction)):
        assert abs(len(part) / n - wanted) <= 0.02
        if len(part):
            assert np.abs(np.bincount(labels[part], minlength=4) / len(part) - overall).max() <= 0.05
    assert abs(len(split.train) / n - (1 - val_fraction - test_fraction)) <= 0.03


def test_zero_val_fraction_gives_empty_val() -> None:
    labels, groups = _labels_and_groups()
    split = holdout_split(labels, groups, val_fraction=0.0, test_fraction=0.2)
    assert split.val.size == 0 and split.val.dtype.kind == "i"


def test_same_seed_same_split_and_different_seed_different_split() -> None:
    labels, groups = _labels_and_groups()
    a = holdout_split(labels, groups, seed=7)
    b = holdout_split(list(labels), list(groups), seed=7)
    c = holdout_split(labels, groups, seed=8)
    assert a == b
    assert a != c and not np.array_equal(a.test, c.test)


def test_split_is_not_equal_to_other_types() -> None:
    labels, groups = _labels_and_groups(100)
    assert holdout_split(labels, groups) != "split"


@settings(max_examples=25, deadline=None, database=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 3)), min_size=30, max_size=120),
    val_fraction=st.sampled_from([0.0, 0.1, 0.2]),
    test_fraction=st.sampled_from([0.1, 0.2, 0.3]),
    seed=st.integers(0, 1000),
)
def test_holdout_never_splits_a_group(
    data: list[tuple[int, int]], val_fraction: float, test_fraction: float, seed: int
) -> None:
    labels = np.repeat([label for label, _ in data], [size for _, size in data])
    groups = np.repeat(np.arange(len(data)), [size for _, size in data])
    split = holdout_split(labels, groups, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    _assert_partition(split, len(labels))
    _assert_groups_whole(_subset_of(split, len(labels)), groups)
    assert len(split.train) > 0 and len(split.test) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": -0.1}, r"val_fraction must be a number in \[0, 1\), got -0\.1"),
        ({"test_fraction": 1.0}, r"test_fraction must be a number in \[0, 1\), got 1\.0"),
        ({"test_fraction": "0.2"}, r"test_fraction must be a number in \[0, 1\), got '0\.2'"),
        ({"val_fraction": True}, r"val_fraction must be a number in \[0, 1\), got True"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"val_fraction \+ test_fraction must be below 0\.9"),
    ],
)
def test_holdout_rejects_bad_fractions(kwargs: dict[str, object], message: str) -> None:
    labels, groups = _labels_and_groups(100)
    with pytest.raises(ConfigError, match=message):
        holdout_split(labels, groups, **kwargs)  # type: ignore[arg-type]


HELD_OUT_MESSAGE = r"val_fraction \+ test_fraction must be below 0\.9 to leave at least a tenth of the images"


@pytest.mark.parametrize(("val_fraction", "test_fraction"), [(0.45, 0.45), (0.8, 0.1), (0.1, 0.8), (0.5, 0.45)])
def test_the_config_and_the_splitter_refuse_the_same_held_out_share(val_fraction: float, test_fraction: float) -> None:
    """One rule (check_fractions) for both: validation + test at MAX_HELD_OUT or above is refused alike."""
    from bcd_engine.models.config import TrainConfig

    assert MAX_HELD_OUT == 0.9
    labels, groups = _labels_and_groups(100)
    for refuse in (
        lambda: check_fractions(val_fraction, test_fraction),
        lambda: holdout_split(labels, groups, val_fraction=val_fraction, test_fraction=test_fraction),
        lambda: TrainConfig(backbone="mobilenetv2", val_fraction=val_fraction, test_fraction=test_fraction),
    ):
        with pytest.raises(ConfigError, match=HELD_OUT_MESSAGE):
            refuse()


def test_just_below_the_held_out_limit_both_accept_and_a_training_run_still_needs_validation_and_test() -> None:
    from bcd_engine.models.config import TrainConfig

    labels, groups = _labels_and_groups(800)
    split = holdout_split(labels, groups, val_fraction=0.44, test_fraction=0.44)
    assert len(split.train) > 0 and len(split.train) / len(labels) <= 0.2
    assert TrainConfig(backbone="mobilenetv2", val_fraction=0.44, test_fraction=0.44).val_fraction == 0.44
    assert len(holdout_split(labels, groups, val_fraction=0.0, test_fraction=0.3).val) == 0  # a split may have no val
    for zero in ({"val_fraction": 0.0}, {"test_fraction": 0.0}):
        with pytest.raises(ConfigError, match="a run needs validation and test images"):
            TrainConfig(backbone="mobilenetv2", **zero)
    with pytest.raises(ConfigError, match=r"val_fraction must be a number in \[0, 1\), got -0\.1"):
        TrainConfig(backbone="mobilenetv2", val_fraction=-0.1)  # the same range message as the splitter's


@pytest.mark.parametrize(
    ("labels", "groups", "message"),
    [
        ([0, 1, 0], [0, 1], r"labels and groups must have the same length, got 3 and 2"),
        ([], [], r"cannot split an empty dataset"),
        ([[0, 1]], [[0, 1]], r"labels and groups must be 1-D"),
        (
            [0, 1, 0, 1],
            [0, 0, 1, 1],
            r"too few images or groups to make train/val/test subsets \(at most 2 folds possible",
        ),
    ],
)
def test_holdout_rejects_bad_arrays(labels: list[int], groups: list[int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        holdout_split(labels, groups)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_group_kfold_folds_are_disjoint_cover_everything_and_keep_groups(k: int) -> None:
    labels, groups = _labels_and_groups()
    n = len(labels)
    folds = group_kfold(labels, groups, folds=k, seed=1)
    assert len(folds) == k
    tests = np.concatenate([test for _, test in folds])
    assert np.array_equal(np.sort(tests), np.arange(n))
    overall = np.bincount(labels, minlength=4) / n
    for train, test in folds:
        assert np.array_equal(train, np.sort(train)) and np.array_equal(test, np.sort(test))
        assert np.intersect1d(train, test).size == 0 and len(train) + len(test) == n
        assert np.intersect1d(groups[train], groups[test]).size == 0
        assert abs(len(test) / n - 1 / k) <= 0.02
        assert np.abs(np.bincount(labels[test], minlength=4) / len(test) - overall).max() <= 0.05


def test_group_kfold_is_seeded() -> None:
    labels, groups = _labels_and_groups()
    a, b, c = (group_kfold(labels, groups, seed=s) for s in (4, 4, 5))
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize(
    ("folds", "message"),
    [(1, r"got 1"), (4, r"got 4"), (2.0, r"got 2\.0"), (True, r"got True")],
)
def test_group_kfold_rejects_bad_folds(folds: object, message: str) -> None:
    with pytest.raises(ConfigError, match=r"folds must be an integer from 2 to 3 \(.*\), " + message):
        group_kfold([0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 2, 2], folds=folds)  # type: ignore[arg-type]


# --- splits of a scanned dataset ---------------------------------------------------------------------


@pytest.fixture
def dataset_with_duplicates(synthetic_dataset_copy: Path, isolated_cache: Path) -> Path:
    """The synthetic dataset plus exact copies of three images (three near-duplicate groups)."""
    for class_name in ("Benign", "Pre", "Pro"):
        source = synthetic_dataset_copy / class_name / f"synthetic-{class_name.lower()}-003.png"
        shutil.copyfile(source, source.with_name(source.stem + "-copy.png"))
    return synthetic_dataset_copy


def test_scanned_duplicates_stay_together_and_assignments_round_trip(dataset_with_duplicates: Path) -> None:
    scan = scan_dataset(dataset_with_duplicates)
    assert len(scan.near_duplicate_groups) == 3
    for seed in range(5):
        split = holdout_split(scan.labels, scan.groups, seed=seed)
        rows = split.assignments(scan)
        assert len(rows) == scan.n_images
        assert rows[0].keys() == {"path", "class_name", "subset", "group_id"}
        subset_of = {row["path"]: row["subset"] for row in rows}
        group_of = {row["path"]: row["group_id"] for row in rows}
        for group in scan.near_duplicate_groups:
            assert len({subset_of[p] for p in group}) == 1 and len({group_of[p] for p in group}) == 1
        rebuilt = split_from_assignments(scan, rows, seed=seed)
        for name in ("train", "val", "test"):
            assert np.array_equal(getattr(rebuilt, name), getattr(split, name))
        assert rebuilt.seed == seed and rebuilt.val_fraction == len(split.val) / scan.n_images


def _rows(dataset: Path) -> tuple[object, list[dict[str, object]]]:
    scan = scan_dataset(dataset)
    return scan, holdout_split(scan.labels, scan.groups).assignments(scan)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (
            lambda rows: rows.append({**rows[0], "path": "/gone/x.png"}),
            r"names 1 image\(s\) that are not in .* e\.g\. /gone/x\.png",
        ),
        (lambda rows: rows.__setitem__(0, {**rows[0], "subset": "holdout"}), r"unknown subset 'holdout'"),
        (lambda rows: rows.append(dict(rows[0])), r"lists .* more than once"),
        (lambda rows: rows.clear(), r"stored split is empty"),
    ],
)
def test_split_from_assignments_rejects_inconsistent_rows(
    dataset_with_duplicates: Path, tamper: object, message: str
) -> None:
    scan, rows = _rows(dataset_with_duplicates)
    tamper(rows)  # type: ignore[operator]
    with pytest.raises(DataError, match=message):
        split_from_assignments(scan, rows)  # type: ignore[arg-type]
