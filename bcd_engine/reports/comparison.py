"""Data for the Compare page: intervals, cross-validation groups, leave-one-dataset-out results,
reliability bins and the cached shortcut audit. Plain data in, plain data (or DataFrames) out.

Every accuracy and macro AUC comes with the 95% bootstrap interval that :mod:`bcd_engine.evaluation`
stored with it (``metrics["confidence_intervals"]``), formatted like ``0.996 (0.990–1.000)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bcd_engine import settings
from bcd_engine.data.scan import ScanResult
from bcd_engine.evaluation.confidence import sample_std
from bcd_engine.files import atomic_write_text
from bcd_engine.protocols.audit import audit_dataset
from bcd_engine.protocols.lodo import held_out_evaluation_name
from bcd_engine.reports.runs import THESIS_REFERENCE
from bcd_engine.store import Protocol, RunStore, latest_evaluation
from bcd_engine.store.records import EvaluationRecord, RunRecord

IN_DOMAIN_NOTE = " (in-domain hold-out test; the held-out dataset's figure is in the LODO table)"
AUDIT_REFERENCES = (
    ("colour_only_accuracy", "colour only"),
    ("corner_only_accuracy", "corner only"),
    ("chance_accuracy", "chance"),
)
_POOLED_RESAMPLES = 1000


def evaluations_by_run(store: RunStore, run_ids: Iterable[int]) -> dict[int, list[EvaluationRecord]]:
    """Every evaluation of each run, oldest first."""
    return {int(run_id): store.get_evaluations(int(run_id)) for run_id in run_ids}


def interval(evaluation: EvaluationRecord | None, metric: str) -> tuple[float | None, float | None, float | None]:
    """(value, low, high) of ``metric`` ("accuracy", "macro_auc", ...): the value and its stored 95% interval."""
    if evaluation is None:
        return None, None, None
    ci = (evaluation.metrics.get("confidence_intervals") or {}).get(metric) or {}
    return evaluation.metrics.get(metric), ci.get("low"), ci.get("high")


def format_interval(value: float | None, low: float | None = None, high: float | None = None) -> str:
    """``0.996 (0.990–1.000)``; ``0.996 (no CI)`` without an interval; ``n/a`` without a value."""
    if value is None or pd.isna(value):
        return "n/a"
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return f"{value:.3f} (no CI)"
    return f"{value:.3f} ({low:.3f}–{high:.3f})"


def run_label_with_protocol(run: RunRecord, evaluation: EvaluationRecord | None) -> str:
    """A run named by its protocol, as Compare offers runs: id, backbone, protocol and the accuracy of
    ``evaluation`` (its test evaluation) with its interval."""
    accuracy = format_interval(*interval(evaluation, "accuracy"))
    return f"run {run.id}: {run.backbone} · {run.protocol.label} · accuracy {accuracy}"


def intervals_frame(runs: Iterable[RunRecord], evaluations: Mapping[int, list[EvaluationRecord]]) -> pd.DataFrame:
    """Test accuracy and macro AUC with their intervals, one row per run that has a test evaluation.

    Columns: run, label (for chart axes), backbone, protocol, data_dir, n, accuracy, accuracy_low,
    accuracy_high, macro_auc, macro_auc_low, macro_auc_high, ``accuracy (95% CI)``, ``macro AUC (95% CI)``.
    A leave-one-dataset-out run's test evaluation is its in-domain hold-out, and its protocol says so.
    """
    rows = []
    for run in runs:
        test = latest_evaluation(evaluations.get(run.id, []))
        if test is None:
            continue
        protocol = run.protocol.label + (IN_DOMAIN_NOTE if run.protocol.kind == "lodo" else "")
        row = {
            "run": run.id,
            "label": f"run {run.id}: {run.backbone} · {protocol}",
            "backbone": run.backbone,
            "protocol": protocol,
            "data_dir": run.config.get("data_dir"),
            "n": test.metrics.get("n"),
        }
        for metric, title in (("accuracy", "accuracy"), ("macro_auc", "macro AUC")):
            value, low, high = interval(test, metric)
            row.update(
                {
                    metric: value,
                    f"{metric}_low": low,
                    f"{metric}_high": high,
                    f"{title} (95% CI)": format_interval(value, low, high),
                }
            )
        rows.append(row)
    columns = [
        "run",
        "label",
        "backbone",
        "protocol",
        "data_dir",
        "n",
        "accuracy",
        "accuracy_low",
        "accuracy_high",
        "macro_auc",
        "macro_auc_low",
        "macro_auc_high",
        "accuracy (95% CI)",
        "macro AUC (95% CI)",
    ]
    return pd.DataFrame(rows, columns=columns).astype({c: float for c in columns[6:12]})


def runs_table(runs: pd.DataFrame, evaluations: Mapping[int, list[EvaluationRecord]]) -> pd.DataFrame:
    """``dashboard.runs_frame`` with ``accuracy (95% CI)`` and ``macro AUC (95% CI)`` after its ``status`` column."""
    tests = [latest_evaluation(evaluations.get(int(run_id), [])) for run_id in runs["id"]]
    at = list(runs.columns).index("status") + 1
    out = runs.copy()
    out.insert(at, "accuracy (95% CI)", [format_interval(*interval(t, "accuracy")) for t in tests])
    out.insert(at + 1, "macro AUC (95% CI)", [format_interval(*interval(t, "macro_auc")) for t in tests])
    return out


def reference_frame() -> pd.DataFrame:
    """The thesis' and the dataset authors' reported accuracies, saying that no interval or protocol is known."""
    return pd.DataFrame(THESIS_REFERENCE).assign(
        **{"95% CI": "not reported", "protocol": "as reported (split and protocol differ from bcd's)"}
    )


@dataclass(frozen=True)
class CVGroup:
    """The fold runs of one k-fold cross-validation, in fold order."""

    protocol: Protocol  # the cross-validation as a whole (no fold)
    backbone: str
    folds: int
    runs: tuple[RunRecord, ...]

    @property
    def label(self) -> str:
        return f"{self.backbone} · {self.protocol.label} · runs {self.runs[0].id}–{self.runs[-1].id}"

    @property
    def data_dir(self) -> str | None:
        return self.runs[0].config.get("data_dir")


# What each run settles from its own split (the regions "auto" masks, and why): folds of one CV differ there.
_SETTLED_PER_RUN = ("mask",)
_SETTLED_PER_RUN_TRAIN = ("mask_regions",)


def _asked_settings(config: Mapping) -> dict:
    """A run's config without what the run settled from its own split: what the cross-validation asked for."""
    train = {k: v for k, v in (config.get("train") or {}).items() if k not in _SETTLED_PER_RUN_TRAIN}
    return {**{k: v for k, v in config.items() if k not in _SETTLED_PER_RUN}, "train": train}


