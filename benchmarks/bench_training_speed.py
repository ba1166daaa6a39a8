"""Training speed on a CPU: bcd's default recipe against a plain Keras notebook, and bcd's feature cache.

``--compare recipes`` (the default) times, in one process and each from a cold feature cache, end to end (train
and evaluate on the test split):

- the **notebook**: ``keras.utils.image_dataset_from_directory`` on the same train/val/test images as bcd's split
  -> frozen ResNet50 -> global average pooling -> dense head, ``model.fit`` for 3 epochs (the backbone run on
  every batch of every epoch), then ``model.evaluate`` on the test images;
- bcd's **new default** (``TrainConfig.for_backbone("resnet50", weights=FILE)``: the recipe ``train`` runs
  with no option), scan and OOD gate included;
- bcd's **old default** (8 augmented views per training image, 8 test-time views, no label smoothing), by explicit
  settings.

It prints each one's wall time, extraction rate (images or views through the backbone per second), test accuracy
and its ratio to the notebook's wall time.

    python benchmarks/bench_training_speed.py [--variants notebook,new,old] [--per-class 60] [--json]

``--compare cache`` is the older head-to-head: naive ``model.fit`` on backbone + head against bcd's feature cache,
the same head on the same views for the same number of epochs, interleaved:

    python benchmarks/bench_training_speed.py --compare cache --epochs 10 [--limit 600] [--json]

Uses ../shared/datasets/all_taleqani/Original and ../shared/weights when present, else the synthetic
demo set with random weights (and says so).
"""

from __future__ import annotations

