"""Tables for the Train and Compare pages: one row per run, epochs as a long table, per-class metrics,
the images of a confusion-matrix cell, risk-coverage curves, and the accuracies the thesis reported.
"""

from __future__ import annotations

import pandas as pd

from bcd_engine.evaluation.calibration import risk_coverage
from bcd_engine.models.backbones import BACKBONES
from bcd_engine.store import RunStore
from bcd_engine.store.records import EvaluationRecord, RunRecord

# Accuracies reported by the thesis (train / validation) and by the dataset's authors.
THESIS_REFERENCE = [
    {"model": "VGG16", "train_accuracy": 0.94, "val_accuracy": 0.94, "source": "thesis (reported)"},
    {"model": "VGG19", "train_accuracy": 0.94, "val_accuracy": 0.91, "source": "thesis (reported)"},
    {"model": "ResNet50", "train_accuracy": 0.89, "val_accuracy": 0.87, "source": "thesis (reported)"},
    {"model": "InceptionV3", "train_accuracy": 0.90, "val_accuracy": 0.80, "source": "thesis (reported)"},
    {
        "model": "Ghaderzadeh et al. 2022 (dataset authors)",
        "train_accuracy": None,
        "val_accuracy": 0.9985,
        "source": "dataset authors (reported)",
    },
]


def best_runs_by_dataset(store: RunStore) -> dict[str, RunRecord]:
    """Per dataset name, its completed run with the highest test accuracy (the newest on ties): accuracies are
    only compared between runs on the same dataset."""
    best: dict[str, RunRecord] = {}
    for run in store.list_runs(status="completed"):
        if run.test_accuracy is None:
            continue
        name = run.dataset.name
        if name not in best or (run.test_accuracy, run.id) > (best[name].test_accuracy, best[name].id):
            best[name] = run
    return best


def default_run(store: RunStore) -> RunRecord | None:
    """The run to offer first: the best run on the real dataset with the most images; only when no run was
    trained on real data, the best on a SYNTHETIC set; None without completed runs."""
    best = list(best_runs_by_dataset(store).values())
    return max(best, key=lambda r: (not r.dataset.synthetic, r.dataset.n_images or 0, r.id), default=None)


def dataset_label(run: RunRecord) -> str:
    """``Original (3,256 images)``, or ``synthetic-demo (240 images, SYNTHETIC)``."""
    dataset = run.dataset
    parts = [f"{dataset.n_images:,} images"] if dataset.n_images is not None else []
    parts += ["SYNTHETIC"] if dataset.synthetic else []
    return dataset.name + (f" ({', '.join(parts)})" if parts else "")


def run_label_with_dataset(run: RunRecord, best: dict[str, RunRecord]) -> str:
    """A run named by its dataset, as Diagnose offers models: id, backbone, dataset, test accuracy, and whether it is
    its dataset's best in ``best`` (:func:`best_runs_by_dataset`). :func:`~bcd_engine.reports.comparison.
    run_label_with_protocol` names it by protocol instead."""
    name = run.dataset.name
    accuracy = "" if run.test_accuracy is None else f", test accuracy {run.test_accuracy:.3f}"
    mark = f" (best on {name})" if best.get(name) is not None and best[name].id == run.id else ""
    return f"run {run.id}: {run.backbone} on {dataset_label(run)}{accuracy}{mark}"


def holdout_evaluation(store: RunStore, run_id: int) -> EvaluationRecord | None:
    """The run's evaluation on its own test split (the newest one), or None."""
    return store.latest_evaluation(run_id)


def _head(train_cfg: dict) -> str | None:
    """The classification head in a few words: ``dense 256, dropout 0.3`` (``no dense layer`` for 0 units)."""
    if "dense_units" not in train_cfg:
        return None
    units = train_cfg["dense_units"]
    dense = f"dense {units}" if units else "no dense layer"
    return f"{dense}, dropout {train_cfg.get('dropout', 0):g}"


