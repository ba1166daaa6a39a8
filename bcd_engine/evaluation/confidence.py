"""Uncertainty of test-set figures: bootstrap confidence intervals and calibration (ECE, reliability bins).

Everything here computes numbers only; pages draw them. ``y_true`` holds class indices and ``y_prob``
is an (n, n_classes) array of predicted probabilities, as in :mod:`bcd_engine.evaluation.metrics`.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from bcd_engine.errors import ConfigError

METRICS = ("accuracy", "macro_f1", "macro_auc")


def sample_std(values) -> float | None:
    """Sample standard deviation (n - 1 in the denominator), e.g. of CV folds' figures; None for fewer than two."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def bootstrap_ci(
    y_true,
    y_prob,
    *,
    metric: str,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    groups=None,
) -> dict:
    """Point estimate and percentile bootstrap interval of one metric: {"estimate", "low", "high", "n_resamples"}.

    Resamples test cases with replacement; with ``groups`` (a group id per case, e.g. the scan's
    near-duplicate groups) whole groups are resampled, since the members of a group are not independent.
    For macro_auc, resamples missing a class are skipped (``n_resamples`` reports how many were used);
    every value is None when the full set misses a class.
    """
    y, prob = _check_inputs(y_true, y_prob)
    group_of = _group_codes(groups, len(y))
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {METRICS}, got {metric!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ConfigError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ConfigError(f"confidence must be a number in (0, 1), got {confidence!r}")
    estimate = _score(metric, y, prob)
    if estimate is None:
        return {"estimate": None, "low": None, "high": None, "n_resamples": 0}
    n_groups = int(group_of.max()) + 1
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(n_resamples, n_groups))
    blocks = _blocks(draws, n_cases=len(y))
    scored = [_resample_scores(metric, y, prob, _case_weights(block, group_of)) for block in blocks]
    values = np.concatenate(scored)
    values = values[~np.isnan(values)]
    if not len(values):
        return {"estimate": estimate, "low": None, "high": None, "n_resamples": 0}
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return {"estimate": estimate, "low": float(low), "high": float(high), "n_resamples": len(values)}


def bootstrap_cis(y_true, y_prob, **kwargs) -> dict[str, dict]:
    """:func:`bootstrap_ci` for accuracy, macro_f1 and macro_auc, on the same resamples (same seed)."""
    return {metric: bootstrap_ci(y_true, y_prob, metric=metric, **kwargs) for metric in METRICS}


def _group_codes(groups, n: int) -> np.ndarray:
    """Group ids as codes 0..k-1 per case (each case its own group when ``groups`` is None)."""
    if groups is None:
        return np.arange(n)
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ConfigError(f"groups must hold one id per case ({n}), got shape {groups.shape}")
    return np.unique(groups, return_inverse=True)[1].reshape(n)


RESAMPLES_AT_ONCE_CELLS = 4_000_000  # resamples x cases scored together: a few 32 MB arrays at a time


