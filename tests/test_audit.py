"""Leakage and shortcut audits, colour features and colour normalisation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bcd_engine.data.colour import normalise_colour
from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.splits import group_kfold, holdout_split
from bcd_engine.errors import ConfigError
from bcd_engine.protocols.audit import (
    N_COLOUR_FEATURES,
    NO_PATIENT_IDS_WARNING,
    colour_features,
    colour_robustness,
    corner_features,
    leakage_audit,
    shortcut_audit,
)


def _noise_dataset(root: Path, *, tinted: bool, n_per_class: int = 16, size: int = 12) -> Path:
    """Random-noise images; with ``tinted`` each class adds 40 to its own channel, otherwise colour is class-free."""
    for k, name in enumerate(("A", "B", "C")):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = np.random.default_rng([k, i]).integers(60, 200, size=(size, size, 3))
            if tinted:
                pixels[..., k] += 40
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def test_colour_features_shape_and_values():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[..., 0] = 255
    features = colour_features([image, np.full((2, 3, 3), 16, dtype=np.uint8)])
    assert features.shape == (2, N_COLOUR_FEATURES)
    assert features[0, :6].tolist() == [1, 0, 0, 0, 0, 0]
    assert features[0, 6 + 15] == 1 and features[0, 6 + 16] == 1  # red in the top bin, green in the bottom
    assert features[1, 6 + 1] == 1
    corner = corner_features([image], fraction=0.5)
    assert corner.shape == (1, N_COLOUR_FEATURES)
    with pytest.raises(ConfigError, match=r"corner fraction must be in \(0, 1\], got 0"):
        corner_features([image], fraction=0)


def test_shortcut_audit_detects_a_planted_colour_shortcut(tmp_path, isolated_cache):
    scan = scan_dataset(_noise_dataset(tmp_path / "tinted", tinted=True))
    result = shortcut_audit(scan, image_size=12)
    assert result["colour_only_accuracy"] >= 0.9 and result["colour_shortcut"]
    assert result["corner_only_accuracy"] >= 0.9
    assert result["n_train"] + result["n_test"] == 48 and 0 < result["chance_accuracy"] < 0.5
    assert "classify" in result["interpretation"]


def test_colour_robustness_shows_the_planted_shortcut_falling(tmp_path, isolated_cache):
    scan = scan_dataset(_noise_dataset(tmp_path / "tinted", tinted=True))
    result = colour_robustness(scan, image_size=12)
    assert result["original_accuracy"] >= 0.9
    for method in ("grayscale", "reinhard"):
        assert result["normalised"][method]["accuracy"] <= 0.5
        assert 0 <= result["normalised"][method]["retrained_accuracy"] <= 1


def test_shortcut_audit_reports_chance_without_a_shortcut(tmp_path, isolated_cache):
    scan = scan_dataset(_noise_dataset(tmp_path / "plain", tinted=False))
    result = shortcut_audit(scan, image_size=12)
    assert not result["colour_shortcut"]
    assert result["colour_only_accuracy"] <= result["chance_accuracy"] + 0.25
    assert "no strong colour shortcut" in result["interpretation"]


def test_leakage_audit_flags_a_crossing_duplicate_and_passes_group_aware_splits(synthetic_dataset_copy, isolated_cache):
    original = synthetic_dataset_copy / "Benign" / "synthetic-benign-001.png"
    shutil.copy(original, original.with_name("synthetic-benign-copy.png"))
    scan = scan_dataset(synthetic_dataset_copy)
    assert len(scan.duplicate_groups) == 1

    split = holdout_split(scan.labels, scan.groups, seed=0)
    good = leakage_audit(scan, split)
    assert good["ok"] and good["crossing_groups"] == [] and good["warnings"] == [NO_PATIENT_IDS_WARNING]
    assert good["counts"]["exact_duplicate_groups"] == 1
    assert leakage_audit(scan, split.assignments(scan))["ok"]
    folds = leakage_audit(scan, group_kfold(scan.labels, scan.groups, folds=3))
    assert folds["ok"] and folds["protocol"] == "cross-validation" and folds["n_folds"] == 3

    a, b = (scan.paths.index(p) for p in scan.duplicate_groups[0])
    rest = [i for i in range(scan.n_images) if i != b]
    bad = leakage_audit(scan, {"train": rest, "test": [b]})
    assert not bad["ok"] and bad["counts"]["crossing_exact"] == 1 and bad["counts"]["crossing_near"] == 1
    assert {tuple(c["subsets"]) for c in bad["crossing_groups"]} == {("test", "train")}
    assert NO_PATIENT_IDS_WARNING in bad["warnings"] and len(bad["warnings"]) == 2

    rows = split.assignments(scan)
    subset_of_a = rows[a]["subset"]
    rows[b]["subset"] = next(s for s in ("train", "val", "test") if s != subset_of_a)
    assert not leakage_audit(scan, rows)["ok"]
    with pytest.raises(ConfigError, match=r"expected a Split, a \{subset: indices\} mapping"):
        leakage_audit(scan, [1, 2, 3])


def test_normalise_colour():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    gray = normalise_colour(images, method="grayscale")
    assert gray.dtype == np.uint8 and gray.shape == images.shape
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()

    tinted = np.clip(images.astype(int) + np.array([60, 0, -40]), 0, 255).astype(np.uint8)
    matched = normalise_colour(tinted, method="reinhard", reference=images)
    assert matched.dtype == np.uint8 and matched.shape == images.shape
    before = np.abs(tinted.mean(axis=(0, 1, 2)) - images.mean(axis=(0, 1, 2))).max()
    after = np.abs(matched.mean(axis=(0, 1, 2)) - images.mean(axis=(0, 1, 2))).max()
    assert after < before / 3
    with pytest.raises(ConfigError, match=r"method must be one of .*, got 'hsv'"):
        normalise_colour(images, method="hsv")
