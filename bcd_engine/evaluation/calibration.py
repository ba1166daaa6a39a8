"""Calibration that is fixed, not only measured: temperature scaling (Guo et al., ICML 2017) and the
risk-coverage curve of answering only the most confident images.

A softmax output ``p`` is rescaled as ``softmax(log p / T)``; ``T > 1`` softens an over-confident
model. The class with the highest probability never changes, so accuracy and AUC do not either. ``T``
is fitted on the validation split by minimising the negative log-likelihood, and then applied to every
probability shown to a user. It is never below 1: a small validation split can make a model at chance
look sure of itself, and bcd never shows a model as more confident than its own output. And it stays 1
unless it also lowers the validation images' expected calibration error.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from bcd_engine.errors import ConfigError
from bcd_engine.evaluation.confidence import expected_calibration_error

_EPS = 1e-12
T_BOUNDS = (1.0, 20.0)


def apply_temperature(y_prob, temperature: float) -> np.ndarray:
    """Probabilities (n, classes) rescaled by ``temperature``, rows summing to 1; the argmax is unchanged."""
    if not np.isfinite(temperature) or temperature <= 0:
        raise ConfigError(f"temperature must be a positive number, got {temperature!r}")
    logits = np.log(np.clip(np.asarray(y_prob, dtype=np.float64), _EPS, 1.0)) / float(temperature)
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=-1, keepdims=True)


def fit_temperature(y_true, y_prob) -> float:
    """The temperature in :data:`T_BOUNDS` that minimises the negative log-likelihood of ``y_true``; 1.0 when
    there are no labelled images to fit on, or when that temperature would not lower their expected
    calibration error as well."""
    y = np.asarray(y_true, dtype=int)
    prob = np.asarray(y_prob, dtype=np.float64)
    if prob.ndim != 2 or len(prob) != len(y):
        raise ConfigError(f"expected probabilities (n, classes) for {len(y)} labels, got shape {prob.shape}")
    if len(y) == 0:
        return 1.0

    def nll(log_t: float) -> float:
        scaled = apply_temperature(prob, float(np.exp(log_t)))
        return float(-np.log(np.clip(scaled[np.arange(len(y)), y], _EPS, 1.0)).mean())

    found = minimize_scalar(nll, bounds=tuple(np.log(T_BOUNDS)), method="bounded", options={"xatol": 1e-4})
    best = float(np.exp(found.x))
    # Kept only when it lowers the calibration error too: with a few confident mistakes among many right
    # answers, the likelihood alone favours softening every answer, which leaves the model under-confident.
    better = nll(np.log(best)) < nll(0.0) and (
        expected_calibration_error(y, apply_temperature(prob, best)) < expected_calibration_error(y, prob)
    )
    return best if better else 1.0


def risk_coverage(y_true, y_prob) -> dict[str, list[float]]:
    """Accuracy when only the most confident share of images is answered, for every share.

    Images are ranked by their top probability; ``coverage[i]`` is the share answered and ``accuracy[i]``
    the accuracy on those. A model whose confidence means something has accuracy falling as coverage rises.
    """
    y = np.asarray(y_true, dtype=int)
    prob = np.asarray(y_prob, dtype=np.float64)
    if len(y) == 0:
        return {"coverage": [], "accuracy": [], "threshold": []}
    confidence = prob.max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    correct = (prob.argmax(axis=1) == y)[order]
    answered = np.arange(1, len(y) + 1)
    return {
        "coverage": (answered / len(y)).tolist(),
        "accuracy": (np.cumsum(correct) / answered).tolist(),
        "threshold": confidence[order].tolist(),
    }
