"""Accuracy against the thesis: the classical baseline and the scratch CNN on the ALL dataset's hold-out split.

Both are scored on the test side of the split ``train`` makes: ``splits.holdout_split`` of the scan's
labels and duplicate groups with the default fractions (70/15/15) and seed 0, group-aware and stratified.

1. The classical baseline (``baselines.train_classical_baseline``): colour, GLCM texture and nucleus-shape
   features with an SVM (sigmoid-calibrated) and with logistic regression, fit on train + val (nothing
   is tuned). Its time is split into image loading, feature computation, fit + predict, evaluation.
2. With ``--scratch``: the scratch CNN through ``training.train`` (``TrainConfig.for_backbone("scratch_cnn")``
   at ``--scratch-size`` px for at most ``--scratch-epochs`` epochs, early stopping on validation loss),
   stored in a temporary SQLite run store with its model in a temporary folder.

Each reports held-out accuracy, macro one-vs-rest AUC and macro F1 with 95% bootstrap CIs
(``evaluation.evaluate_probabilities``) and the time taken, beside the thesis' reported validation
accuracies (VGG16 94%, VGG19 91%, ResNet50 87%, InceptionV3 80%) and the dataset authors' 99.85%.

    python benchmarks/bench_baselines.py [--scratch] [--scratch-size 96] [--scratch-epochs 60] [--json]

The defaults (96 px instead of the scratch CNN's native 128, at most 60 epochs, patience 10) were sized
from short runs to finish within about 15-20 minutes on a 2-core CPU.

Uses ../shared/datasets/all_taleqani/Original when present, else the synthetic demo set (and says so).
``--limit N`` copies a seeded random subset of N images into a temporary folder: for checking the script
only, its figures are not comparable.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _machine import load_average, machine_info, print_report_start

from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.splits import holdout_split
from bcd_engine.data.synthetic import ensure_demo_dataset
from bcd_engine.models.config import TrainConfig
from bcd_engine.protocols import baselines
from bcd_engine.reports.runs import THESIS_REFERENCE

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
ALL_DATA = SHARED / "datasets" / "all_taleqani" / "Original"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ci_summary(metrics: dict) -> dict:
    """Point estimates with their 95% bootstrap intervals, from an evaluation's metrics."""
    cis = metrics.get("confidence_intervals", {})
    out = {}
    for key in ("accuracy", "macro_auc", "macro_f1"):
        ci = cis.get(key) or {}
        out[key] = {"estimate": metrics.get(key), "ci_low": ci.get("low"), "ci_high": ci.get("high")}
    return out


def classical(scan, *, model: str, image_size: int, seed: int) -> dict:
    """``train_classical_baseline`` with its stage times and CIs."""
    result = baselines.train_classical_baseline(scan, seed=seed, image_size=image_size, model=model)
    return {
        "model": f"classical baseline ({model})",
        "protocol": result["protocol"],
        "image_size": image_size,
        "n_features": result["n_features"],
        "n_fit": result["n_train"],
        "n_test": result["n_test"],
        **ci_summary({**result, "accuracy": result["test_accuracy"]}),
        "confusion_matrix": result["confusion_matrix"],
        "seconds": {"total": result["seconds"], **result["stage_seconds"]},
    }


def scratch(data: Path, *, image_size: int, epochs: int, patience: int | None, seed: int, tmp: Path) -> dict:
    """Train the scratch CNN with ``training.train`` into a temporary store and artifacts folder."""
    from bcd_engine.store import RunStore
    from bcd_engine.training.run import train

    os.environ["BCD_ARTIFACTS_DIR"] = str(tmp / "artifacts")  # the model is saved there, not in artifacts/
    store = RunStore.open(f"sqlite:///{tmp / 'runs.db'}")
    config = TrainConfig.for_backbone("scratch_cnn", image_size=image_size, epochs=epochs, patience=patience, seed=seed)
    result = train(config, data, store=store, progress=True)
    if result.status != "completed":
        raise SystemExit(f"scratch CNN run ended {result.status}")
    evaluation = store.get_evaluations(result.run_id)[0]
    history = store.get_epochs(result.run_id)
    best = min(history, key=lambda e: e.val_loss if e.val_loss is not None else float("inf"))
    epoch_seconds = [e.seconds for e in history if e.seconds is not None]
    out = {
        "model": "scratch CNN",
        "protocol": result.protocol,
        "image_size": config.image_size,
        "n_fit": result.n_train,
        "n_val": result.n_val,
        "n_test": result.n_test,
        **ci_summary(evaluation.metrics),
        "confusion_matrix": evaluation.confusion_matrix,
        "epochs_max": config.epochs,
        "patience": config.patience,
        "epochs_run": len(history),
        "best_epoch": best.epoch,
        "stopped_early": len(history) < config.epochs,
        "seconds": {
            "total": result.seconds,
            "median_epoch": round(statistics.median(epoch_seconds), 2) if epoch_seconds else None,
        },
        "parameters": evaluation.metrics.get("parameters"),
        "latency_ms": evaluation.metrics.get("latency_ms"),
    }
    store.close()
    return out


