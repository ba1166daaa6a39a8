"""Keras backends side by side: ResNet50 feature extraction and single-image latency on TensorFlow, JAX and PyTorch.

A process holds one Keras backend, so this script runs itself once per backend in a subprocess
(``KERAS_BACKEND=tensorflow``, ``jax``, and ``torch`` when PyTorch is installed; ``--worker`` is that
mode) and prints one table. Each worker, through the engine's own functions only:

- feature extraction: ``features.extract_features`` (no cache) over ``--images`` uint8 images held in
  memory, batch 32, through ``build_feature_extractor``'s frozen ResNet50 + global pooling, once with
  view 0 for every image and once with the augmented views 1..7 of an 8-view recipe (flips, turns,
  rotation, scale, colour jitter). Warmed up first (JAX and PyTorch compile per shape), then the two
  variants interleaved, their order alternating, and the median of ``--repeats`` taken;
- single-image latency: ``predict.measure_latency`` (its mean of 10 warm calls) on the model a run
  assembles (backbone + pooling + dense head, ``head.assemble_model``), median of ``--repeats`` calls;
- the matrix-multiply rate: float32 ``keras.ops.matmul`` of two 2048-square matrices (2 n^3 FLOPs),
  best of 5 after a warm-up, before and after the models. With the ResNet50's FLOPs per image (counted
  from layer shapes, as bench_inference does) it gives each backend's floor, so throughput can be read
  against what that backend's own matmul reaches on this machine.

Ratios are each figure over the TensorFlow row's (images/s: higher is better; ms: lower is better).

    python benchmarks/bench_backends.py [--images 128] [--image-size 224] [--repeats 3] [--rounds 1]
                                        [--backends tensorflow,jax,torch] [--json]

``--rounds 2`` runs each backend's subprocess twice, the order alternating (TF, JAX, then JAX, TF), and
takes the medians over both: on a machine whose load drifts, that shares the drift between the backends.

Uses ../shared/weights/resnet50_imagenet_notop.weights.h5 when present (else random weights, and says
so). The images are random uint8 arrays made on the spot (the timing does not depend on pixel values).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
RESNET_WEIGHTS = SHARED / "weights" / "resnet50_imagenet_notop.weights.h5"
BACKENDS = ("tensorflow", "jax", "torch")  # Keras backend names; each is also the library's import name
AUGMENTED_VIEWS = 7  # views 1..7: the augmented views of an 8-view recipe
CLASS_NAMES = 4  # the ALL dataset's four classes (only their number matters here)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- worker: one backend in this process -------------------------------------------------------------------


def matmul_rate(n: int, repeats: int) -> float:
    """Best GFLOP/s of float32 ``keras.ops.matmul`` on two n-square matrices, synchronised by reading one
    element back to NumPy (2 n^3 FLOPs per product)."""
    import keras

    rng = np.random.default_rng(0)
    a = keras.ops.convert_to_tensor(rng.standard_normal((n, n), dtype=np.float32))
    b = keras.ops.convert_to_tensor(rng.standard_normal((n, n), dtype=np.float32))
    keras.ops.convert_to_numpy(keras.ops.matmul(a, b)[0, 0])  # warm-up (and JAX's per-shape compile)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        keras.ops.convert_to_numpy(keras.ops.matmul(a, b)[0, 0])
        times.append(time.perf_counter() - started)
    return 2 * n**3 / min(times) / 1e9


def worker(args) -> dict:
    """Measure the requested backend in this process; returns the row as a dict."""
    import keras
    from bench_inference import layer_macs

    from bcd_engine.inference.predict import measure_latency
    from bcd_engine.models.backbones import get_backbone
    from bcd_engine.models.config import AugmentConfig, TrainConfig
    from bcd_engine.models.device import configure_device, precision_policy
    from bcd_engine.models.features import build_feature_extractor, extract_features
    from bcd_engine.models.head import assemble_model, build_head

    backend = keras.backend.backend()
    if backend != args.worker:
        raise RuntimeError(f"asked for Keras backend {args.worker!r} but Keras runs {backend!r}")
    library = importlib.import_module(backend)
    environment = configure_device()
    policy = precision_policy(environment)
    keras.mixed_precision.set_global_policy(policy)  # float32 on a CPU, as a run trains
    row = {
        "backend": backend,
        "library_version": library.__version__,
        "keras": keras.__version__,
        "device": environment.get("device"),
        "policy": policy,
    }
    log(
        f"[{backend}] {library.__name__} {library.__version__}, Keras {keras.__version__}, {row['device']}, "
        f"policy {policy}"
    )

    rate_before = matmul_rate(args.matmul_size, 5)
    log(f"[{backend}] matmul float32 {args.matmul_size}^2: {rate_before:.1f} GFLOP/s")

    spec = get_backbone("resnet50")
    weights = str(RESNET_WEIGHTS) if RESNET_WEIGHTS.is_file() and not args.random_weights else None
    config = TrainConfig(
        backbone=spec.name,
        weights=weights,
        image_size=args.image_size,
        batch_size=args.batch_size,
        augment=AugmentConfig(factor=AUGMENTED_VIEWS + 1),
    )
    preprocess = spec.preprocess()
    keras.utils.set_random_seed(0)
    started = time.perf_counter()
    extractor, backbone = build_feature_extractor(spec, config)
    row["build_s"] = time.perf_counter() - started

    n = args.images
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, config.image_size, config.image_size, 3), dtype=np.uint8)
    indices = np.arange(n)
    keys = [f"{i:032x}" for i in range(n)]  # stand-ins for the images' md5 digests (they seed the views)
    views0 = np.zeros(n, dtype=np.int64)
    views_aug = 1 + np.arange(n) % AUGMENTED_VIEWS
    common = dict(
        preprocess=preprocess, augment=config.augment, seed=config.seed, cache=None, batch_size=config.batch_size
    )

    def extract(views, count=n):
        t0 = time.perf_counter()
        out = extract_features(extractor, images, indices[:count], keys[:count], views[:count], **common)
        elapsed = time.perf_counter() - t0
        assert out.shape[0] == count and np.isfinite(out).all(), "features missing or not finite"
        return elapsed

    # Warm-up: two batches of each variant (a full batch shape; with n a multiple of the batch, the only one).
    warm = min(n, 2 * config.batch_size)
    row["first_extract_call_s"] = extract(views0, warm)
    extract(views_aug, warm)
    if n % config.batch_size:  # the last, smaller batch has its own shape: compile it outside the timing too
        extract(views0)
        extract(views_aug)
    times = {"view0": [], "augmented": []}
    for repeat in range(args.repeats):
        for name in ("view0", "augmented") if repeat % 2 == 0 else ("augmented", "view0"):
            times[name].append(extract(views0 if name == "view0" else views_aug))
            log(
                f"[{backend}] repeat {repeat + 1}/{args.repeats} {name}: {times[name][-1]:.2f} s "
                f"({n / times[name][-1]:.1f} images/s)"
            )
    row["n_images"] = n
    row["extract_view0_images_per_s"] = n / statistics.median(times["view0"])
    row["extract_augmented_images_per_s"] = n / statistics.median(times["augmented"])
    row["extract_seconds"] = {k: [round(t, 3) for t in v] for k, v in times.items()}

    head = build_head(backbone.output_shape[-1], CLASS_NAMES, config)
    model = assemble_model(backbone, head, config)
    row["flops_per_image"] = 2 * sum(layer_macs(model).values())
    latencies = [measure_latency(model, images[0], preprocess=preprocess) for _ in range(args.repeats)]
    row["latency_ms"] = statistics.median(latencies)
    row["latency_ms_each"] = [round(v, 2) for v in latencies]
    log(f"[{backend}] single-image latency: {row['latency_ms']:.1f} ms (median of {latencies})")

    rate_after = matmul_rate(args.matmul_size, 5)
    row["matmul_gflops_before"], row["matmul_gflops_after"] = rate_before, rate_after
    row["matmul_gflops"] = max(rate_before, rate_after)
    floor_ips = row["matmul_gflops"] * 1e9 / row["flops_per_image"]
    row["floor_images_per_s"] = floor_ips
    row["view0_x_floor"] = floor_ips / row["extract_view0_images_per_s"]  # measured time / floor time
    row["weights"] = "ImageNet (../shared)" if weights else "random"
    return row


# -- parent: one subprocess per backend, one table --------------------------------------------------------


def run_backend(backend: str, args) -> dict:
    """Run this script's worker mode under ``KERAS_BACKEND=backend``; its row, or the reason it failed."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        backend,
        "--images",
        str(args.images),
        "--image-size",
        str(args.image_size),
        "--repeats",
        str(args.repeats),
        "--batch-size",
        str(args.batch_size),
        "--matmul-size",
        str(args.matmul_size),
    ]
    if args.random_weights:
        command.append("--random-weights")
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)  # stderr passes through
    wall = time.perf_counter() - started
    try:
        row = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        row = {"backend": backend, "error": f"worker exited with status {done.returncode} and no result"}
    row["worker_wall_s"] = wall
    return row


