"""The classical hand-crafted-feature baseline."""

from __future__ import annotations

import numpy as np
import pytest

from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.splits import holdout_split
from bcd_engine.errors import ConfigError
from bcd_engine.protocols.audit import N_COLOUR_FEATURES
from bcd_engine.protocols.baselines import (
    cross_validate_classical,
    glcm_features,
    handcrafted_features,
    otsu_threshold,
    shape_features,
    train_classical_baseline,
)


def test_glcm_of_flat_and_striped_images():
    flat = np.full((1, 8, 8), 100, dtype=np.uint8)
    contrast, homogeneity, energy, correlation = glcm_features(flat)[0, :4]
    assert (contrast, homogeneity, energy, correlation) == (0, 1, 1, 1)
    stripes = np.zeros((1, 8, 8), dtype=np.uint8)
    stripes[:, :, ::2] = 255
    features = glcm_features(stripes)[0].reshape(2, 4, 4)  # distance, angle, property
    assert features[0, 0, 0] == 31**2  # distance 1, angle 0: every neighbour differs by all levels
    assert features[0, 2, 0] == 0  # angle 90: along the stripe
    assert features[0, 0, 3] == pytest.approx(-1)


def test_otsu_and_shape_of_a_dark_disc():
    yy, xx = np.mgrid[:40, :40]
    disc = np.where((yy - 20) ** 2 + (xx - 20) ** 2 <= 64, 40, 220).astype(np.uint8)
    assert 40 <= otsu_threshold(disc) < 220
    dark, nucleus, perimeter, eccentricity = shape_features(disc)
    assert dark == nucleus == pytest.approx(np.pi * 64 / 1600, rel=0.1)
    assert 0 < perimeter < 1 and eccentricity < 0.2
    ellipse = np.where(((yy - 20) / 4) ** 2 + ((xx - 20) / 15) ** 2 <= 1, 40, 220).astype(np.uint8)
    assert shape_features(ellipse)[3] > 0.9
    assert shape_features(np.full((5, 5), 9, dtype=np.uint8)).tolist() == [0, 0, 0, 0]  # flat: nothing dark


def test_handcrafted_features_shape():
    images = np.random.default_rng(0).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    features = handcrafted_features(images)
    assert features.shape == (3, N_COLOUR_FEATURES + 32 + 4) and np.isfinite(features).all()
    with pytest.raises(ConfigError, match=r"expected uint8 RGB images of shape \(n, h, w, 3\)"):
        handcrafted_features(images[..., 0])


@pytest.mark.parametrize("model", ["svm", "logreg"])
def test_classical_baseline_runs_on_synthetic_data(synthetic_dataset, isolated_cache, model):
    scan = scan_dataset(synthetic_dataset)
    result = train_classical_baseline(scan, image_size=32, model=model)
    assert result["protocol"] == "holdout (group-aware, stratified)" and result["model"] == model
    assert result["n_train"] + result["n_test"] == scan.n_images
    assert 0 <= result["test_accuracy"] <= 1 and 0 <= result["macro_auc"] <= 1
    assert set(result["per_class"]) == set(scan.class_names) and result["seconds"] >= 0
    again = train_classical_baseline(scan, image_size=32, model=model)
    timings = ("seconds", "stage_seconds")
    assert {k: v for k, v in again.items() if k not in timings} == {k: v for k, v in result.items() if k not in timings}
    assert sum(result["stage_seconds"].values()) == pytest.approx(result["seconds"], abs=0.05)


def test_classical_baseline_tests_on_the_split_train_makes_for_the_same_fractions(synthetic_dataset, isolated_cache):
    scan = scan_dataset(synthetic_dataset)
    split = holdout_split(scan.labels, scan.groups, seed=1, val_fraction=0.1, test_fraction=0.3)
    result = train_classical_baseline(scan, image_size=32, model="logreg", seed=1, val_fraction=0.1, test_fraction=0.3)
    assert result["n_test"] == len(split.test) and result["n_train"] == len(split.train) + len(split.val)
    assert result["n_test"] != len(holdout_split(scan.labels, scan.groups, seed=1).test)