def cv_groups(runs: Iterable[RunRecord]) -> list[CVGroup]:
    """Group k-fold runs (protocol kind ``"kfold"``, fold k of K) into one :class:`CVGroup` per cross-validation.

    Runs belong together when K, backbone and config match (but for what each fold settles from its own split, as
    the regions ``auto`` masks) and their folds count up 1, 2, ... in
    run-id order (``crossval.cross_validate`` stores the folds one after another); a fold that does
    not continue its open group starts a new one. Groups come in order of their first run.
    """
    groups: list[tuple[str, int, list[RunRecord]]] = []
    open_groups: dict[tuple, tuple[int, list[RunRecord]]] = {}
    for run in sorted(runs, key=lambda r: r.id):
        protocol = run.protocol
        if protocol.kind != "kfold" or protocol.fold is None:
            continue
        key = (protocol.folds, run.backbone, json.dumps(_asked_settings(run.config), sort_keys=True))
        last_fold, members = open_groups.get(key, (0, None))
        if members is None or protocol.fold != last_fold + 1:
            members = []
            groups.append((run.backbone, protocol.folds, members))
        members.append(run)
        open_groups[key] = (protocol.fold, members)
    return [
        CVGroup(Protocol.kfold(folds=folds), backbone, folds, tuple(members)) for backbone, folds, members in groups
    ]