def runs_frame(store: RunStore) -> pd.DataFrame:
    """One row per run with its headline numbers, for the runs table."""
    rows = []
    for run in store.list_runs():
        evaluation = holdout_evaluation(store, run.id) if run.status == "completed" else None
        metrics = evaluation.metrics if evaluation else {}
        spec = BACKBONES.get(run.backbone)
        train_cfg = run.config.get("train", {})
        rows.append(
            {
                "id": run.id,
                "backbone": run.backbone,
                "dataset": dataset_label(run),
                "status": run.status,
                "protocol": run.protocol.label,
                "test_accuracy": run.test_accuracy,
                "macro_auc": run.macro_auc,
                "macro_f1": metrics.get("macro_f1"),
                "ece": metrics.get("ece"),
                "ece_calibrated": metrics.get("ece_calibrated"),
                "parameters_M": (metrics["parameters"] / 1e6) if metrics.get("parameters") else None,
                "backbone_params_M": spec.params_millions if spec else None,
                "weights": train_cfg.get("weights") or "none",
                "image_size": train_cfg.get("image_size"),
                "learning_rate": train_cfg.get("learning_rate"),
                "epochs": train_cfg.get("epochs"),
                "views": (train_cfg.get("augment") or {}).get("factor"),
                "tta_views": train_cfg.get("tta_views"),
                "head": _head(train_cfg),
                "seconds": run.seconds,
                "created": run.created_at,
                "error": None if run.status == "cancelled" else run.error,  # the status says it: no error
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "id",
            "backbone",
            "dataset",
            "status",
            "protocol",
            "test_accuracy",
            "macro_auc",
            "macro_f1",
            "ece",
            "ece_calibrated",
            "parameters_M",
            "backbone_params_M",
            "weights",
            "image_size",
            "learning_rate",
            "epochs",
            "views",
            "tta_views",
            "head",
            "seconds",
            "created",
            "error",
        ],
    )


def epochs_frame(store: RunStore, run_ids: list[int]) -> pd.DataFrame:
    """Long table of epochs (run, phase, epoch, step, metric, value, split) for curves; step counts across phases."""
    rows = []
    for run_id in run_ids:
        for step, e in enumerate(store.get_epochs(run_id), start=1):
            for metric in ("accuracy", "loss"):
                for split in ("train", "val"):
                    rows.append(
                        {
                            "run": run_id,
                            "phase": e.phase,
                            "epoch": e.epoch,
                            "step": step,
                            "metric": metric,
                            "split": split,
                            "value": getattr(e, f"{split}_{metric}"),
                        }
                    )
    return pd.DataFrame(rows, columns=["run", "phase", "epoch", "step", "metric", "split", "value"])


def per_class_frame(evaluation: EvaluationRecord) -> pd.DataFrame:
    """Precision, recall, specificity, F1, AUC and support per class."""
    per_class = evaluation.metrics.get("per_class", {})
    return pd.DataFrame([{"class": name, **per_class.get(name, {})} for name in evaluation.class_names])


def cell_images(
    store: RunStore, evaluation: EvaluationRecord, true_class: str, predicted_class: str, limit: int = 24
) -> list[dict]:
    """Up to ``limit`` images of one confusion-matrix cell (true class, predicted class): path and the
    probability of every class, most confident first."""
    out = [
        {
            "path": p.path,
            "true": p.true_class,
            "predicted": p.predicted_class,
            "probabilities": dict(zip(evaluation.class_names, p.probabilities)),
            "confidence": p.probabilities[evaluation.class_names.index(p.predicted_class)],
        }
        for p in store.get_predictions(evaluation.id)
        if p.true_class == true_class and p.predicted_class == predicted_class
    ]
    return sorted(out, key=lambda item: -item["confidence"])[:limit]


def worst_cell(evaluation: EvaluationRecord) -> tuple[str, str]:
    """The off-diagonal confusion-matrix cell with the most images (true, predicted); the first diagonal cell
    when every image is right."""
    counts = [
        [count if i != j else -1 for j, count in enumerate(row)] for i, row in enumerate(evaluation.confusion_matrix)
    ]
    i, j = max(((i, j) for i in range(len(counts)) for j in range(len(counts))), key=lambda c: counts[c[0]][c[1]])
    names = evaluation.class_names
    return (names[i], names[j]) if counts[i][j] > 0 else (names[0], names[0])


def risk_coverage_frame(store: RunStore, evaluation: EvaluationRecord) -> pd.DataFrame:
    """Accuracy against the share of test images answered, the most confident first (coverage, accuracy)."""
    predictions = store.get_predictions(evaluation.id)
    names = evaluation.class_names
    curve = risk_coverage([names.index(p.true_class) for p in predictions], [p.probabilities for p in predictions])
    return pd.DataFrame(
        {"coverage": curve["coverage"], "accuracy": curve["accuracy"], "confidence": curve["threshold"]}
    )