def test_svm_calibration_folds_keep_duplicate_groups_together(monkeypatch):
    from bcd_engine.protocols import baselines

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    groups = np.arange(80) // 4  # groups of four near-copies
    features = rng.normal(size=(80, 3)) + labels[:, None]
    seen = []
    calibrated = baselines.CalibratedClassifierCV

    def recording(*args, cv, **kwargs):
        seen.extend(cv)
        return calibrated(*args, cv=cv, **kwargs)

    monkeypatch.setattr(baselines, "CalibratedClassifierCV", recording)
    train, test = np.arange(60), np.arange(60, 80)
    baselines._fit_and_evaluate(features, labels, groups, train, test, model="svm", seed=0, class_names=["a", "b"])
    assert len(seen) == baselines.CALIBRATION_FOLDS
    for fit_on, calibrate_on in seen:
        assert not set(groups[train][fit_on]) & set(groups[train][calibrate_on])


@pytest.mark.parametrize(("groups_per_class", "folds"), [((2, 2), 2), ((3, 1), 5)])
def test_svm_calibration_copes_with_classes_of_few_groups(groups_per_class, folds):
    from bcd_engine.protocols.baselines import _calibration_folds, _fit_and_evaluate

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 12)
    groups = np.concatenate([np.arange(12) % n + 10 * k for k, n in enumerate(groups_per_class)])
    chosen = _calibration_folds(labels, groups, seed=0)
    assert (len(chosen) if isinstance(chosen, list) else chosen) == folds  # a single-group class: plain folds
    features = rng.normal(size=(24, 3)) + labels[:, None] * 3.0
    train, test = np.flatnonzero(np.arange(24) % 4 != 3), np.arange(3, 24, 4)  # every group on the training side
    evaluation = _fit_and_evaluate(features, labels, groups, train, test, model="svm", seed=0, class_names=["a", "b"])
    assert evaluation.accuracy > 0.8


def test_unknown_model_is_a_config_error(synthetic_dataset, isolated_cache):
    with pytest.raises(ConfigError, match=r"model must be one of .*, got 'knn'"):
        train_classical_baseline(scan_dataset(synthetic_dataset), model="knn")
    with pytest.raises(ConfigError, match="folds must be >= 2, got 1"):
        cross_validate_classical(scan_dataset(synthetic_dataset), folds=1)


def test_classical_baseline_under_k_fold_cv_tests_every_image_once(synthetic_dataset, isolated_cache):
    scan = scan_dataset(synthetic_dataset)
    result = cross_validate_classical(scan, folds=3, image_size=32, model="logreg")
    assert result["protocol"].startswith("3-fold CV") and len(result["folds"]) == 3
    assert sum(f["n_test"] for f in result["folds"]) == scan.n_images
    assert all(f["n_train"] + f["n_test"] == scan.n_images for f in result["folds"])
    accuracies = [f["accuracy"] for f in result["folds"]]
    assert result["mean"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert result["std"]["accuracy"] == pytest.approx(np.std(accuracies, ddof=1))


@pytest.mark.parametrize("model", ["svm", "logreg"])
def test_a_class_missing_from_the_training_side_gets_a_zero_column(model):
    from bcd_engine.protocols.baselines import _fit_and_evaluate

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 12)
    features = rng.normal(size=(36, 4)) + labels[:, None] * 3.0
    train = np.flatnonzero(labels < 2)[::2].tolist() + np.flatnonzero(labels < 2)[1::4].tolist()
    test = np.setdiff1d(np.arange(36), train)  # holds every class-2 image
    evaluation = _fit_and_evaluate(
        features, labels, np.arange(36), np.array(train), test, model=model, seed=0, class_names=["a", "b", "c"]
    )
    assert evaluation.metrics["per_class"]["c"]["recall"] == 0.0  # never predicted: it was never seen
    assert evaluation.metrics["per_class"]["a"]["recall"] > 0.5
