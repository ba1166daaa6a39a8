"""Inference against the hardware: warm latency and batch throughput of predict per backbone, next to its floor.

For each backbone the model is built the way a run's model is (backbone + global pooling + dense head,
``training.assemble_model``), with random weights (``weights=None``: the timing does not depend on the
weight values) and 4 classes. Per backbone it measures

- FLOPs per image: the multiply-accumulates of every Conv2D, DepthwiseConv2D, SeparableConv2D and Dense
  layer counted from the layer shapes (1 MAC = 2 FLOPs). That count is the floor's basis. TensorFlow's
  profiler total on the frozen graph of one image (``tf.compat.v1.profiler``, also counting BatchNorm
  and other element-wise ops) is printed beside it as a cross-check;
- warm single-image latency (median) and batch throughput (images/s at batch 32) through the engine's
  predict path (``Diagnoser.diagnose_arrays`` without test-time augmentation: preprocessing and model
  in one compiled call) and through one plain ``tf.function`` model call on an already preprocessed tensor;

and, in the same process, the machine's matrix-multiply rate (square float32 ``tf.matmul``, float16 on a
GPU with mixed precision; best of several, before and after the models). The floor is FLOPs per image
divided by the best rate; each figure is reported as measured time over floor time (1.0 = at the floor).

    python benchmarks/bench_inference.py [--backbones resnet50,mobilenetv2,...] [--image-size 0] [--json]

``--image-size 0`` (the default) uses each backbone's native size.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _machine import load_average, machine_info, print_report_start

from bcd_engine.inference.diagnosis import Diagnoser
from bcd_engine.inference.loading import LoadedModel
from bcd_engine.models.backbones import build_backbone, get_backbone
from bcd_engine.models.config import TrainConfig
from bcd_engine.models.device import configure_device, precision_policy
from bcd_engine.models.head import assemble_model, build_head

DEFAULT_BACKBONES = "scratch_cnn,mobilenetv2,efficientnetb0,resnet50,densenet121,inceptionv3,vgg16"
CLASS_NAMES = ["Benign", "Early", "Pre", "Pro"]  # the ALL dataset's classes (only their number matters here)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- FLOPs ------------------------------------------------------------------------------------------------


def layer_macs(model) -> dict[str, int]:
    """Multiply-accumulates per image of the conv and dense layers of ``model`` (nested models included)."""
    import keras

    totals = {"conv": 0, "depthwise": 0, "dense": 0}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            for key, value in layer_macs(layer).items():
                totals[key] += value
            continue
        try:
            out = tuple(layer.output.shape)
        except (AttributeError, ValueError):  # a layer called more than once has no single output
            continue
        positions = int(np.prod(out[1:-1])) if len(out) > 2 else 1
        if isinstance(layer, keras.layers.SeparableConv2D):
            kh, kw, cin, mult = layer.depthwise_kernel.shape
            cout = layer.pointwise_kernel.shape[-1]
            totals["depthwise"] += positions * kh * kw * cin * mult
            totals["conv"] += positions * cin * mult * cout
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw, cin, mult = layer.kernel.shape
            totals["depthwise"] += positions * kh * kw * cin * mult
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin_per_group, cout = layer.kernel.shape
            totals["conv"] += positions * kh * kw * cin_per_group * cout
        elif isinstance(layer, keras.layers.Dense):
            n_in, n_out = layer.kernel.shape
            totals["dense"] += positions * n_in * n_out
    return {key: int(value) for key, value in totals.items()}


def profiler_flops(model, image_size: int) -> int | None:
    """TensorFlow profiler's float-op total for one image on the model's frozen inference graph."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, image_size, image_size, 3], tf.float32)
    )
    graph_def = convert_variables_to_constants_v2(concrete).graph.as_graph_def()
    graph = tf.Graph()
    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")  # the v1 profiler warns about deprecated v1 APIs it uses itself
    try:
        with graph.as_default():
            tf.graph_util.import_graph_def(graph_def, name="")
            builder = tf.compat.v1.profiler.ProfileOptionBuilder
            options = builder(builder.float_operation()).with_empty_output().build()
            return int(tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops)
    finally:
        logger.setLevel(level)


# -- the machine's matmul rate ----------------------------------------------------------------------------


def matmul_rate(dtype: str, sizes: list[int], repeats: int) -> dict:
    """Best and median FLOP rate of square ``tf.matmul`` at each size (2 n^3 FLOPs per product)."""
    import tensorflow as tf

    per_size = []
    for n in sizes:
        a = tf.random.stateless_normal((n, n), seed=(1, 2), dtype=dtype)
        b = tf.random.stateless_normal((n, n), seed=(3, 4), dtype=dtype)
        float(tf.matmul(a, b)[0, 0])  # warm-up (also forces completion on a GPU)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            float(tf.matmul(a, b)[0, 0])
            times.append(time.perf_counter() - started)
        flops = 2 * n**3
        per_size.append(
            {"n": n, "best_gflops": flops / min(times) / 1e9, "median_gflops": flops / statistics.median(times) / 1e9}
        )
        del a, b
    return {"dtype": dtype, "sizes": per_size, "best_gflops": max(s["best_gflops"] for s in per_size)}


