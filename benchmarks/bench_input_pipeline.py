"""Input pipeline: the engine's feature extraction from image files, as a fraction of the raw model on tensors.

(a) The engine's pipeline, end to end from image FILES: ``training.load_images`` (decode and resize on a
thread pool) then ``features.extract_features`` without a cache (NumPy batches prepared ahead in threads,
augmented views by Keras ops, preprocessing and extractor in one compiled call per batch), once with
view 0 for every image (no augmentation) and once with augmented views 1..7 (what phase 1 computes for
an 8-view recipe).
(b) The raw extractor (frozen backbone + global pooling, the same ``tf.function`` definition and batch
size) on the same images already preprocessed into a float32 tensor in memory.

It reports images/s for each, the fraction (a)/(b) (goal: at least 90%), and where the time goes: the
decode+resize stage alone, ``extract_features`` from in-memory uint8 images alone, and the cost of
tracing a fresh ``tf.function`` (the engine compiles once per extractor, so this is paid once).
Everything is warmed up first (page cache included: the files are read from memory, not from a cold
disk); the variants are interleaved, their order alternating between repeats, and the medians reported.

    python benchmarks/bench_input_pipeline.py [--limit 512] [--backbone resnet50] [--image-size 224] [--json]

Uses ../shared/datasets/all_taleqani/Original (and ../shared/weights for ResNet50) when present, else a
synthetic folder made on the fly with random weights, and says so.
"""

from __future__ import annotations

import argparse
import math
import os
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

