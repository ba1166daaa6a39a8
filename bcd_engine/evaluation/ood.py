"""An out-of-distribution gate: does an image look like the images a model was trained on?

Class-conditional Gaussians with one shared covariance on the network's pooled features (Lee et al.,
NeurIPS 2018, "A simple unified framework for detecting out-of-distribution samples"): an image's score
is its smallest squared Mahalanobis distance to a class mean. The covariance is shrunk (Ledoit-Wolf),
since a backbone has more features (2,048 for ResNet50) than a dataset has images per class. The
threshold is a quantile of the scores of in-domain validation images (by default 95% of them pass),
never of out-of-domain examples, which a real user does not have.

What it catches: images far from every class in feature space (another lab's stain or microscope, not a
smear at all, noise, a blank frame). What it does not: an in-domain image the model gets wrong, or an
unusual image that happens to land near a class mean. A pass is not a correct answer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from bcd_engine.errors import ConfigError

DEFAULT_PASS_RATE = 0.95  # share of in-domain validation images the threshold lets through


@dataclass(frozen=True)
class MahalanobisGate:
    """Class means (classes, d), shared precision matrix (d, d) and the threshold on the score."""

    means: np.ndarray
    precision: np.ndarray
    threshold: float
    pass_rate: float = DEFAULT_PASS_RATE

    @classmethod
    def fit(cls, features, labels, val_features, *, pass_rate: float = DEFAULT_PASS_RATE) -> MahalanobisGate:
        """Fit on training ``features`` (n, d) with their ``labels``; set the threshold so that ``pass_rate``
        of the in-domain ``val_features`` pass (the training features themselves when there are none)."""
        from sklearn.covariance import LedoitWolf

        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels, dtype=int)
        if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
            raise ConfigError(f"need at least 2 training feature rows with one label each, got {x.shape}, {y.shape}")
        if not 0 < pass_rate < 1:
            raise ConfigError(f"pass_rate must be between 0 and 1, got {pass_rate}")
        classes = np.unique(y)
        means = np.stack([x[y == c].mean(axis=0) for c in classes])
        centred = x - means[np.searchsorted(classes, y)]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        gate = cls(means, precision, threshold=np.inf, pass_rate=pass_rate)
        val = np.asarray(val_features, dtype=np.float64)
        reference = gate.score(val if len(val) else x)
        return cls(means, precision, threshold=float(np.quantile(reference, pass_rate)), pass_rate=pass_rate)

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