def subset_folder(root: Path, limit: int, target: Path) -> Path:
    """Copy a seeded random subset of ``limit`` images of ``root`` (class folders kept) into ``target``."""
    scan = scan_dataset(root)
    rows = np.sort(np.random.default_rng(0).permutation(scan.n_images)[:limit])
    for i in rows:
        record = scan.images[i]
        (target / record.class_name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(record.path, target / record.class_name / Path(record.path).name)
    return target


def fmt_ci(entry: dict) -> str:
    if entry["estimate"] is None:
        return "n/a"
    if entry["ci_low"] is None:
        return f"{entry['estimate']:.4f}"
    return f"{entry['estimate']:.4f} ({entry['ci_low']:.4f}-{entry['ci_high']:.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder of class subfolders (default: the ALL dataset in ../shared)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (train's default is 0)")
    parser.add_argument(
        "--models", default="svm,logreg", help=f"classical models, from {baselines.MODELS}; empty to skip"
    )
    parser.add_argument(
        "--baseline-size",
        type=int,
        default=128,
        help="image size for the hand-crafted features (train_classical_baseline's default)",
    )
    parser.add_argument("--scratch", action="store_true", help="also train the scratch CNN (minutes)")
    parser.add_argument("--scratch-size", type=int, default=96)
    parser.add_argument(
        "--scratch-epochs",
        type=int,
        default=60,
        help="at most (the engine's default for the scratch CNN); early stopping may end sooner",
    )
    parser.add_argument(
        "--scratch-patience",
        type=int,
        default=None,
        help="early-stopping patience (default: the scratch CNN's default)",
    )
    parser.add_argument(
        "--limit", type=int, default=0, help="check the script on N images only (figures not comparable)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]

    from bcd_engine.models.device import configure_device

    environment = configure_device()
    machine = machine_info()
    log(f"machine: {machine['summary']}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bcd-bench-baselines-") as tmp_name:
        tmp = Path(tmp_name)
        if args.data:
            data, note = Path(args.data), f"folder {args.data}"
        elif ALL_DATA.is_dir():
            data, note = ALL_DATA, "ALL dataset (../shared/datasets/all_taleqani/Original)"
        else:
            data, note = ensure_demo_dataset(), "../shared missing: synthetic demo set (not the ALL dataset)"
        if args.limit:
            data = subset_folder(data, args.limit, tmp / "subset")
            os.environ["BCD_CACHE_DIR"] = str(tmp / "cache")  # the subset's scan cache dies with it
            note += f"; CHECK RUN on a random subset of {args.limit} images: figures not comparable"
        log(f"data: {note}")
        scan = scan_dataset(data)
        split = holdout_split(scan.labels, scan.groups, seed=args.seed)
        results = []
        for model in models:
            log(f"classical baseline ({model}) ...")
            results.append(classical(scan, model=model, image_size=args.baseline_size, seed=args.seed))
            log(f"  accuracy {results[-1]['accuracy']['estimate']:.4f} in {results[-1]['seconds']['total']:.1f} s")
        if args.scratch:
            log(f"scratch CNN ({args.scratch_size} px, at most {args.scratch_epochs} epochs) ...")
            results.append(
                scratch(
                    data,
                    image_size=args.scratch_size,
                    epochs=args.scratch_epochs,
                    patience=args.scratch_patience,
                    seed=args.seed,
                    tmp=tmp,
                )
            )
            log(f"  accuracy {results[-1]['accuracy']['estimate']:.4f} in {results[-1]['seconds']['total']:.1f} s")

    document = {
        "benchmark": "classical baseline and scratch CNN on the group-aware hold-out split, beside the thesis",
        "machine": machine,
        "device": environment["device"],
        "load_average_at_end": load_average(),
        "data": note,
        "split": {
            "seed": args.seed,
            "n_train": len(split.train),
            "n_val": len(split.val),
            "n_test": len(split.test),
            "class_names": list(scan.class_names),
        },
        "results": results,
        "reference": [
            {**row, "protocol": "reported by its source; split and leakage control unknown"} for row in THESIS_REFERENCE
        ],
        "seconds": round(time.perf_counter() - started, 1),
        "notes": [
            (
                "accuracy, macro_auc (one-vs-rest) and macro_f1 are on the test side of the split, with 95% "
                "percentile bootstrap CIs over 1000 resamples of the test set's duplicate groups (most hold one image)"
            ),
            (
                "the classical baseline fits on train + val (nothing is tuned); the scratch CNN trains on train and "
                "stops early on val"
            ),
            "the thesis reports validation accuracy, not a group-aware held-out test accuracy",
        ],
    }
    if print_report_start(document, machine, as_json=args.json):
        return
    s = document["split"]
    print(f"data: {note}; split seed {s['seed']}: {s['n_train']} train / {s['n_val']} val / {s['n_test']} test")
    print(f"{'model':<28}{'px':>5}{'test accuracy (95% CI)':>28}{'macro AUC (95% CI)':>28}{'macro F1':>9}{'time s':>9}")
    for r in results:
        print(
            f"{r['model']:<28}{r['image_size']:>5}{fmt_ci(r['accuracy']):>28}{fmt_ci(r['macro_auc']):>28}"
            f"{r['macro_f1']['estimate']:>9.4f}{r['seconds']['total']:>9.1f}"
        )
    print("reported by others (validation accuracy):")
    for row in THESIS_REFERENCE:
        print(f"  {row['model']:<44}{row['val_accuracy']:>8.2%}  ({row['source']})")
    for r in results:
        print(
            f"{r['model']}: seconds {r['seconds']}"
            + (
                f"; epochs run {r['epochs_run']} of {r['epochs_max']}, best {r['best_epoch']}"
                if "epochs_run" in r
                else ""
            )
        )
    for line in document["notes"]:
        print(f"- {line}")


if __name__ == "__main__":
    main()
