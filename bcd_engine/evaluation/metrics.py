"""Classification metrics from predicted probabilities, computed with scikit-learn."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn import metrics as skm

from bcd_engine.evaluation.confidence import (
    bootstrap_cis,
    expected_calibration_error,
    macro_f1,
    reliability_diagram,
)


@dataclass(frozen=True)
class Evaluation:
    """Everything bcd stores about one evaluation: headline figures, per-class table, curves."""

    class_names: list[str]
    metrics: dict  # accuracy, loss, macro_f1, macro_auc, per_class, confidence_intervals, ece, reliability
    confusion_matrix: list[list[int]]
    roc: dict  # class name -> {"fpr", "tpr", "thresholds", "auc"}
    predicted: np.ndarray  # predicted class index per sample

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]

    @property
    def macro_auc(self) -> float | None:
        return self.metrics["macro_auc"]


def evaluate_probabilities(y_true, y_prob, *, class_names, groups=None) -> Evaluation:
    """Accuracy, loss, per-class precision/recall/specificity/F1, one-vs-rest AUC and ROC, confusion matrix.

    ``y_true`` holds class indices into ``class_names``; ``y_prob`` is (n, n_classes). AUC of a class
    absent from ``y_true`` (or the only class present) is undefined and reported as None. The bootstrap
    intervals resample whole ``groups`` (duplicate groups) when given, single cases otherwise.
    """
    y_true = np.asarray(y_true, dtype=int)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    y_prob = y_prob / y_prob.sum(axis=1, keepdims=True)  # float32 softmax outputs sum to 1 only approximately
    labels = list(range(len(class_names)))
    y_pred = y_prob.argmax(axis=1)
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    roc, per_class = {}, {}
    for k, name in enumerate(class_names):
        positives = y_true == k
        negatives_total = cm.sum() - cm[k, :].sum()
        false_positives = cm[:, k].sum() - cm[k, k]
        specificity = float((negatives_total - false_positives) / negatives_total) if negatives_total else None
        auc = None
        if 0 < positives.sum() < len(y_true):
            fpr, tpr, thresholds = skm.roc_curve(positives, y_prob[:, k])
            auc = float(skm.auc(fpr, tpr))
            roc[name] = {
                "fpr": fpr.tolist(),
                "tpr": tpr.tolist(),
                "thresholds": np.nan_to_num(thresholds, posinf=1.0).tolist(),
                "auc": auc,
            }
        per_class[name] = {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "specificity": specificity,
            "f1": float(f1[k]),
            "support": int(support[k]),
            "auc": auc,
        }
    aucs = [v["auc"] for v in per_class.values() if v["auc"] is not None]
    metrics = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "loss": float(skm.log_loss(y_true, y_prob, labels=labels)),
        "macro_f1": macro_f1(y_true, y_pred),
        "macro_auc": float(np.mean(aucs)) if len(aucs) == len(class_names) else None,
        "n": len(y_true),
        "per_class": per_class,
        "confidence_intervals": bootstrap_cis(y_true, y_prob, groups=groups),  # 95%: accuracy, macro_f1, macro_auc
        "ece": expected_calibration_error(y_true, y_prob),
        "reliability": reliability_diagram(y_true, y_prob),
    }
    return Evaluation(list(class_names), metrics, cm.tolist(), roc, y_pred)