import argparse
import json
import logging
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
    parser.add_argument("--compare", choices=("recipes", "cache"), default="recipes")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"recipes timed, in order ({', '.join(VARIANTS)})"
    )
    parser.add_argument("--per-class", type=int, default=0, help="recipes: images per class used (0: all)")
    parser.add_argument("--notebook-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="cache: epochs of both sides")
    parser.add_argument("--limit", type=int, default=600, help="cache: training images used (0: all)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = compare_recipes(args) if args.compare == "recipes" else compare_cache(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")


VARIANTS = ("notebook", "new", "old")


def compare_recipes(args) -> dict:
    """The notebook, bcd's new default and bcd's old default, each end to end from a cold feature cache."""
    import tempfile

    load_at_start = os.getloadavg()[0]
    # Each phase of bcd's runs (scan, loading, features, epochs, gate, saving) with its time, on stderr.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    real = ALL_DATA.is_dir() and RESNET_WEIGHTS.is_file()
    source = ALL_DATA if real else ensure_demo_dataset()
    weights = str(RESNET_WEIGHTS) if real else None
    note = "ALL dataset, ImageNet ResNet50 weights" if real else "../shared missing: synthetic demo set, random weights"
    work = Path(tempfile.mkdtemp(prefix="bcd-bench-recipes-"))
    data = _subset(source, work / "data", args.per_class) if args.per_class else source
    if args.per_class:
        note += f", {args.per_class} images per class"
    print(f"data: {note}; work folder {work}", file=sys.stderr)
    new = TrainConfig.for_backbone("resnet50", weights=weights)
    old = TrainConfig.for_backbone(
        "resnet50", weights=weights, augment=OLD_VIEWS, tta_views=OLD_VIEWS, label_smoothing=0.0
    )
    os.environ["BCD_CACHE_DIR"] = str(work / "scan-cache")  # the split for the notebook's folders (not timed)
    scan = scan_dataset(data)
    split = holdout_split(
        scan.labels, scan.groups, val_fraction=new.val_fraction, test_fraction=new.test_fraction, seed=new.seed
    )
    counts = {"n_train": len(split.train), "n_val": len(split.val), "n_test": len(split.test)}
    rows = {}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if variant == "notebook":
            rows[variant] = _notebook(scan, split, work / "notebook", weights=weights, epochs=args.notebook_epochs)
        else:
            config = {"new": new, "old": old}[variant]
            rows[variant] = _bcd_default(config, data, work / variant)
        row = rows[variant]
        print(
            f"{variant}: {row['seconds']:.1f} s, {row['images_per_second']:.1f} images/s through the backbone, "
            f"test accuracy {row['test_accuracy']:.4f}",
            file=sys.stderr,
        )
    if "notebook" in rows:
        for row in rows.values():
            row["ratio_to_notebook"] = row["seconds"] / rows["notebook"]["seconds"]
    import keras

    return {
        "benchmark": "ResNet50 end to end on a CPU: a Keras notebook's model.fit vs bcd's new and old default",
        "data": note,
        **counts,
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg()[0],
        "keras": keras.__version__,
        "recipes": {"new": _recipe(new), "old": _recipe(old)},
        "variants": rows,
    }


OLD_VIEWS = 8  # the default before issue 27: 8 augmented views per training image and 8 test-time views


def _recipe(config: TrainConfig) -> dict:
    return {
        "augment": config.augment.factor,
        "tta_views": config.tta_views,
        "label_smoothing": config.label_smoothing,
        "epochs": config.epochs,
    }


def _subset(source: Path, target: Path, per_class: int) -> Path:
    """A folder of links to ``per_class`` images of each class of ``source`` (seeded), for quick trials."""
    rng = np.random.default_rng(0)
    for class_dir in sorted(d for d in source.iterdir() if d.is_dir()):
        files = sorted(f for f in class_dir.iterdir() if f.is_file())
        (target / class_dir.name).mkdir(parents=True)
        for index in sorted(rng.choice(len(files), size=min(per_class, len(files)), replace=False)):
            (target / class_dir.name / files[index].name).symlink_to(files[index])
    return target


def _bcd_default(config: TrainConfig, data: Path, work: Path) -> dict:
    """bcd's ``train`` with ``config`` from an empty cache folder (scan and features) into a fresh store."""
    from bcd_engine.store import RunStore
    from bcd_engine.training.estimate import rates_file
    from bcd_engine.training.run import train

    os.environ["BCD_CACHE_DIR"] = str(work / "cache")
    os.environ["BCD_ARTIFACTS_DIR"] = str(work / "artifacts")
    store = RunStore.open(f"sqlite:///{work / 'results.db'}")
    started = time.perf_counter()
    result = train(config, data, store=store)
    seconds = time.perf_counter() - started
    measured = next(iter(json.loads(rates_file().read_text()).values()))[f"{config.backbone}@{config.image_size}"]
    return {
        "seconds": seconds,
        "images_per_second": measured["rate"],  # views of the training and validation images extracted per second
        "views_extracted": result.feature_cache["misses"],
        "test_accuracy": result.test_accuracy,
        "status": result.status,
    }


def _notebook(scan, split, work: Path, *, weights: str | None, epochs: int) -> dict:
    """A plain Keras notebook on the same split: image_dataset_from_directory -> frozen ResNet50 -> pooling -> dense
    head, ``model.fit`` for ``epochs`` (the backbone on every batch), ``model.evaluate`` on the test images."""
    import keras
    import tensorflow as tf

    for subset, rows in (("train", split.train), ("val", split.val), ("test", split.test)):
        for row in rows:
            link = work / subset / scan.class_names[scan.labels[row]] / f"{row:05d}-{Path(scan.paths[row]).name}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(scan.paths[row])
    started = time.perf_counter()
    preprocess = keras.applications.resnet50.preprocess_input

    def dataset(subset: str, shuffle: bool):
        images = keras.utils.image_dataset_from_directory(
            work / subset,
            image_size=(224, 224),
            batch_size=32,
            label_mode="categorical",
            class_names=list(scan.class_names),
            shuffle=shuffle,
            seed=0,
            verbose=False,
        )
        return images.map(lambda x, y: (preprocess(x), y)).prefetch(tf.data.AUTOTUNE)

    train_images, val_images, test_images = dataset("train", True), dataset("val", False), dataset("test", False)
    base = keras.applications.ResNet50(include_top=False, weights=weights, input_shape=(224, 224, 3))
    base.trainable = False
    inputs = keras.Input((224, 224, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
    x = keras.layers.Dropout(0.3)(keras.layers.Dense(256, activation="relu")(x))
    model = keras.Model(inputs, keras.layers.Dense(len(scan.class_names), activation="softmax")(x))
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    model.fit(train_images, validation_data=val_images, epochs=epochs, verbose=0)
    _, accuracy = model.evaluate(test_images, verbose=0)
    seconds = time.perf_counter() - started
    passes = epochs * (len(split.train) + len(split.val)) + len(split.test)
    return {
        "seconds": seconds,
        "images_per_second": passes / seconds,  # every image of every epoch through the backbone, then the test
        "backbone_passes": passes,
        "test_accuracy": float(accuracy),
        "status": "completed",
    }


def compare_cache(args) -> dict:
    """Naive ``model.fit`` on backbone + head against bcd's feature cache, the same head, views and epochs."""
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
    return result


if __name__ == "__main__":
    main()
