"""An out-of-distribution gate: does an image look like the images a model was trained on?

Class-conditional Gaussians with one shared covariance on the network's pooled features (Lee et al.,
NeurIPS 2018, "A simple unified framework for detecting out-of-distribution samples"): an image's score
is its smallest squared Mahalanobis distance to a class mean. The covariance is shrunk (Ledoit-Wolf),
since a backbone has more features (2,048 for ResNet50) than a dataset has images per class.

The threshold is set from in-domain images only, never from out-of-domain examples, which a real user does
not have, and from scores of images the gate was not fitted on, so that at most 1% of new in-domain images
are refused (``DEFAULT_PASS_RATE``), with 95% confidence (``CONFIDENCE``): :func:`pass_bound` on two sets of
held-out scores, keeping the higher threshold. One set is the validation images; the other pools them with
the training images, each scored by a gate fitted on the other folds (:func:`cross_fitted_scores`). The
validation images guard against a network trained on the training images (their features then sit closer to
the class means than a new image's); the pooled scores against a validation set too small for the bound.
Gates saved before this rule (``VALIDATION_QUANTILE_RULE``) set the threshold at the 95th percentile of the
validation scores, which refuses about one in twenty in-domain images by construction.

What it catches: images far from every class in feature space (another lab's stain or microscope, not a
smear at all, noise, a blank frame). What it does not: an in-domain image the model gets wrong, or an
unusual image that happens to land near a class mean. A pass is not a correct answer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from bcd_engine.errors import ConfigError

DEFAULT_PASS_RATE = 0.99  # share of new in-domain images the threshold lets through (at least)
CONFIDENCE = 0.95  # how sure the bound is that at least the pass rate gets through
CROSS_FIT_FOLDS = 5
HELD_OUT_BOUND_RULE = "held-out bound"  # this module's rule, saved with the gate
VALIDATION_QUANTILE_RULE = "validation quantile"  # gates saved before it: the pass rate's quantile of validation


@dataclass(frozen=True)
class MahalanobisGate:
    """Class means (classes, d), shared precision matrix (d, d), the threshold on the score, the share of
    in-domain images the threshold is set to let through and the rule that set it."""

    means: np.ndarray
    precision: np.ndarray
    threshold: float
    pass_rate: float = DEFAULT_PASS_RATE
    rule: str = HELD_OUT_BOUND_RULE

    @classmethod
    def fit(
        cls,
        features,
        labels,
        val_features,
        *,
        pass_rate: float = DEFAULT_PASS_RATE,
        confidence: float = CONFIDENCE,
        folds: int = CROSS_FIT_FOLDS,
    ) -> MahalanobisGate:
        """Fit on training ``features`` (n, d) with their ``labels``; set the threshold so that, with
        ``confidence``, at least ``pass_rate`` of new in-domain images pass (module docstring), from the scores of
        the in-domain ``val_features`` and the training rows' ``folds``-fold cross-fitted scores.

        >>> rng = np.random.default_rng(0)
        >>> gate = MahalanobisGate.fit(rng.normal(size=(500, 4)), np.arange(500) % 2, rng.normal(size=(100, 4)))
        >>> bool(gate.in_domain(np.zeros((1, 4)))[0]), bool(gate.in_domain(np.full((1, 4), 10.0))[0])
        (True, False)
        """
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels, dtype=int)
        if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
            raise ConfigError(f"need at least 2 training feature rows with one label each, got {x.shape}, {y.shape}")
        if not 0 < pass_rate < 1 or not 0 < confidence < 1:
            raise ConfigError(f"pass_rate and confidence must be between 0 and 1, got {pass_rate}, {confidence}")
        gate = cls(*_class_gaussians(x, y), threshold=np.inf, pass_rate=pass_rate)
        val = np.asarray(val_features, dtype=np.float64)
        val_scores = gate.score(val) if val.size else np.zeros(0)
        pooled = np.concatenate([cross_fitted_scores(x, y, folds=folds), val_scores])
        if not len(pooled):  # too few images to hold any out: the training images' own scores
            pooled = gate.score(x)
        threshold = max(
            pass_bound(scores, pass_rate=pass_rate, confidence=confidence)
            for scores in (pooled, val_scores)
            if len(scores)
        )
        return cls(gate.means, gate.precision, threshold=threshold, pass_rate=pass_rate)

    def score(self, features) -> np.ndarray:
        """Smallest squared Mahalanobis distance to a class mean, per row of ``features`` (higher: more unusual)."""
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if x.shape[1] != self.means.shape[1]:
            raise ConfigError(f"the gate was fitted on {self.means.shape[1]} features, got {x.shape[1]}")
        # (x - m) P (x - m) = x P x - 2 x P m + m P m, with P m and m P m computed once per gate
        means_p, means_pm = self._means_terms
        quadratic = np.einsum("nd,nd->n", x @ self.precision, x)
        return np.maximum(quadratic[:, None] - 2 * x @ means_p.T + means_pm[None, :], 0).min(axis=1)

    @functools.cached_property
    def _means_terms(self) -> tuple[np.ndarray, np.ndarray]:
        means_p = self.means @ self.precision
        return means_p, np.einsum("cd,cd->c", means_p, self.means)

    def in_domain(self, features) -> np.ndarray:
        return self.score(features) <= self.threshold


def _class_gaussians(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The means of the classes present in ``y`` and the precision of the rows around their class mean: the
    inverse of sklearn's ``LedoitWolf`` covariance, by Cholesky (positive definite once shrunk; sklearn's
    eigendecomposition takes 30 times as long for ResNet50's 2,048 features)."""
    from scipy.linalg import LinAlgError, cho_factor, cho_solve, pinvh
    from sklearn.covariance import ledoit_wolf_shrinkage

    classes = np.unique(y)
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    shrinkage = ledoit_wolf_shrinkage(centred, assume_centered=True)
    empirical = centred.T @ centred / len(centred)
    covariance = (1 - shrinkage) * empirical
    covariance.flat[:: len(covariance) + 1] += shrinkage * np.trace(empirical) / len(covariance)
    try:
        return means, cho_solve(cho_factor(covariance), np.eye(len(covariance)))
    except LinAlgError:  # not shrunk (as many rows as features) and singular
        return means, pinvh(covariance)