def merge_rounds(runs: list[dict]) -> dict:
    """One row from a backend's rounds: medians over all their timed passes and latency calls, the best matmul
    rate; the first failed round's error when one failed."""
    failed = next((r for r in runs if "error" in r), None)
    if failed or len(runs) == 1:
        return failed or runs[0]
    row = {**runs[-1], "rounds": len(runs)}
    seconds = {k: [t for r in runs for t in r["extract_seconds"][k]] for k in runs[0]["extract_seconds"]}
    row["extract_seconds"] = seconds
    row["extract_view0_images_per_s"] = row["n_images"] / statistics.median(seconds["view0"])
    row["extract_augmented_images_per_s"] = row["n_images"] / statistics.median(seconds["augmented"])
    row["latency_ms_each"] = [v for r in runs for v in r["latency_ms_each"]]
    row["latency_ms"] = statistics.median(row["latency_ms_each"])
    row["matmul_gflops"] = max(r["matmul_gflops"] for r in runs)
    row["floor_images_per_s"] = row["matmul_gflops"] * 1e9 / row["flops_per_image"]
    row["view0_x_floor"] = row["floor_images_per_s"] / row["extract_view0_images_per_s"]
    row["worker_wall_s"] = sum(r["worker_wall_s"] for r in runs)
    return row


