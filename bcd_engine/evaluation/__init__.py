"""Evaluation: metrics of predicted probabilities and their uncertainty (pure NumPy and scikit-learn).

``metrics`` (accuracy, AUC, per-class figures, confusion matrix), ``confidence`` (group-aware bootstrap
intervals, calibration error and reliability bins).
"""

from bcd_engine.evaluation.confidence import bootstrap_cis, expected_calibration_error, reliability_diagram, sample_std
from bcd_engine.evaluation.metrics import Evaluation, evaluate_probabilities

__all__ = [
    "Evaluation",
    "bootstrap_cis",
    "evaluate_probabilities",
    "expected_calibration_error",
    "reliability_diagram",
    "sample_std",
]