from bcd_engine.data.images import load_images
from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.synthetic import make_synthetic_dataset
from bcd_engine.models.backbones import get_backbone
from bcd_engine.models.config import AugmentConfig, TrainConfig
from bcd_engine.models.device import configure_device, precision_policy
from bcd_engine.models.features import build_feature_extractor, extract_features

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
ALL_DATA = SHARED / "datasets" / "all_taleqani" / "Original"
RESNET_WEIGHTS = SHARED / "weights" / "resnet50_imagenet_notop.weights.h5"
GOAL = 0.90
AUGMENTED_VIEWS = 7  # views 1..7: the augmented views of an 8-view recipe


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder of class subfolders (default: the ALL dataset in ../shared)")
    parser.add_argument("--limit", type=int, default=512, help="images used (a seeded random subset; 0: all)")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32, help="as TrainConfig's default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    environment = configure_device()
    keras.mixed_precision.set_global_policy(precision_policy(environment))  # this process trains, as a run does
    machine = machine_info()
    log(f"machine: {machine['summary']}")
    spec = get_backbone(args.backbone)
    synthetic = False
    with tempfile.TemporaryDirectory(prefix="bcd-bench-pipeline-") as tmp:
        if args.data:
            data, note = Path(args.data), f"folder {args.data}"
        elif ALL_DATA.is_dir():
            data, note = ALL_DATA, "ALL dataset (../shared/datasets/all_taleqani/Original, 224x224 JPEG files)"
        else:
            n_per_class = max(2, math.ceil((args.limit or 128) / 4))
            log(f"../shared missing: writing a synthetic folder ({n_per_class} PNG images per class) ...")
            data = make_synthetic_dataset(Path(tmp) / "synthetic", n_per_class=n_per_class, image_size=args.image_size)
            synthetic = True
            note = (
                f"../shared missing: synthetic folder made on the fly ({n_per_class} images per class, "
                f"{args.image_size} px PNG files; not the ALL dataset's JPEGs)"
            )
        weights = str(RESNET_WEIGHTS) if spec.name == "resnet50" and RESNET_WEIGHTS.is_file() else None
        shown = "ImageNet (../shared)" if weights else "random (timing does not depend on them)"
        log(f"data: {note}; weights: {shown}")
        scan = scan_dataset(data, use_cache=not synthetic)  # no scan-cache entry for a temporary folder
        order = np.random.default_rng(0).permutation(scan.n_images)
        rows = np.sort(order[: args.limit] if args.limit else order)
        paths = [scan.paths[i] for i in rows]
        md5s = [scan.images[i].md5 for i in rows]
        n = len(rows)
        config = TrainConfig(
            backbone=spec.name,
            weights=weights,
            image_size=args.image_size,
            batch_size=args.batch_size,
            augment=AugmentConfig(factor=AUGMENTED_VIEWS + 1),
        )
        preprocess = spec.preprocess()
        extractor, _ = build_feature_extractor(spec, config)
        indices = np.arange(n)
        views0 = np.zeros(n, dtype=np.int64)
        views_aug = 1 + np.arange(n) % AUGMENTED_VIEWS
        common = dict(
            preprocess=preprocess, augment=config.augment, seed=config.seed, cache=None, batch_size=config.batch_size
        )

        def engine_from_files(views):
            started = time.perf_counter()
            images = load_images(paths, image_size=config.image_size)
            decoded = time.perf_counter()
            extract_features(extractor, images, indices, md5s, views, **common)
            done = time.perf_counter()
            return {"total": done - started, "decode": decoded - started, "extract": done - decoded}

        infer = tf.function(lambda batch: extractor(batch, training=False), reduce_retracing=True)

        def raw(x):
            started = time.perf_counter()
            for start in range(0, len(x), config.batch_size):
                infer(x[start : start + config.batch_size]).numpy().astype(np.float32)
            return {"total": time.perf_counter() - started}

        # Warm-up: the page cache (all files), TF kernels and oneDNN primitives, both batch shapes of infer.
        log(f"warm-up on {n} images ...")
        images = load_images(paths, image_size=config.image_size)
        x_mem = tf.constant(preprocess(images.astype(np.float32)))
        raw(x_mem)
        warm = min(n, 2 * config.batch_size)
        extract_features(extractor, images, indices[:warm], md5s[:warm], views0[:warm], **common)
        extract_features(extractor, images, indices[:warm], md5s[:warm], views_aug[:warm], **common)

        # Tracing cost of a fresh tf.function (the engine pays it once per extractor): first call minus a warm one.
        fresh = tf.function(lambda batch: extractor(batch, training=False), reduce_retracing=True)
        first_batch = x_mem[: config.batch_size]
        t0 = time.perf_counter()
        fresh(first_batch).numpy()
        first = time.perf_counter() - t0
        warm_calls = []
        for _ in range(3):
            t0 = time.perf_counter()
            fresh(first_batch).numpy()
            warm_calls.append(time.perf_counter() - t0)
        trace_s = max(0.0, first - statistics.median(warm_calls))

        variants = {
            "engine_files_view0": lambda: engine_from_files(views0),
            "engine_files_augmented": lambda: engine_from_files(views_aug),
            "raw_tensor": lambda: raw(x_mem),
        }
        times: dict[str, list[dict]] = {name: [] for name in variants}
        names = list(variants)
        for repeat in range(args.repeats):
            for name in names if repeat % 2 == 0 else names[::-1]:
                times[name].append(variants[name]())
                log(
                    f"repeat {repeat + 1}/{args.repeats} {name}: {times[name][-1]['total']:.2f} s "
                    f"({n / times[name][-1]['total']:.1f} images/s)"
                )

    def median(name: str, part: str = "total") -> float:
        return statistics.median(t[part] for t in times[name])

    raw_ips = n / median("raw_tensor")
    view0_ips = n / median("engine_files_view0")
    aug_ips = n / median("engine_files_augmented")
    decode_ips = n / statistics.median([t["decode"] for name in names if name != "raw_tensor" for t in times[name]])
    extract0_ips = n / median("engine_files_view0", "extract")
    extract_aug_ips = n / median("engine_files_augmented", "extract")
    result = {
        "benchmark": "feature-extraction throughput: engine pipeline from files vs raw extractor on in-memory tensors",
        "machine": machine,
        "device": environment["device"],
        "load_average_at_end": load_average(),
        "data": note,
        "backbone": spec.name,
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "weights": "ImageNet" if weights else "random",
        "n_images": n,
        "repeats": args.repeats,
        "decode_threads": os.cpu_count(),
        "raw_tensor_images_per_s": raw_ips,
        "engine_files_view0_images_per_s": view0_ips,
        "engine_files_augmented_images_per_s": aug_ips,
        "fraction_view0": view0_ips / raw_ips,
        "fraction_augmented": aug_ips / raw_ips,
        "goal_fraction": GOAL,
        "goal_met_view0": view0_ips / raw_ips >= GOAL,
        "goal_met_augmented": aug_ips / raw_ips >= GOAL,
        "stages": {
            "decode_resize_images_per_s": decode_ips,
            "extract_from_memory_view0_images_per_s": extract0_ips,
            "extract_from_memory_augmented_images_per_s": extract_aug_ips,
            "fraction_extract_only_view0": extract0_ips / raw_ips,
            "fraction_extract_only_augmented": extract_aug_ips / raw_ips,
            "tf_function_trace_seconds_per_extract_call": trace_s,
        },
        "seconds": {name: [round(t["total"], 3) for t in times[name]] for name in names},
        "notes": [
            (
                "end to end = load_images (decode + resize, thread pool of os.cpu_count() threads) + extract_features "
                "(cache=None); files come from the page cache (warmed), not a cold disk"
            ),
            (
                f"augmented: views 1..{AUGMENTED_VIEWS} cycling over the images (flips, turns, rotation, scale, "
                "colour jitter)"
            ),
            (
                "raw: the same tf.function(extractor(batch, training=False)) definition on slices of one preprocessed "
                "float32 tensor, outputs copied to numpy as the engine does"
            ),
            "medians of interleaved repeats after warm-up",
        ],
    }
    if print_report_start(result, machine, as_json=args.json):
        return
    print(
        f"data: {note}; {n} images, {spec.name} at {config.image_size} px, batch {config.batch_size}, "
        f"{result['weights']} weights, median of {args.repeats}"
    )
    rows_out = [
        ("raw extractor on in-memory tensor (b)", raw_ips, 1.0),
        ("engine from files, view 0 (a)", view0_ips, view0_ips / raw_ips),
        (f"engine from files, views 1..{AUGMENTED_VIEWS} (a')", aug_ips, aug_ips / raw_ips),
        ("  stage: decode + resize only", decode_ips, None),
        ("  stage: extract_features from memory, view 0", extract0_ips, extract0_ips / raw_ips),
        (
            f"  stage: extract_features from memory, views 1..{AUGMENTED_VIEWS}",
            extract_aug_ips,
            extract_aug_ips / raw_ips,
        ),
    ]
    print(f"{'path':<58}{'images/s':>10}{'of raw':>9}")
    for label, ips, fraction in rows_out:
        print(f"{label:<58}{ips:>10.1f}{'' if fraction is None else f'{fraction:>8.1%}':>9}")
    print(f"tf.function tracing of a fresh extractor (once per extractor): {trace_s:.2f} s")
    print(
        f"goal (a)/(b) >= {GOAL:.0%}: view 0 {'met' if result['goal_met_view0'] else 'NOT met'}, "
        f"augmented {'met' if result['goal_met_augmented'] else 'NOT met'}"
    )
    for note_line in result["notes"]:
        print(f"- {note_line}")


if __name__ == "__main__":
    main()
