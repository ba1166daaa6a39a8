"""Frozen-backbone training: bcd's feature cache against the naive Keras workflow, interleaved.

The naive way (what most notebooks do) is ``model.fit`` on backbone + head with the backbone frozen, so
the backbone's forward pass is recomputed for every image in every epoch. bcd extracts each view's
features once and trains the head on them. Both train the same head, on the same views, for the same
number of epochs, in one process; the order alternates between repeats.

    python benchmarks/bench_training_speed.py --epochs 10 [--limit 600] [--json]

Uses ../shared/datasets/all_taleqani/Original and ../shared/weights when present, else the synthetic
demo set with random weights (and says so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bcd_engine.data.images import load_images
from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.splits import holdout_split
from bcd_engine.data.synthetic import ensure_demo_dataset
from bcd_engine.inference.predict import predict_proba
from bcd_engine.models.backbones import get_backbone
from bcd_engine.models.config import AugmentConfig, TrainConfig
from bcd_engine.models.device import configure_device, precision_policy
from bcd_engine.models.features import build_feature_extractor, extract_features
from bcd_engine.models.head import (
    assemble_model,
    build_head,
    compile_model,
    fit_head_on_features,
)

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
ALL_DATA = SHARED / "datasets" / "all_taleqani" / "Original"
RESNET_WEIGHTS = SHARED / "weights" / "resnet50_imagenet_notop.weights.h5"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit", type=int, default=600, help="training images used (0: all)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    real = ALL_DATA.is_dir() and RESNET_WEIGHTS.is_file()
    data = ALL_DATA if real else ensure_demo_dataset()
    note = "ALL dataset, ImageNet ResNet50 weights" if real else "../shared missing: synthetic demo set, random weights"
    print(f"data: {note}", file=sys.stderr)
    import keras

    environment = configure_device()
    keras.mixed_precision.set_global_policy(precision_policy(environment))  # this process trains, as a run does
    config = TrainConfig(
        backbone="resnet50",
        weights=str(RESNET_WEIGHTS) if real else None,
        image_size=224 if real else 96,
        epochs=args.epochs,
        patience=args.epochs + 1,
        dropout=0.0,
        augment=AugmentConfig(factor=1),
    )
    spec = get_backbone(config.backbone)
    preprocess = spec.preprocess()
    scan = scan_dataset(data)
    split = holdout_split(scan.labels, scan.groups, seed=0)
    # A seeded random subset: split.train is sorted by class, so its head would hold one or two classes.
    shuffled = np.random.default_rng(0).permutation(split.train)
    train_rows = np.sort(shuffled[: args.limit] if args.limit else shuffled)
    images = load_images(scan.paths, image_size=config.image_size)
    labels, n_classes = scan.labels, len(scan.class_names)
    md5s = [r.md5 for r in scan.images]
    extractor, backbone = build_feature_extractor(spec, config)

    def cached():
        common = dict(preprocess=preprocess, augment=config.augment, seed=0, cache=None, batch_size=config.batch_size)
        train_x = extract_features(
            extractor, images, train_rows, [md5s[i] for i in train_rows], np.zeros(len(train_rows), int), **common
        )
        val_x = extract_features(
            extractor, images, split.val, [md5s[i] for i in split.val], np.zeros(len(split.val), int), **common
        )
        head = fit_head_on_features(
            train_x, labels[train_rows], val_x, labels[split.val], n_classes=n_classes, config=config
        )
        return assemble_model(backbone, head, config)

    def naive():
        import keras

        model = assemble_model(backbone, build_head(backbone.output_shape[-1], n_classes, config), config)
        compile_model(model, config, config.learning_rate)
        x = preprocess(images[train_rows].astype("float32"))
        val = (
            preprocess(images[split.val].astype("float32")),
            keras.utils.to_categorical(labels[split.val], n_classes),
        )
        model.fit(
            x,
            keras.utils.to_categorical(labels[train_rows], n_classes),
            batch_size=config.batch_size,
            epochs=config.epochs,
            validation_data=val,
            verbose=0,
        )
        return model

    def accuracy(model) -> float:
        prob = predict_proba(model, images[split.test], preprocess=preprocess)
        return float((prob.argmax(1) == labels[split.test]).mean())

    timings = {"naive": [], "cached": []}  # training: from images to a trained model
    evaluations = {"naive": [], "cached": []}  # the same test-split evaluation on both sides
    accuracies = {"naive": [], "cached": []}
    for repeat in range(args.repeats):
        order = (("naive", naive), ("cached", cached)) if repeat % 2 == 0 else (("cached", cached), ("naive", naive))
        for name, fn in order:
            started = time.perf_counter()
            model = fn()
            trained = time.perf_counter()
            accuracies[name].append(accuracy(model))
            timings[name].append(trained - started)
            evaluations[name].append(time.perf_counter() - trained)
            print(
                f"{name}: training {timings[name][-1]:.1f} s, evaluation {evaluations[name][-1]:.1f} s, "
                f"test accuracy {accuracies[name][-1]:.4f}",
                file=sys.stderr,
            )

    naive_train, cached_train = float(np.median(timings["naive"])), float(np.median(timings["cached"]))
    result = {
        "benchmark": "frozen-backbone training, naive model.fit vs bcd feature cache",
        "data": note,
        "n_train": len(train_rows),
        "n_test": len(split.test),
        "epochs": args.epochs,
        "image_size": config.image_size,
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "device": environment["device"],
        "naive_train_seconds": naive_train,
        "cached_train_seconds": cached_train,
        "training_speedup": naive_train / cached_train,
        "evaluation_seconds": float(np.median(evaluations["naive"] + evaluations["cached"])),
        "end_to_end_speedup": float(naive_train + np.median(evaluations["naive"]))
        / (cached_train + np.median(evaluations["cached"])),
        "naive_accuracy": float(np.mean(accuracies["naive"])),
        "cached_accuracy": float(np.mean(accuracies["cached"])),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")


if __name__ == "__main__":
    main()
