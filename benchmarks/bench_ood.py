"""How well a run's out-of-domain gate tells its own kind of image from others, and what it costs.

    python benchmarks/bench_ood.py --run ID --external DIR [--photos DIR] [--refit] [--json]

Uses the store and artifacts of ``BCD_DATABASE_URL`` / ``BCD_ARTIFACTS_DIR``; a run without a gate gets
one first (``calibrate_run``, as ``python -m bcd_engine calibrate`` does, which writes to that store).
Scores every image of the run's own test split and of ``--external`` (a folder of images from another
source, e.g. another lab's normal lymphocytes: it must never be used to set the threshold) with the
gate, and prints the share each side flags, the AUROC of the score between them, the share flagged of
images that are no smears at all (the SYNTHETIC demo set drawn at the run's size, uniform noise, blank
white and black frames, the test images in grayscale, and with ``--photos`` a folder of photographs), and
the gate's cost per image beside the model's forward pass (one view, and the 8 views of --tta). Photographs
always include crops of scikit-learn's two sample photographs (china.jpg, flower.jpg).

With ``--refit``, the gate is also fitted again from the run's training and validation features by today's
rule (``MahalanobisGate.fit``: in-domain images only, nothing saved) and every share is given for both
gates side by side: the saved one (for a run gated before, the 95th percentile of validation) and the refit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np


def log(msg: str) -> None:
    print(f"[bench_ood] {msg}", file=sys.stderr, flush=True)


def features(loaded, images: np.ndarray) -> np.ndarray:
    return loaded.forward_with_features(images)[1]


def photograph_crops(n: int, *, size: int) -> np.ndarray:
    """``n`` square crops of scikit-learn's sample photographs (china.jpg, flower.jpg) at ``size`` pixels."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(120, min(photo.shape[:2]) + 1))
        top, left = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
        crops.append(np.asarray(Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size))))
    return np.stack(crops)


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=int, required=True)
    parser.add_argument("--external", required=True, help="folder of images from another source (searched recursively)")
    parser.add_argument(
        "--photos",
        help="folder of photographs that are no smears (e.g. scikit-image's sample "
        "images, skimage/data in its wheel); each counted as flagged or not",
    )
    parser.add_argument(
        "--refit", action="store_true", help="also refit the gate by today's rule from the run's train/val features"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from sklearn.metrics import roc_auc_score

    from bcd_engine.data.images import load_images
    from bcd_engine.data.synthetic import make_synthetic_dataset
    from bcd_engine.evaluation.ood import MahalanobisGate
    from bcd_engine.inference.calibrate import calibrate_run
    from bcd_engine.inference.loading import load_run_model
    from bcd_engine.store import RunStore

    store = RunStore.open()
    calibration = None
    if not [a for a in store.get_artifacts(args.run) if a.kind == "trust"]:
        log(f"run {args.run} has no gate yet: fitting it from its recorded split ...")
        calibration = calibrate_run(args.run, store=store, progress=True)
    loaded = load_run_model(args.run, store=store)
    size, saved = loaded.config.image_size, loaded.trust.gate
    split = store.get_split(args.run)
    test_paths = [row["path"] for row in split if row["subset"] == "test"]
    external_paths = sorted(
        str(p)
        for p in Path(args.external).rglob("*")
        if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
    )
    log(f"scoring {len(test_paths)} test images and {len(external_paths)} external images ...")
    test_images = load_images(test_paths, image_size=size)
    own_f = features(loaded, test_images)
    external_f = features(loaded, load_images(external_paths, image_size=size))

    gates, refit_seconds = {"saved": saved}, None
    if args.refit:
        rows = {name: [row for row in split if row["subset"] == name] for name in ("train", "val")}
        log(f"refitting from {len(rows['train'])} train and {len(rows['val'])} validation images ...")
        fit_f = {
            name: features(loaded, load_images([r["path"] for r in found], image_size=size))
            for name, found in rows.items()
        }
        labels = [loaded.class_names.index(r["class_name"]) for r in rows["train"]]
        started = time.perf_counter()
        gates["refit"] = MahalanobisGate.fit(fit_f["train"], labels, fit_f["val"])
        refit_seconds = time.perf_counter() - started

    rng = np.random.default_rng(0)
    drawn = make_synthetic_dataset(
        Path(os.environ.get("TMPDIR", "/tmp")) / f"bcd-ood-synthetic-{size}", n_per_class=25, image_size=size, seed=7
    )
    synthetic = load_images(sorted(str(p) for p in Path(drawn).glob("*/*.png")), image_size=size)
    grey = np.repeat(test_images.mean(axis=-1, keepdims=True), 3, axis=-1).astype(np.uint8)
    others = {
        "SYNTHETIC smears (drawn)": synthetic,
        "uniform noise": rng.integers(0, 256, (100, size, size, 3), dtype=np.uint8),
        "blank white": np.full((20, size, size, 3), 255, np.uint8),
        "blank black": np.zeros((20, size, size, 3), np.uint8),
        "photograph crops (scikit-learn's china.jpg, flower.jpg)": photograph_crops(40, size=size),
        "test images in grayscale": grey,
    }
    if args.photos:
        photos = sorted(str(p) for p in Path(args.photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        others[f"photographs ({len(photos)}, {args.photos})"] = load_images(photos, image_size=size)
    others_f = {name: features(loaded, images) for name, images in others.items()}

    def shares(gate) -> dict:
        own, external = gate.score(own_f), gate.score(external_f)
        return {
            "threshold": gate.threshold,
            "pass_rate": gate.pass_rate,
            "rule": gate.rule,
            "own_test": {"n": len(own), "flagged_share": float((own > gate.threshold).mean())},
            "external": {"n": len(external), "flagged_share": float((external > gate.threshold).mean())},
            "auroc_own_vs_external": float(
                roc_auc_score(np.r_[np.zeros(len(own)), np.ones(len(external))], np.r_[own, external])
            ),
            "not_smears_flagged_share": {
                name: float((gate.score(f) > gate.threshold).mean()) for name, f in others_f.items()
            },
        }

    by_gate = {name: shares(gate) for name, gate in gates.items()}

    one = test_images[:1]
    one_f = features(loaded, one)
    forward_1 = best_of(10, lambda: loaded.forward(one))
    forward_8 = best_of(5, lambda: loaded.forward(np.repeat(one, 8, axis=0)))
    gate_1 = best_of(50, lambda: saved.score(one_f))

    result = {
        "run": args.run,
        "backbone": loaded.config.backbone,
        "image_size": size,
        "temperature": loaded.trust.temperature,
        "calibration": calibration.to_dict() if calibration else None,
        "external_folder": args.external,
        "gates": by_gate,
        "refit_seconds": refit_seconds,
        "cost": {
            "gate_ms": gate_1 * 1e3,
            "forward_1_view_ms": forward_1 * 1e3,
            "forward_8_views_ms": forward_8 * 1e3,
            "gate_over_1_view": gate_1 / forward_1,
            "gate_over_8_views": gate_1 / forward_8,
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"run {args.run} ({result['backbone']}, {size} px), temperature {result['temperature']:.3f}")
    if calibration:
        print(f"  calibration: test ECE {calibration.ece:.4f} before, {calibration.ece_calibrated:.4f} after")
    names = list(by_gate)
    print("| flagged out of domain | n | " + " | ".join(f"{name} gate" for name in names) + " |")
    print("| --- | --- |" + " --- |" * len(names))
    rows = [
        (
            "threshold",
            "",
            [f"{by_gate[g]['threshold']:.1f} ({by_gate[g]['rule']}, {by_gate[g]['pass_rate']:.0%})" for g in names],
        ),
        ("own test images", len(own_f), [f"{by_gate[g]['own_test']['flagged_share']:.1%}" for g in names]),
        (
            f"external ({args.external})",
            len(external_f),
            [f"{by_gate[g]['external']['flagged_share']:.1%}" for g in names],
        ),
        *(
            (name, len(others_f[name]), [f"{by_gate[g]['not_smears_flagged_share'][name]:.1%}" for g in names])
            for name in others_f
        ),
        ("AUROC of the score, own test vs external", "", [f"{by_gate[g]['auroc_own_vs_external']:.4f}" for g in names]),
    ]
    for label, n, cells in rows:
        print(f"| {label} | {n} | " + " | ".join(cells) + " |")
    own, external = saved.score(own_f), saved.score(external_f)
    print(
        f"  scores: own test {own.min():,.1f}-{own.max():,.1f} (median {np.median(own):,.1f}), external "
        f"{external.min():,.1f}-{external.max():,.1f} (median {np.median(external):,.1f})"
    )
    if args.refit:
        print(f"  refit took {refit_seconds:.1f} s (class means, Ledoit-Wolf precision, 5-fold cross-fitted scores)")
    c = result["cost"]
    print(
        f"  cost per image: gate {c['gate_ms']:.2f} ms; forward {c['forward_1_view_ms']:.1f} ms (1 view), "
        f"{c['forward_8_views_ms']:.1f} ms (8 views); gate / forward {c['gate_over_1_view']:.3f} (1 view), "
        f"{c['gate_over_8_views']:.3f} (8 views)"
    )


if __name__ == "__main__":
    main()