def installed(backend: str) -> bool:
    return importlib.util.find_spec(backend) is not None


def machine() -> dict:
    from _machine import cpu_flags, load_average
    from bench_training_speed import cpu_model

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": load_average(),
    }


def _ratio_cell(row: dict, key: str) -> str:
    ratio = row.get("ratio_to_tensorflow", {})
    return f"{ratio[key]:>7.2f}" if key in ratio else f"{'-':>7}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated Keras backends (default: all three; one not installed is skipped)",
    )
    parser.add_argument("--images", type=int, default=128, help="images per feature-extraction pass")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32, help="as TrainConfig's default")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant, and latency calls")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="subprocesses per backend, the order alternating; figures are medians over all rounds",
    )
    parser.add_argument("--matmul-size", type=int, default=2048, help="square float32 matmul for the rate")
    parser.add_argument("--random-weights", action="store_true", help="random weights even when ../shared has them")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)  # internal: one backend, JSON row out
    args = parser.parse_args()

    if args.worker:
        try:
            row = worker(args)
        except Exception as exc:  # noqa: BLE001 - the parent shows why this backend has no figures
            import traceback

            traceback.print_exc()
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            row = {"backend": args.worker, "error": f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"}
        print(json.dumps(row), flush=True)
        return

    from _machine import load_average

    info = machine()
    log(f"machine: {info['cpu']}, {info['usable_cores']} usable cores")
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    for backend in names:
        if backend not in BACKENDS:
            parser.error(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    runnable = [b for b in names if installed(b)]
    rounds: dict[str, list[dict]] = {b: [] for b in runnable}
    for i in range(args.rounds):  # with several rounds the order alternates, so drifting load hits all alike
        for backend in runnable if i % 2 == 0 else runnable[::-1]:
            log(f"{backend} (round {i + 1}/{args.rounds}) ...")
            rounds[backend].append(run_backend(backend, args))
    rows = []
    for backend in names:
        if backend not in rounds:
            log(f"{backend}: not installed, skipped")
            rows.append({"backend": backend, "skipped": f"{backend} is not installed here"})
        else:
            rows.append(merge_rounds(rounds[backend]))
    measured = [r for r in rows if "error" not in r and "skipped" not in r]
    reference = next((r for r in measured if r["backend"] == "tensorflow"), None)
    for row in rows:
        if reference and "extract_view0_images_per_s" in row:
            row["ratio_to_tensorflow"] = {
                key: row[key] / reference[key]
                for key in (
                    "extract_view0_images_per_s",
                    "extract_augmented_images_per_s",
                    "latency_ms",
                    "matmul_gflops",
                )
            }
    weights = (
        "ImageNet (../shared/weights)"
        if RESNET_WEIGHTS.is_file() and not args.random_weights
        else "random (../shared/weights missing or --random-weights; the timing does not depend on them)"
    )
    document = {
        "benchmark": "Keras backends side by side: ResNet50 feature extraction, single-image latency, matmul rate",
        "machine": info,
        "load_average_at_end": load_average(),
        "backbone": "resnet50",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "n_images": args.images,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "weights": weights,
        "data": "random uint8 images made on the spot (decoding and resizing are not timed)",
        "notes": [
            (
                "feature extraction: bcd_engine.models.features.extract_features(cache=None) on in-memory uint8 "
                f"images, batch {args.batch_size}; view 0 = the images themselves, "
                f"augmented = views 1..{AUGMENTED_VIEWS} cycling over the images; median of interleaved passes after "
                "warm-up"
            ),
            (
                "latency: bcd_engine.inference.predict.measure_latency (mean of 10 warm single-image calls) on "
                "backbone + pooling + head (head.assemble_model); median of --repeats calls"
            ),
            (
                f"matmul: float32 keras.ops.matmul {args.matmul_size}-square, best of 5, before and after the models; "
                "floor time per image = ResNet50 FLOPs per image (2 x conv and dense MACs from layer shapes) / "
                "that rate; view0_x_floor = measured view-0 time per image / floor time (1.0 = at the floor)"
            ),
            "ratio_to_tensorflow: each figure / the TensorFlow row's (images/s and GFLOP/s: higher is better; ms: "
            "lower is better)",
            "each backend runs in its own subprocess, one after the other, on the same cores",
        ],
        "results": rows,
    }
    if args.json:
        print(json.dumps(document, indent=2))
        return
    print(
        f"machine: {info['cpu']}, {info['usable_cores']} usable cores; load average "
        f"{info['load_average_at_start']} at start, {document['load_average_at_end']} at end"
    )
    print(
        f"ResNet50 at {args.image_size} px, batch {args.batch_size}, {args.images} images, median of "
        f"{args.repeats * args.rounds} passes ({args.rounds} round(s)); weights: {weights}; data: {document['data']}"
    )
    header = (
        f"{'backend':<11}{'version':>10}{'view 0 img/s':>14}{'x TF':>7}{'augmented img/s':>17}{'x TF':>7}"
        f"{'1 image ms':>12}{'x TF':>7}{'matmul GFLOP/s':>16}{'x TF':>7}{'view 0 x floor':>16}"
    )
    print(header)
    for r in rows:
        if "skipped" in r or "error" in r:
            print(f"{r['backend']:<11}  {r.get('skipped') or 'failed: ' + r['error']}")
            continue
        print(
            f"{r['backend']:<11}{r['library_version']:>10}"
            f"{r['extract_view0_images_per_s']:>14.1f}{_ratio_cell(r, 'extract_view0_images_per_s')}"
            f"{r['extract_augmented_images_per_s']:>17.1f}{_ratio_cell(r, 'extract_augmented_images_per_s')}"
            f"{r['latency_ms']:>12.1f}{_ratio_cell(r, 'latency_ms')}"
            f"{r['matmul_gflops']:>16.1f}{_ratio_cell(r, 'matmul_gflops')}"
            f"{r['view0_x_floor']:>16.2f}"
        )
    print("x TF = figure / TensorFlow's; view 0 x floor = view-0 time per image / floor time (1.00 = at the floor).")
    for note in document["notes"]:
        print(f"- {note}")


if __name__ == "__main__":
    main()
