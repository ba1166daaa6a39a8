"""How well a run's out-of-domain gate tells its own kind of image from others, and what it costs.

    python benchmarks/bench_ood.py --run ID --external DIR [--photos DIR] [--json]

Uses the store and artifacts of ``BCD_DATABASE_URL`` / ``BCD_ARTIFACTS_DIR``; a run without a gate gets
one first (``calibrate_run``, as ``python -m bcd_engine calibrate`` does, which writes to that store).
Scores every image of the run's own test split and of ``--external`` (a folder of images from another
source, e.g. another lab's normal lymphocytes: it must never be used to set the threshold) with the
gate, and prints the share each side flags, the AUROC of the score between them, the share flagged of
images that are no smears at all (the SYNTHETIC demo set drawn at the run's size, uniform noise, blank
white and black frames, the test images in grayscale, and with ``--photos`` a folder of photographs), and
the gate's cost per image beside the model's forward pass (one view, and the 8 views of --tta).
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


def scores(loaded, images: np.ndarray) -> np.ndarray:
    return loaded.trust.gate.score(loaded.forward_with_features(images)[1])


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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from sklearn.metrics import roc_auc_score

    from bcd_engine.data.images import load_images
    from bcd_engine.data.synthetic import make_synthetic_dataset
    from bcd_engine.inference.calibrate import calibrate_run
    from bcd_engine.inference.loading import load_run_model
    from bcd_engine.store import RunStore

    store = RunStore.open()
    calibration = None
    if not [a for a in store.get_artifacts(args.run) if a.kind == "trust"]:
        log(f"run {args.run} has no gate yet: fitting it from its recorded split ...")
        calibration = calibrate_run(args.run, store=store, progress=True)
    loaded = load_run_model(args.run, store=store)
    size, threshold = loaded.config.image_size, loaded.trust.gate.threshold
    test_paths = [row["path"] for row in store.get_split(args.run) if row["subset"] == "test"]
    external_paths = sorted(
        str(p)
        for p in Path(args.external).rglob("*")
        if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
    )
    log(f"scoring {len(test_paths)} test images and {len(external_paths)} external images ...")
    test_images = load_images(test_paths, image_size=size)
    own = scores(loaded, test_images)
    external = scores(loaded, load_images(external_paths, image_size=size))
    auroc = float(roc_auc_score(np.r_[np.zeros(len(own)), np.ones(len(external))], np.r_[own, external]))

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
        "test images in grayscale": grey,
    }
    if args.photos:
        photos = sorted(str(p) for p in Path(args.photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        others[f"photographs ({len(photos)}, {args.photos})"] = load_images(photos, image_size=size)
    flagged_others = {name: float((scores(loaded, images) > threshold).mean()) for name, images in others.items()}

    one = test_images[:1]
    features = loaded.forward_with_features(one)[1]
    forward_1 = best_of(10, lambda: loaded.forward(one))
    forward_8 = best_of(5, lambda: loaded.forward(np.repeat(one, 8, axis=0)))
    gate_1 = best_of(50, lambda: loaded.trust.gate.score(features))

    result = {
        "run": args.run,
        "backbone": loaded.config.backbone,
        "image_size": size,
        "threshold": threshold,
        "pass_rate": loaded.trust.gate.pass_rate,
        "temperature": loaded.trust.temperature,
        "calibration": calibration.to_dict() if calibration else None,
        "own_test": {"n": len(own), "flagged_share": float((own > threshold).mean())},
        "external": {
            "folder": args.external,
            "n": len(external),
            "flagged_share": float((external > threshold).mean()),
        },
        "auroc_own_vs_external": auroc,
        "not_smears_flagged_share": flagged_others,
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
    print(
        f"run {args.run} ({result['backbone']}, {size} px): threshold {threshold:.1f} "
        f"(passes {result['pass_rate']:.0%} of its validation images), temperature {result['temperature']:.3f}"
    )
    if calibration:
        print(f"  calibration: test ECE {calibration.ece:.4f} before, {calibration.ece_calibrated:.4f} after")
    print(f"  own test images flagged: {result['own_test']['flagged_share']:.1%} of {len(own)}")
    print(f"  external images flagged: {result['external']['flagged_share']:.1%} of {len(external)} ({args.external})")
    print(f"  AUROC of the score, own test vs external: {auroc:.4f}")
    for name, share in flagged_others.items():
        print(f"  {name} flagged: {share:.1%}")
    c = result["cost"]
    print(
        f"  cost per image: gate {c['gate_ms']:.2f} ms; forward {c['forward_1_view_ms']:.1f} ms (1 view), "
        f"{c['forward_8_views_ms']:.1f} ms (8 views); gate / forward {c['gate_over_1_view']:.3f} (1 view), "
        f"{c['gate_over_8_views']:.3f} (8 views)"
    )


if __name__ == "__main__":
    main()