# -- timing -----------------------------------------------------------------------------------------------


def interleaved(paths: dict, *, repeats: int, budget_s: float) -> dict[str, list[float]]:
    """Time each callable in ``paths`` (warm-up first), alternating which goes first, within ``budget_s``.

    Every path runs the same number of times: ``repeats``, fewer when a round of all paths would not
    fit into ``budget_s`` (at least 3).
    """
    for fn in paths.values():  # warm-up: tracing, oneDNN primitive caches, Keras' predict function
        fn()
    started = time.perf_counter()
    for fn in paths.values():  # a second, warm round sizes the number of repeats
        fn()
    round_s = time.perf_counter() - started
    n = max(3, min(repeats, int(budget_s / max(round_s, 1e-9))))
    names = list(paths)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            paths[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def bench_backbone(name: str, image_size: int, args, rng: np.random.Generator) -> dict:
    import keras
    import tensorflow as tf

    spec = get_backbone(name)
    config = TrainConfig.for_backbone(spec.name, image_size=image_size or None)
    size = config.image_size
    keras.utils.set_random_seed(0)
    backbone = build_backbone(spec, image_size=size, weights=None)
    model = assemble_model(backbone, build_head(backbone.output_shape[-1], len(CLASS_NAMES), config), config)

    macs = layer_macs(model)
    flops = 2 * sum(macs.values())
    try:
        prof = profiler_flops(model, size) if args.profiler else None
        prof_error = None
    except Exception as exc:  # noqa: BLE001 - the cross-check is best effort
        prof, prof_error = None, f"{type(exc).__name__}: {exc}"

    # Random smear-sized uint8 images: the timing does not depend on the pixel values.
    batch_images = rng.integers(0, 256, size=(args.batch, size, size, 3), dtype=np.uint8)
    single_image = batch_images[:1]
    diagnoser = Diagnoser([LoadedModel(0, model, config, CLASS_NAMES)])
    preprocess = spec.preprocess()
    infer = tf.function(lambda t: model(t, training=False))
    x1 = preprocess(tf.cast(single_image, tf.float32))
    xb = preprocess(tf.cast(batch_images, tf.float32))

    def engine(images):
        return lambda: diagnoser.diagnose_arrays([images], tta=False)

    def plain(x):
        return lambda: np.asarray(infer(x))

    single = interleaved(
        {"engine": engine(single_image), "plain": plain(x1)}, repeats=args.repeats, budget_s=args.budget_s
    )
    batch = interleaved(
        {"engine": engine(batch_images), "plain": plain(xb)}, repeats=args.batch_repeats, budget_s=args.budget_s
    )
    result = {
        "backbone": spec.name,
        "image_size": size,
        "parameters": int(model.count_params()),
        "macs_per_image": macs,
        "flops_per_image": flops,
        "profiler_flops_per_image": prof,
        "single_repeats": len(single["engine"]),
        "batch_repeats": len(batch["engine"]),
    }
    if prof_error:
        result["profiler_error"] = prof_error
    for path in ("engine", "plain"):
        result[f"single_{path}_ms"] = statistics.median(single[path]) * 1000
        result[f"single_{path}_ms_min"] = min(single[path]) * 1000
        result[f"batch_{path}_images_per_s"] = args.batch / statistics.median(batch[path])
    keras.backend.clear_session()
    gc.collect()
    return result


def add_floor(result: dict, rate_gflops: float) -> None:
    """Floor time per image at the matmul rate, and each measured figure over it."""
    floor_ms = result["flops_per_image"] / (rate_gflops * 1e9) * 1000
    result["floor_ms_per_image"] = floor_ms
    result["floor_images_per_s"] = 1000 / floor_ms
    for path in ("engine", "plain"):
        result[f"single_{path}_ratio"] = result[f"single_{path}_ms"] / floor_ms
        result[f"batch_{path}_ratio"] = (1000 / result[f"batch_{path}_images_per_s"]) / floor_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=DEFAULT_BACKBONES, help=f"comma-separated (default {DEFAULT_BACKBONES})")
    parser.add_argument("--image-size", type=int, default=0, help="pixels; 0: each backbone's native size")
    parser.add_argument("--batch", type=int, default=32, help="batch size for the throughput figures")
    parser.add_argument("--repeats", type=int, default=30, help="single-image calls timed per path (at most)")
    parser.add_argument("--batch-repeats", type=int, default=5, help="batch calls timed per path (at most)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=20.0,
        help="seconds per backbone and mode: fewer repeats (at least 3) when they would not fit",
    )
    parser.add_argument("--matmul-sizes", default="2048,4096", help="square matmul sizes for the FLOP rate")
    parser.add_argument("--matmul-repeats", type=int, default=5)
    parser.add_argument(
        "--no-profiler", dest="profiler", action="store_false", help="skip the tf.profiler FLOP cross-check"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args()
    names = [get_backbone(n.strip()).name for n in args.backbones.split(",") if n.strip()]
    sizes = [int(s) for s in args.matmul_sizes.split(",") if s.strip()]

    import keras

    environment = configure_device()  # as a run does: float32 on a CPU, mixed float16 on a GPU
    keras.mixed_precision.set_global_policy(precision_policy(environment))  # this process trains, as a run does
    machine = machine_info()
    log(f"machine: {machine['summary']}")
    dtype = keras.mixed_precision.global_policy().compute_dtype
    log(f"matmul rate ({dtype}, sizes {sizes}) ...")
    rate_before = matmul_rate(dtype, sizes, args.matmul_repeats)
    log(f"  {rate_before['best_gflops']:.1f} GFLOP/s")
    rng = np.random.default_rng(0)
    results = []
    for name in names:
        started = time.perf_counter()
        log(f"{name} ...")
        results.append(bench_backbone(name, args.image_size, args, rng))
        log(
            f"  done in {time.perf_counter() - started:.1f} s: single {results[-1]['single_engine_ms']:.1f} ms "
            f"(engine) / {results[-1]['single_plain_ms']:.1f} ms (plain), batch "
            f"{results[-1]['batch_engine_images_per_s']:.1f} / {results[-1]['batch_plain_images_per_s']:.1f} images/s"
        )
    log("matmul rate again ...")
    rate_after = matmul_rate(dtype, sizes, args.matmul_repeats)
    rate = max(rate_before["best_gflops"], rate_after["best_gflops"])
    for result in results:
        add_floor(result, rate)

    document = {
        "benchmark": "inference against the hardware floor (FLOPs per image / measured matmul FLOP rate)",
        "machine": machine,
        "device": environment["device"],
        "compute_dtype": dtype,
        "load_average_at_end": load_average(),
        "matmul_rate_gflops": rate,
        "matmul_before": rate_before,
        "matmul_after": rate_after,
        "batch_size": args.batch,
        "notes": [
            "weights=None (random initialisation): the timing does not depend on the weight values",
            "inputs are random uint8 images at the model's size (decoding and resizing are not timed)",
            (
                "engine path: Diagnoser.diagnose_arrays(tta=False): colour mode, then preprocessing and model in one "
                "compiled call, the OOD gate"
            ),
            "plain path: one tf.function(model(x, training=False)) call on an already preprocessed tensor",
            (
                "flops_per_image: 2 x multiply-accumulates of Conv2D, DepthwiseConv2D, SeparableConv2D and Dense "
                "layers from their shapes; profiler_flops_per_image: tf.compat.v1.profiler float ops of the frozen "
                "one-image graph (also counts BatchNorm and element-wise ops)"
            ),
            (
                "floor = flops_per_image / best matmul rate of this run; ratio = measured time / floor time "
                "(1.0 = at the floor); depthwise convolutions cannot run at matmul speed, so their floor is optimistic"
            ),
            "latencies are medians of interleaved repeats after warm-up",
        ],
        "results": results,
    }
    if print_report_start(document, machine, as_json=args.json):
        return
    print(
        f"matmul rate ({dtype}): {rate_before['best_gflops']:.1f} GFLOP/s before, "
        f"{rate_after['best_gflops']:.1f} after; floor uses {rate:.1f}"
    )
    header = (
        f"{'backbone':<15}{'px':>5}{'GFLOP':>8}{'prof':>8}{'floor ms':>10}"
        f"{'1 img engine ms':>17}{'x':>7}{'plain ms':>10}{'x':>7}"
        f"{'b' + str(args.batch) + ' engine img/s':>20}{'x':>7}{'plain img/s':>13}{'x':>7}{'floor img/s':>13}"
    )
    print(header)
    for r in results:
        prof = f"{r['profiler_flops_per_image'] / 1e9:.2f}" if r["profiler_flops_per_image"] else "-"
        print(
            f"{r['backbone']:<15}{r['image_size']:>5}{r['flops_per_image'] / 1e9:>8.2f}{prof:>8}"
            f"{r['floor_ms_per_image']:>10.2f}"
            f"{r['single_engine_ms']:>17.1f}{r['single_engine_ratio']:>7.1f}"
            f"{r['single_plain_ms']:>10.1f}{r['single_plain_ratio']:>7.1f}"
            f"{r['batch_engine_images_per_s']:>20.1f}{r['batch_engine_ratio']:>7.1f}"
            f"{r['batch_plain_images_per_s']:>13.1f}{r['batch_plain_ratio']:>7.1f}{r['floor_images_per_s']:>13.1f}"
        )
    print("x = measured time / floor time (1.0 = at the floor).")
    for note in document["notes"]:
        print(f"- {note}")


if __name__ == "__main__":
    main()