def cross_fitted_scores(features, labels, *, folds: int = CROSS_FIT_FOLDS, seed: int = 0) -> np.ndarray:
    """Each row's score by a gate fitted without it: the rows split into ``folds`` folds (each class spread over
    them), every fold scored by the class means and precision of the others. Fewer folds for fewer than
    2 x ``folds`` rows; empty for fewer than 4."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    folds = min(folds, len(x) // 2)
    if folds < 2:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)])
    fold_of = np.empty(len(x), dtype=int)
    fold_of[order] = np.arange(len(x)) % folds  # class by class, round the folds: stratified
    scores = np.empty(len(x))
    for fold in range(folds):
        held = fold_of == fold
        gate = MahalanobisGate(*_class_gaussians(x[~held], y[~held]), threshold=np.inf)
        scores[held] = gate.score(x[held])
    return scores


def pass_bound(scores, *, pass_rate: float = DEFAULT_PASS_RATE, confidence: float = CONFIDENCE) -> float:
    """The lowest of the in-domain held-out ``scores`` that, with ``confidence``, at least ``pass_rate`` of new
    scores from the same images' distribution stay at or under; the highest score when there are too few for
    that confidence (fewer than 299 for 99% at 95%).

    Distribution-free: the share of new scores above the k-th highest of n is Beta(k, n + 1 - k) distributed,
    so the share stays under 1 - ``pass_rate`` with probability P(Binomial(n, 1 - pass_rate) >= k) (a one-sided
    tolerance bound; Wilks 1941). For 2,767 scores, 99% and 95%: the 19th highest.
    """
    from scipy.stats import binom

    ranked = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if not len(ranked):
        raise ConfigError("need at least one in-domain score to set a threshold")
    k = np.arange(1, len(ranked) + 1)
    sure = binom.sf(k - 1, len(ranked), 1 - pass_rate) >= confidence
    return float(ranked[k[sure][-1] - 1] if sure.any() else ranked[0])