def cv_folds_frame(groups: Iterable[CVGroup], evaluations: Mapping[int, list[EvaluationRecord]]) -> pd.DataFrame:
    """One row per fold run: group, fold, run, status, n (test images), accuracy and macro AUC with intervals, ECE."""
    rows = []
    for group in groups:
        for run in group.runs:
            test = latest_evaluation(evaluations.get(run.id, []))
            accuracy, macro_auc = interval(test, "accuracy"), interval(test, "macro_auc")
            rows.append(
                {
                    "group": group.label,
                    "fold": f"{run.protocol.fold}/{group.folds}",
                    "run": run.id,
                    "status": run.status,
                    "n": test.metrics.get("n") if test else None,
                    "accuracy": accuracy[0],
                    "accuracy (95% CI)": format_interval(*accuracy),
                    "macro_auc": macro_auc[0],
                    "macro AUC (95% CI)": format_interval(*macro_auc),
                    "ece": test.metrics.get("ece") if test else None,
                }
            )
    return pd.DataFrame(
        rows,
        columns=[
            "group",
            "fold",
            "run",
            "status",
            "n",
            "accuracy",
            "accuracy (95% CI)",
            "macro_auc",
            "macro AUC (95% CI)",
            "ece",
        ],
    )


def pooled_confusion(
    group: CVGroup, evaluations: Mapping[int, list[EvaluationRecord]]
) -> tuple[list[str], list[list[int]]] | None:
    """(class names, the sum of the folds' test confusion matrices); None when no fold has a test evaluation.

    Every image is in exactly one fold's test set, so the sum covers each tested image once.
    """
    tests = [t for t in (latest_evaluation(evaluations.get(r.id, [])) for r in group.runs) if t is not None]
    if not tests:
        return None
    names = tests[0].class_names
    total = sum(np.asarray(t.confusion_matrix, dtype=np.int64) for t in tests if t.class_names == names)
    return list(names), total.tolist()


def pooled_accuracy(counts: list[list[int]], *, seed: int = 0) -> tuple[float, float, float]:
    """(accuracy, low, high) of a confusion matrix with a 95% percentile bootstrap interval.

    Resampling n test cases with replacement makes the number right binomial(n, accuracy), so the
    bootstrap draws that count directly (1000 resamples, as :mod:`bcd_engine.confidence` does).
    """
    counts = np.asarray(counts)
    n = int(counts.sum())
    accuracy = float(np.trace(counts) / n)
    draws = np.random.default_rng(seed).binomial(n, accuracy, size=_POOLED_RESAMPLES) / n
    low, high = np.quantile(draws, [0.025, 0.975])
    return accuracy, float(low), float(high)


def cv_summary_frame(groups: Iterable[CVGroup], evaluations: Mapping[int, list[EvaluationRecord]]) -> pd.DataFrame:
    """One row per cross-validation: mean and standard deviation over its completed folds, and pooled accuracy.

    Columns: group, backbone, protocol, data_dir, folds (``"3 of 3 completed"``), n (test images over
    the folds), accuracy_mean/_std, macro_auc_mean/_std (None when a fold has no macro AUC), display
    strings ``accuracy (mean ± std)`` and ``macro AUC (mean ± std)``, and ``pooled accuracy (95% CI)``
    from :func:`pooled_confusion`. The standard deviation is the sample one that ``bcd_engine cv`` prints
    (:func:`confidence.sample_std`; None, shown as "n/a", with fewer than two completed folds).
    """
    rows = []
    for group in groups:
        completed = [r for r in group.runs if r.status == "completed"]
        tests = [t for t in (latest_evaluation(evaluations.get(r.id, [])) for r in completed) if t is not None]
        row = {
            "group": group.label,
            "backbone": group.backbone,
            "protocol": group.protocol.label,
            "data_dir": group.data_dir,
            "folds": f"{len(tests)} of {group.folds} completed",
            "n": sum(t.metrics.get("n", 0) for t in tests),
        }
        for metric, title in (("accuracy", "accuracy"), ("macro_auc", "macro AUC")):
            values = [t.metrics.get(metric) for t in tests]
            known = bool(values) and all(v is not None for v in values)
            mean, std = (float(np.mean(values)), sample_std(values)) if known else (None, None)
            shown = "n/a" if not known else f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f} ± n/a"
            row.update({f"{metric}_mean": mean, f"{metric}_std": std, f"{title} (mean ± std)": shown})
        pooled = pooled_confusion(group, evaluations) if tests else None
        row["pooled accuracy (95% CI)"] = format_interval(*pooled_accuracy(pooled[1])) if pooled else "n/a"
        rows.append(row)
    return pd.DataFrame(
        rows,
        columns=[
            "group",
            "backbone",
            "protocol",
            "data_dir",
            "folds",
            "n",
            "accuracy_mean",
            "accuracy_std",
            "macro_auc_mean",
            "macro_auc_std",
            "accuracy (mean ± std)",
            "macro AUC (mean ± std)",
            "pooled accuracy (95% CI)",
        ],
    )