def _blocks(draws: np.ndarray, *, n_cases: int) -> list[np.ndarray]:
    """The resamples' draws in blocks small enough to score together (each resample weighs ``n_cases`` cases)."""
    per_block = max(1, RESAMPLES_AT_ONCE_CELLS // n_cases)
    return [draws[start : start + per_block] for start in range(0, len(draws), per_block)]


def _case_weights(draws: np.ndarray, group_of: np.ndarray) -> np.ndarray:
    """(resamples, cases): how many times each case is in each resample (its group's draws)."""
    n_resamples, n_groups = draws.shape
    offsets = np.arange(n_resamples)[:, None] * n_groups
    counts = np.bincount((draws + offsets).ravel(), minlength=n_resamples * n_groups)
    return counts.reshape(n_resamples, n_groups)[:, group_of].astype(np.float64)


def _resample_scores(metric: str, y: np.ndarray, prob: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``metric`` of each resample, given as case counts (rows of ``weights``); NaN where :func:`_score` gives
    None. A case drawn k times counts k times, so each value is what :func:`_score` gives on the resample."""
    n_classes = prob.shape[1]
    pred = prob.argmax(axis=1)
    if metric == "accuracy":
        return weights @ (pred == y) / weights.sum(axis=1)
    if metric == "macro_f1":
        true_hot = np.eye(n_classes)[y]
        pred_hot = np.eye(n_classes)[pred]
        tp, true_n, pred_n = weights @ (true_hot * pred_hot), weights @ true_hot, weights @ pred_hot
        present = (true_n + pred_n) > 0  # the classes in the resample's labels or predictions
        f1 = np.divide(2 * tp, true_n + pred_n, out=np.zeros_like(tp), where=present)
        return f1.sum(axis=1) / present.sum(axis=1)
    scored_classes = [1] if n_classes == 2 else range(n_classes)  # binary: the AUC of class 1, as _score
    aucs = np.stack([_weighted_auc(prob[:, c], y == c, weights) for c in scored_classes])
    every_class = (weights @ np.eye(n_classes)[y] > 0).all(axis=1)
    return np.where(every_class, aucs.mean(axis=0), np.nan)


def _weighted_auc(score: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of ``score`` for ``positive`` cases per row of case ``weights``: the weighted share of
    (positive, negative) pairs the score orders right, ties counting half (NaN for a row without both)."""
    order = np.argsort(score, kind="stable")
    sorted_score = score[order]
    first = np.searchsorted(sorted_score, sorted_score, side="left")  # each case's tie group, in sorted order
    last = np.searchsorted(sorted_score, sorted_score, side="right") - 1
    negatives = weights[:, order] * ~positive[order]
    positives = weights[:, order] * positive[order]
    below_or_tied = np.cumsum(negatives, axis=1)
    through_last = below_or_tied[:, last]
    below = np.where(first > 0, below_or_tied[:, np.maximum(first - 1, 0)], 0.0)
    pairs = positives.sum(axis=1) * negatives.sum(axis=1)
    right = (positives * (below + 0.5 * (through_last - below))).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, right / pairs, np.nan)


def reliability_diagram(y_true, y_prob, *, n_bins: int = 15) -> dict:
    """Top-label reliability bins: equal-width confidence bins with mean confidence, accuracy and count.

    Bin k covers (edge[k], edge[k+1]] (the first also holds 0); empty bins have None confidence and accuracy.
    """
    edges, count, mean_conf, accuracy = _bins(y_true, y_prob, n_bins)
    return {
        "bin_edges": edges.tolist(),
        "confidence": [float(v) if c else None for v, c in zip(mean_conf, count)],
        "accuracy": [float(v) if c else None for v, c in zip(accuracy, count)],
        "count": count.tolist(),
    }


def expected_calibration_error(y_true, y_prob, *, n_bins: int = 15) -> float:
    """Top-label ECE: count-weighted mean |accuracy - confidence| over the :func:`reliability_diagram` bins."""
    _, count, mean_conf, accuracy = _bins(y_true, y_prob, n_bins)
    filled = count > 0
    return float((count[filled] * np.abs(accuracy[filled] - mean_conf[filled])).sum() / count.sum())


def _bins(y_true, y_prob, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bin edges, and per bin: count, mean top-label confidence, accuracy (NaN where empty)."""
    y, prob = _check_inputs(y_true, y_prob)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer, got {n_bins!r}")
    conf = prob.max(axis=1)
    correct = (prob.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / count
    return edges, count, mean_conf, accuracy


def _score(metric: str, y: np.ndarray, prob: np.ndarray) -> float | None:
    """One metric with scikit-learn; macro_auc is None unless every class occurs in ``y``."""
    if metric == "macro_auc":
        n_classes = prob.shape[1]
        if len(np.unique(y)) < n_classes:
            return None
        if n_classes == 2:
            return float(skm.roc_auc_score(y, prob[:, 1]))
        return float(skm.roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=np.arange(n_classes)))
    pred = prob.argmax(axis=1)
    if metric == "accuracy":
        return float(skm.accuracy_score(y, pred))
    return macro_f1(y, pred)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean F1 over every class that occurs in the labels or the predictions: a class the model
    predicts but the test set lacks counts (its F1 is 0) instead of being left out."""
    return float(skm.f1_score(y_true, y_pred, labels=np.union1d(y_true, y_pred), average="macro", zero_division=0))


def _check_inputs(y_true, y_prob) -> tuple[np.ndarray, np.ndarray]:
    """Labels as ints and probabilities as rows summing to 1; raise ConfigError on bad shapes or values."""
    y = np.asarray(y_true)
    prob = np.asarray(y_prob, dtype=np.float64)
    if prob.ndim != 2 or prob.shape[1] < 2:
        raise ConfigError(f"y_prob must be (n, n_classes) with at least 2 classes, got shape {prob.shape}")
    if y.ndim != 1 or len(y) != len(prob) or len(y) == 0:
        raise ConfigError(f"y_true must be 1-D and match y_prob's {len(prob)} rows, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= prob.shape[1]:
        raise ConfigError(f"y_true must hold class indices from 0 to {prob.shape[1] - 1}")
    if not np.isfinite(prob).all() or (prob < 0).any() or (prob.sum(axis=1) <= 0).any():
        raise ConfigError("y_prob must be finite, non-negative, with a positive sum in every row")
    return y.astype(np.int64), prob / prob.sum(axis=1, keepdims=True)
