"""Bootstrap confidence intervals and calibration error."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics as skm

from bcd_engine.errors import ConfigError
from bcd_engine.evaluation.confidence import (
    METRICS,
    bootstrap_ci,
    bootstrap_cis,
    expected_calibration_error,
    reliability_diagram,
)


def _calibrated(n: int, n_classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities from a Dirichlet and labels drawn from them: calibrated by construction."""
    rng = np.random.default_rng(seed)
    prob = rng.dirichlet(np.full(n_classes, 0.7), size=n)
    labels = (rng.random(n)[:, None] > np.cumsum(prob, axis=1)).sum(axis=1)
    return np.minimum(labels, n_classes - 1), prob


def test_intervals_contain_the_estimate_for_every_metric():
    y, prob = _calibrated(300)
    cis = bootstrap_cis(y, prob, n_resamples=200, seed=1)
    assert set(cis) == set(METRICS)
    for ci in cis.values():
        assert 0 <= ci["low"] <= ci["estimate"] <= ci["high"] <= 1
        assert ci["n_resamples"] == 200


def test_intervals_narrow_with_more_data():
    small, large = _calibrated(80, seed=2), _calibrated(2000, seed=2)
    for metric in METRICS:
        a = bootstrap_ci(*small, metric=metric, n_resamples=150)
        b = bootstrap_ci(*large, metric=metric, n_resamples=150)
        assert b["high"] - b["low"] < 0.6 * (a["high"] - a["low"]), metric


def test_bootstrap_is_deterministic_for_a_seed():
    y, prob = _calibrated(100)
    first = bootstrap_ci(y, prob, metric="macro_f1", n_resamples=50, seed=3)
    assert bootstrap_ci(y, prob, metric="macro_f1", n_resamples=50, seed=3) == first
    other = bootstrap_ci(y, prob, metric="macro_f1", n_resamples=50, seed=4)
    assert other["estimate"] == first["estimate"] and (other["low"], other["high"]) != (first["low"], first["high"])


def _scikit_learn_interval(y, prob, metric: str, *, n_resamples: int, seed: int, groups) -> tuple[float, float, int]:
    """The interval as scikit-learn scores each resample built as a list of cases (the draws bootstrap_ci makes)."""
    codes = np.unique(groups, return_inverse=True)[1]
    n_groups = codes.max() + 1
    values = []
    for draw in np.random.default_rng(seed).integers(0, n_groups, size=(n_resamples, n_groups)):
        cases = np.repeat(np.arange(len(y)), np.bincount(draw, minlength=n_groups)[codes])
        truth, scores, pred = y[cases], prob[cases], prob[cases].argmax(axis=1)
        if metric == "accuracy":
            values.append(skm.accuracy_score(truth, pred))
        elif metric == "macro_f1":
            labels = np.union1d(truth, pred)
            values.append(skm.f1_score(truth, pred, labels=labels, average="macro", zero_division=0))
        elif len(np.unique(truth)) == prob.shape[1]:
            values.append(
                skm.roc_auc_score(truth, scores[:, 1])
                if prob.shape[1] == 2
                else skm.roc_auc_score(truth, scores, multi_class="ovr", average="macro")
            )
    low, high = np.quantile(values, [0.025, 0.975])
    return low, high, len(values)


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("metric", METRICS)
def test_every_resample_scores_as_scikit_learn_scores_it_ties_and_groups_included(metric, n_classes):
    y, prob = _calibrated(60, n_classes=n_classes, seed=5)
    rng = np.random.default_rng(6)
    prob = np.stack([rng.multinomial(8, row) for row in prob]) / 8  # eighths: many tied scores, rows sum to 1
    groups = np.arange(60) // 3  # three cases a group, resampled whole
    ci = bootstrap_ci(y, prob, metric=metric, n_resamples=120, seed=7, groups=groups)
    low, high, used = _scikit_learn_interval(y, prob, metric, n_resamples=120, seed=7, groups=groups)
    assert ci["n_resamples"] == used
    assert ci["low"] == pytest.approx(low, abs=1e-12) and ci["high"] == pytest.approx(high, abs=1e-12)


def test_resamples_scored_in_small_blocks_give_the_same_interval(monkeypatch):
    from bcd_engine.evaluation import confidence

    y, prob = _calibrated(90, seed=8)
    at_once = bootstrap_cis(y, prob, n_resamples=300, seed=2)
    monkeypatch.setattr(confidence, "RESAMPLES_AT_ONCE_CELLS", 90 * 7)  # blocks of 7 resamples, the last one short
    assert bootstrap_cis(y, prob, n_resamples=300, seed=2) == at_once