def lodo_frame(runs: Iterable[RunRecord], evaluations: Mapping[int, list[EvaluationRecord]]) -> pd.DataFrame:
    """One row per leave-one-dataset-out run: in-domain test and held-out accuracy with intervals.

    A run qualifies when its protocol is a leave-one-dataset-out round (kind ``"lodo"``, held out NAME)
    and it has an evaluation; its held-out evaluation is the newest one named ``"held-out NAME"``
    (``held_out`` holds NAME). Columns: held_out, backbone, run, in_domain, in_domain_low/_high,
    n_in_domain, held_out_accuracy, held_out_accuracy_low/_high, n_held_out, drop (in-domain minus
    held-out accuracy) and the display strings ``in-domain test accuracy (95% CI)`` and
    ``held-out accuracy (95% CI)``. Sorted by held-out dataset, then backbone.
    """
    rows = []
    for run in runs:
        evals, name = evaluations.get(run.id, []), run.protocol.held_out
        if run.protocol.kind != "lodo" or name is None or not evals:
            continue
        held_out = latest_evaluation(evals, held_out_evaluation_name(name))
        test = latest_evaluation(evals)
        inside, outside = interval(test, "accuracy"), interval(held_out, "accuracy")
        rows.append(
            {
                "held_out": name,
                "backbone": run.backbone,
                "run": run.id,
                "in_domain": inside[0],
                "in_domain_low": inside[1],
                "in_domain_high": inside[2],
                "in-domain test accuracy (95% CI)": format_interval(*inside),
                "n_in_domain": test.metrics.get("n") if test else None,
                "held_out_accuracy": outside[0],
                "held_out_accuracy_low": outside[1],
                "held_out_accuracy_high": outside[2],
                "held-out accuracy (95% CI)": format_interval(*outside),
                "n_held_out": held_out.metrics.get("n") if held_out else None,
                "drop": inside[0] - outside[0] if None not in (inside[0], outside[0]) else None,
            }
        )
    columns = [
        "held_out",
        "backbone",
        "run",
        "in_domain",
        "in_domain_low",
        "in_domain_high",
        "in-domain test accuracy (95% CI)",
        "n_in_domain",
        "held_out_accuracy",
        "held_out_accuracy_low",
        "held_out_accuracy_high",
        "held-out accuracy (95% CI)",
        "n_held_out",
        "drop",
    ]
    frame = pd.DataFrame(rows, columns=columns).astype({c: float for c in (*columns[3:6], *columns[8:11], "drop")})
    return frame.sort_values(["held_out", "backbone", "run"], ignore_index=True)


def reliability_frame(evaluation: EvaluationRecord) -> pd.DataFrame:
    """The stored reliability bins that hold images: low, high, centre, width, confidence, accuracy, count.

    ``confidence`` is the bin's mean top-class probability and ``accuracy`` the share of its images
    classified right; a well calibrated model has them equal. Empty without stored bins.
    """
    bins = evaluation.metrics.get("reliability") or {}
    edges = bins.get("bin_edges", [])
    rows = [
        {
            "low": edges[k],
            "high": edges[k + 1],
            "centre": (edges[k] + edges[k + 1]) / 2,
            "width": edges[k + 1] - edges[k],
            "confidence": bins["confidence"][k],
            "accuracy": bins["accuracy"][k],
            "count": count,
        }
        for k, count in enumerate(bins.get("count", []))
        if count
    ]
    return pd.DataFrame(rows, columns=["low", "high", "centre", "width", "confidence", "accuracy", "count"])


def dataset_roots(runs: Iterable[RunRecord]) -> list[str]:
    """The distinct dataset folders (``config["data_dir"]``) of ``runs``, sorted."""
    return sorted({run.config["data_dir"] for run in runs if run.config.get("data_dir")})


def audit_key(scan: ScanResult) -> str:
    """sha256 of the scan's sorted ``class/md5`` lines: same images under the same classes, same key."""
    lines = sorted(f"{record.class_name}/{record.md5}" for record in scan.images)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def audit_file(scan: ScanResult) -> Path:
    """Where the audit of this dataset's content is cached: ``<cache>/audits/<audit_key>.json``."""
    return settings.cache_dir() / "audits" / f"{audit_key(scan)}.json"


def cached_audit(scan: ScanResult) -> dict | None:
    """The stored :func:`run_audit` result for this dataset's content, or None when it was never run."""
    try:
        audit = json.loads(audit_file(scan).read_text())
    except (OSError, ValueError):
        return None
    shortcuts = audit.get("shortcuts") if isinstance(audit, dict) else None
    return audit if isinstance(shortcuts, dict) and all(k in shortcuts for k, _ in AUDIT_REFERENCES) else None


def run_audit(scan: ScanResult) -> dict:
    """``audit.audit_dataset`` of the scanned folder (seconds), cached as JSON for :func:`cached_audit`."""
    audit = {"root": scan.root, "key": audit_key(scan), **audit_dataset(scan.root).to_dict()}
    atomic_write_text(audit_file(scan), json.dumps(audit, indent=1))
    return audit


def audit_references(audits: Mapping[str, dict]) -> pd.DataFrame:
    """Reference accuracies of audited datasets: dataset (folder name), root, reference, accuracy.

    ``audits`` maps a dataset root to its :func:`run_audit` result; references are colour only,
    corner only and chance.
    """
    rows = [
        {"dataset": Path(root).name, "root": root, "reference": name, "accuracy": audit["shortcuts"][key]}
        for root, audit in audits.items()
        for key, name in AUDIT_REFERENCES
    ]
    return pd.DataFrame(rows, columns=["dataset", "root", "reference", "accuracy"])


def audit_explanation(audit: dict) -> str:
    """What the audit means for model accuracies on this dataset, in plain words."""
    s = audit["shortcuts"]
    return (
        f"Colour statistics alone reach {s['colour_only_accuracy']:.1%}: a model's accuracy close to this may "
        f"come from colour, not cell shape. The bottom-right corner alone (where the ALL dataset's scale-bar "
        f"label sits) reaches {s['corner_only_accuracy']:.1%}, and always guessing the most common class "
        f"{s['chance_accuracy']:.1%}. These come from a simple colour classifier (a random forest) tested on "
        f"{s['n_test']} images of a group-aware test split of the same folder."
    )


# Settings as a reader names them; a setting not listed here (added later) is shown by its own name.
SETTING_NAMES = {
    "dataset": "dataset",
    "protocol": "protocol",
    "backbone": "backbone",
    "weights": "starting weights",
    "image_size": "image size (px)",
    "colour": "colour mode",
    "epochs": "epochs (phase 1)",
    "fine_tune_epochs": "fine-tune epochs (phase 2)",
    "fine_tune_layers": "layers unfrozen in phase 2",
    "learning_rate": "learning rate",
    "fine_tune_learning_rate": "fine-tune learning rate",
    "optimizer": "optimizer",
    "batch_size": "batch size",
    "augment.factor": "training views per image",
    "tta_views": "test-time views",
    "dense_units": "head dense units",
    "dense_activation": "head activation",
    "dropout": "head dropout",
    "pooling": "pooling",
    "label_smoothing": "label smoothing",
    "class_weights": "classes weighted by frequency",
    "patience": "patience (epochs)",
    "val_fraction": "validation share",
    "test_fraction": "test share",
    "seed": "seed",
}