def test_auc_skips_resamples_missing_a_class_and_is_none_without_one():
    y, prob = _calibrated(40)
    y = np.where(y == 2, 1, y)
    y[0] = 2  # one member of class 2: many resamples miss it
    ci = bootstrap_ci(y, prob, metric="macro_auc", n_resamples=100)
    assert 0 < ci["n_resamples"] < 100 and ci["low"] <= ci["estimate"] <= ci["high"]
    y[0] = 1
    assert bootstrap_ci(y, prob, metric="macro_auc", n_resamples=10) == {
        "estimate": None,
        "low": None,
        "high": None,
        "n_resamples": 0,
    }


def test_ece_near_zero_when_calibrated_and_large_when_overconfident():
    y, prob = _calibrated(20000, seed=4)
    assert expected_calibration_error(y, prob) < 0.02
    sharp = prob**4 / (prob**4).sum(axis=1, keepdims=True)
    assert expected_calibration_error(y, sharp) > 0.1


def test_reliability_diagram_bins():
    y = np.array([0, 1, 1, 0])
    prob = np.array([[0.95, 0.05], [0.05, 0.95], [0.6, 0.4], [0.55, 0.45]])
    bins = reliability_diagram(y, prob, n_bins=5)
    assert bins["bin_edges"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert bins["count"] == [0, 0, 2, 0, 2]
    assert bins["confidence"][:2] == [None, None] and bins["confidence"][2] == pytest.approx(0.575)
    assert bins["accuracy"][2] == pytest.approx(0.5) and bins["accuracy"][4] == pytest.approx(1.0)
    assert expected_calibration_error(y, prob, n_bins=5) == pytest.approx((2 * 0.075 + 2 * 0.05) / 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metric": "recall"}, "metric must be one of .*, got 'recall'"),
        ({"metric": "accuracy", "n_resamples": 0}, "n_resamples must be a positive integer, got 0"),
        ({"metric": "accuracy", "confidence": 1.0}, r"confidence must be a number in \(0, 1\), got 1.0"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        bootstrap_ci([0, 1], [[0.6, 0.4], [0.3, 0.7]], **kwargs)


@pytest.mark.parametrize(
    "y, prob, message",
    [
        ([0, 2], [[0.6, 0.4], [0.3, 0.7]], "y_true must hold class indices from 0 to 1"),
        ([0], [[0.5, 0.5], [0.5, 0.5]], "y_true must be 1-D and match y_prob's 2 rows"),
        ([0, 1], [0.5, 0.5], r"y_prob must be \(n, n_classes\) with at least 2 classes"),
        ([0, 1], [[-1, 2], [0.5, 0.5]], "y_prob must be finite, non-negative"),
    ],
)
def test_bad_inputs_raise_config_error(y, prob, message):
    with pytest.raises(ConfigError, match=message):
        expected_calibration_error(y, prob)


def test_macro_f1_counts_a_class_predicted_but_absent_from_the_test_set():
    from bcd_engine.evaluation.confidence import macro_f1

    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 2, 1, 1])  # class 2 never occurs, but the model says it once
    assert macro_f1(y_true, y_pred) == pytest.approx(
        skm.f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro", zero_division=0)
    )
    assert macro_f1(y_true, y_true) == 1.0


def test_sample_std_divides_by_n_minus_one_and_needs_two_values():
    from bcd_engine.evaluation.confidence import sample_std

    assert sample_std([0.98, 0.99, 1.0]) == pytest.approx(0.01)
    assert sample_std([0.99]) is None and sample_std([]) is None


def test_group_bootstrap_resamples_whole_groups_so_copies_do_not_narrow_the_interval():
    rng = np.random.default_rng(0)
    y_true = np.repeat(rng.integers(0, 2, 40), 5)  # 40 cases, each seen five times (near-copies)
    right = np.repeat(rng.random(40) < 0.75, 5)
    y_prob = np.eye(2)[np.where(right, y_true, 1 - y_true)]
    groups = np.arange(200) // 5
    by_image = bootstrap_ci(y_true, y_prob, metric="accuracy")
    by_group = bootstrap_ci(y_true, y_prob, metric="accuracy", groups=groups)
    singles = bootstrap_ci(y_true[::5], y_prob[::5], metric="accuracy")
    assert by_group["estimate"] == by_image["estimate"]
    assert by_group["high"] - by_group["low"] > 1.5 * (by_image["high"] - by_image["low"])
    assert by_group["high"] - by_group["low"] == pytest.approx(singles["high"] - singles["low"], abs=0.05)
    # One case per group is the plain bootstrap, resample for resample.
    assert bootstrap_ci(y_true, y_prob, metric="accuracy", groups=np.arange(200)) == by_image
    with pytest.raises(ConfigError, match="one id per case"):
        bootstrap_ci(y_true, y_prob, metric="accuracy", groups=groups[:-1])