def _flat(settings_: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested settings as ``{"augment.factor": 8, ...}``."""
    out: dict[str, object] = {}
    for key, value in settings_.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _shown(setting: str, value: object) -> str:
    """A setting's value as text: a weights file by its name, none for a random start."""
    if value is None:
        return "none (random start)" if setting == "weights" else "—"
    if setting == "weights" and value != "imagenet":
        return f"file {Path(str(value)).name}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run_settings(run: RunRecord) -> dict[str, str]:
    """A run's settings as text, keyed by setting (its dataset and protocol first, then its train config)."""
    shown = {"dataset": run.dataset.name, "protocol": run.protocol.label}
    train = _flat(run.config.get("train") or {})
    return shown | {key: _shown(key, value) for key, value in train.items()}


def settings_diff(runs: Iterable[RunRecord]) -> pd.DataFrame:
    """The settings on which ``runs`` differ, and only those: one row per setting (``setting``: its name in words),
    one column per run (``run 3``). Empty (no rows) when they agree on everything; a setting one run lacks (an
    older record) reads ``—``."""
    runs = list(runs)
    values = {run.id: run_settings(run) for run in runs}
    keys = list(dict.fromkeys(key for shown in values.values() for key in shown))
    order = {key: i for i, key in enumerate(SETTING_NAMES)}
    rows = [
        {
            "setting": SETTING_NAMES.get(key, key.replace("_", " ")),
            **{f"run {i}": values[i].get(key, "—") for i in values},
        }
        for key in sorted(keys, key=lambda k: order.get(k, len(order)))
        if len({values[i].get(key, "—") for i in values}) > 1
    ]
    return pd.DataFrame(rows, columns=["setting", *(f"run {i}" for i in values)])


def runs_by_dataset(runs: Iterable[RunRecord]) -> dict[str, list[RunRecord]]:
    """``runs`` grouped by the dataset they were tested on (its folder, else its name), in first-seen order: only
    runs of one group can be compared by accuracy."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.config.get("data_dir") or run.dataset.name, []).append(run)
    return groups


def not_comparable_note(groups: Mapping[str, list[RunRecord]]) -> str | None:
    """Why runs on several datasets are drawn apart (None for one dataset)."""
    if len(groups) < 2:
        return None
    parts = "; ".join(
        f"{runs[0].dataset.name}: run{'s' if len(runs) > 1 else ''} {', '.join(str(r.id) for r in runs)}"
        for runs in groups.values()
    )
    return (
        f"These runs were tested on {len(groups)} different datasets ({parts}). Accuracies on different images "
        "are not comparable, so each dataset gets its own chart with its own shortcut-audit lines."
    )


ECE_MEANING = (
    "ECE (expected calibration error) is the average gap between how sure the model says it is and how often it is "
    "right (0 is perfect)."
)


def calibration_note(evaluation: EvaluationRecord, *, tta_views: int | None = None) -> str:
    """One line on what the run's temperature did to its test ECE, and the rule bcd keeps or drops it by.

    The temperature is fitted on the validation images (one view each) by log-loss and kept only when it lowers
    both their log-loss and their ECE (``evaluation.calibration.fit_temperature``); the test ECE is measured on the
    evaluated test probabilities, averaged over ``tta_views`` test-time views when there were several.
    """
    metrics = evaluation.metrics
    before, after, temperature = metrics.get("ece"), metrics.get("ece_calibrated"), metrics.get("temperature")
    if before is None:
        return "No ECE stored: the run was evaluated before bcd measured calibration."
    if temperature is None or after is None:
        return f"ECE {before:.3f}; no temperature was fitted (the run was trained before bcd calibrated runs)."
    rule = (
        "bcd fits the temperature on the validation images and keeps it only when it lowers both their log-loss and "
        "their ECE; otherwise it stays 1."
    )
    if temperature == 1.0:
        return f"ECE {before:.3f}, temperature left at 1 (no change). {rule}"
    effect = "softened" if temperature > 1 else "sharpened"
    line = (
        f"ECE {before:.3f} → {after:.3f} on the test images with temperature {temperature:.2f} ({effect} answers). "
        + rule
    )
    if after > before:
        line += " It made the test answers worse calibrated here"
        if tta_views and tta_views > 1:
            line += (
                f": they average {tta_views} test-time views, which already softens them, while the temperature was "
                "fitted on single views"
            )
        line += "."
    return line
