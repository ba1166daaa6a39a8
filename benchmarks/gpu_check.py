"""GPU check: ResNet50 feature extraction and fine-tuning step time in mixed precision, against the matmul rate.

Made for a borrowed GPU machine with no TensorFlow and no internet (``benchmarks/gpu_check.sh`` installs
the carried Keras wheels and runs this under ``KERAS_BACKEND=jax`` by default; ``torch`` works too).
Everything goes through the engine's own functions, in the dtype policy the engine trains with on
that device (``device.precision_policy(device.configure_device())``, or ``--policy``), on random uint8
images made on the spot and random weights (nothing is read from ../shared; the timing does not depend
on pixel or weight values):

(a) feature extraction: ``features.extract_features`` (no cache) through ``build_feature_extractor``'s
    frozen ResNet50 + pooling at batch 128 and 32, view 0 and augmented views 1..7; beside it, the
    extractor alone on a preprocessed batch already on the device ("raw": one compiled call per batch),
    which separates the model's own speed from the pipeline around it;
(b) phase-2 fine-tuning: backbone + head (``head.assemble_model``), the top ``fine_tune_layers`` of
    ResNet50 unfrozen (``head.unfreeze_top_layers``, BatchNorm stays frozen), ``head.compile_model`` at
    the fine-tuning learning rate, then ``model.train_on_batch`` at batch 32 and 64 after warm-up, with
    the batch already on the device and as a NumPy batch from the host (what a run's input pipeline hands);
(c) the matrix-multiply rate in the same run: ``keras.ops.matmul`` of two 8192-square matrices in
    bfloat16 and float32 (and the policy's compute dtype), 2 n^3 FLOPs per product, timed over a burst
    of products closed by reading one element back to the host (a device sync);
(d) each figure over its floor: FLOPs counted from layer shapes (2 x the multiply-accumulates of the
    Conv2D and Dense layers, as bench_inference.py counts them: ResNet50 forward is 7.71 GFLOP per
    image at 224 px) divided by (c)'s rate in the policy's compute dtype. A training step is counted as
    3 x the forward FLOPs of the unfrozen part (forward, gradients of activations, gradients of
    weights) plus 1 x the forward FLOPs of the frozen layers below it; the optimizer update, BatchNorm
    and element-wise layers are not counted, so the floor is optimistic.

Prints a table last and writes the whole document to ``$OUT/gpu_check.json`` (``--out``) after every
section, so a run stopped at its time limit still leaves what it measured. ``--budget-s`` skips what
would start after that many seconds.

    KERAS_BACKEND=jax python benchmarks/gpu_check.py [--quick] [--policy auto] [--budget-s 200] [--out PATH]

``--quick`` (or ``BCD_GPU_CHECK_QUICK=1``): tiny sizes (64 px, batches of 4 and 8, 256-square matmul),
to test the script on a CPU in a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

# The engine's models package only: bcd_engine.inference and .training pull in the run store (SQLAlchemy).
from bcd_engine.models.backbones import build_backbone, get_backbone
from bcd_engine.models.config import AugmentConfig, TrainConfig
from bcd_engine.models.device import configure_device, precision_policy
from bcd_engine.models.features import build_feature_extractor, extract_features
from bcd_engine.models.head import assemble_model, build_head, compile_model, unfreeze_top_layers

RESNET50_GFLOP_224 = 7.71  # BENCHMARKS.md 2b (bench_inference.py's count from layer shapes); printed beside ours
AUGMENTED_VIEWS = 7  # views 1..7 of an 8-view recipe
N_CLASSES = 4  # the ALL dataset's four classes
FULL = {
    "image_size": 224,
    "extract_batches": [128, 32],
    "batches_per_pass": 8,
    "train_batches": [32, 64],
    "train_steps": 20,
    "matmul_size": 8192,
    "matmul_burst": 10,
    "repeats": 3,
}
QUICK = {
    "image_size": 64,
    "extract_batches": [8, 4],
    "batches_per_pass": 2,
    "train_batches": [4, 8],
    "train_steps": 3,
    "matmul_size": 256,
    "matmul_burst": 3,
    "repeats": 2,
}
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def sync(tensor) -> None:
    """Wait for ``tensor`` (and the device work queued before it) by reading one element back to the host."""
    import keras

    keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.reshape(tensor, (-1,))[:1], "float32"))  # NumPy has no bf16


# -- the machine ------------------------------------------------------------------------------------------


def nvidia_smi() -> str | None:
    """One line per GPU from nvidia-smi (name, memory, driver, clocks), or None without it. Reads only."""
    if not shutil.which("nvidia-smi"):
        return None
    query = "name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw"
    done = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return done.stdout.strip() or done.stderr.strip() or None


def backend_devices(backend: str) -> list[str]:
    """The accelerators the running Keras backend sees (empty on a CPU-only machine)."""
    with contextlib.suppress(Exception):  # best effort: a description, not a measurement
        if backend == "jax":
            import jax

            return [f"{d.platform}:{d.device_kind}" for d in jax.devices() if d.platform != "cpu"]
        if backend == "torch":
            import torch

            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if backend == "tensorflow":
            import tensorflow as tf

            return [d.name for d in tf.config.list_physical_devices("GPU")]
    return []


def environment(policy_option: str) -> dict:
    """The engine's device description and dtype policy; where the engine's call fails, why, and a stand-in."""
    import keras

    backend = keras.backend.backend()
    library = importlib.import_module(backend)
    devices = backend_devices(backend)
    info = {
        "backend": backend,
        "library": library.__name__,
        "library_version": library.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "backend_devices": devices,
        "nvidia_smi": nvidia_smi(),
    }
    try:
        info["configure_device"] = configure_device()
    except Exception as exc:  # noqa: BLE001 - reported: on this machine the engine call itself is under test
        info["configure_device_error"] = f"{type(exc).__name__}: {exc}"
        info["configure_device"] = {"device": ", ".join(devices) or "CPU", "mixed_precision": bool(devices)}
        log(f"configure_device() FAILED ({info['configure_device_error']}); describing the device without it")
    try:
        engine_policy = precision_policy(info["configure_device"])
    except Exception as exc:  # noqa: BLE001 - as above
        info["precision_policy_error"] = f"{type(exc).__name__}: {exc}"
        engine_policy = "mixed_bfloat16" if devices else "float32"
        log(f"precision_policy() FAILED ({info['precision_policy_error']}); using {engine_policy}")
    info["engine_policy"] = engine_policy
    info["policy"] = engine_policy if policy_option == "auto" else policy_option
    return info


# -- (c) the matmul rate ----------------------------------------------------------------------------------


def matmul_rate(dtype: str, n: int, burst: int, repeats: int) -> dict:
    """TFLOP/s of ``keras.ops.matmul`` on random n-square ``dtype`` matrices: ``burst`` products queued, then one
    sync; best and median over ``repeats`` bursts after a warm-up burst."""
    import keras

    a = keras.random.normal((n, n), dtype=dtype, seed=1)
    b = keras.random.normal((n, n), dtype=dtype, seed=2)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        for _ in range(burst):
            c = keras.ops.matmul(a, b)
        sync(c)
        if i:  # the first burst is the warm-up (kernel selection, JAX's per-shape compile)
            times.append((time.perf_counter() - t0) / burst)
    flops = 2 * n**3
    return {
        "dtype": dtype,
        "n": n,
        "burst": burst,
        "best_tflops": flops / min(times) / 1e12,
        "median_tflops": flops / statistics.median(times) / 1e12,
    }


# -- (d) FLOPs from layer shapes --------------------------------------------------------------------------


def layer_macs(model) -> list[tuple[object, int]]:
    """(layer, multiply-accumulates per image) of every Conv2D and Dense layer of ``model``, nested models
    flattened in order (bench_inference.layer_macs' count, kept per layer: that script imports the run store)."""
    import keras

    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(layer_macs(layer))
            continue
        try:
            out = tuple(layer.output.shape)
        except (AttributeError, ValueError):
            continue
        positions = int(np.prod(out[1:-1])) if len(out) > 2 else 1
        if isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw, cin, cout = layer.kernel.shape
            found.append((layer, positions * kh * kw * cin * cout))
        elif isinstance(layer, keras.layers.Dense):
            n_in, n_out = layer.kernel.shape
            found.append((layer, positions * n_in * n_out))
    return found


def resnet50_flops(sizes: dict) -> dict:
    """FLOPs per image of the phase-2 model, built as :func:`bench_training` builds it (no device work timed)."""
    import keras

    spec = get_backbone("resnet50")
    config = TrainConfig(
        backbone=spec.name,
        weights=None,
        image_size=sizes["image_size"],
        fine_tune_layers=spec.fine_tune_layers,
        fine_tune_epochs=1,
    )
    backbone = build_backbone(spec, image_size=config.image_size, weights=None)
    model = assemble_model(backbone, build_head(backbone.output_shape[-1], N_CLASSES, config), config)
    unfreeze_top_layers(backbone, config.fine_tune_layers)
    flops = step_flops(model)
    del model, backbone
    keras.backend.clear_session()
    return flops


def step_flops(model) -> dict:
    """Forward FLOPs per image, and a training step's per image: 3 x forward from the lowest trainable layer
    up, 1 x forward below it."""
    macs = layer_macs(model)
    forward = 2 * sum(m for _, m in macs)
    first = next((i for i, (layer, _) in enumerate(macs) if layer.trainable), len(macs))
    unfrozen = 2 * sum(m for _, m in macs[first:])
    return {
        "forward_flops": forward,
        "unfrozen_forward_flops": unfrozen,
        "train_flops": forward + 2 * unfrozen,
        "trainable_weighted_layers": len(macs) - first,
        "weighted_layers": len(macs),
    }


# -- (a) feature extraction -------------------------------------------------------------------------------


def raw_forward(extractor):
    """The extractor alone as one compiled call per batch for the running backend: tensor in, tensor out."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        call = jax.jit(lambda values, x: extractor.stateless_call([], values, x, training=False)[0])
        values = [v.value for v in extractor.non_trainable_variables]
        assert not extractor.trainable_variables, "the extractor's backbone is frozen"
        return lambda x: call(values, x)
    if backend == "torch":
        import torch

        def forward(x):
            with torch.no_grad():
                return extractor(x, training=False)

        return forward
    import tensorflow as tf

    return tf.function(lambda x: extractor(x, training=False))


def bench_extraction(sizes: dict, policy: str, budget_s: float) -> list[dict]:
    """Section (a) at each of ``sizes['extract_batches']``, with one extractor (the batch size is no part of it)."""
    import keras

    spec = get_backbone("resnet50")
    rows, extractor = [], None
    for batch in sizes["extract_batches"]:
        if time.perf_counter() - STARTED > budget_s:
            rows.append({"batch": batch, "skipped": f"over the {budget_s:.0f} s budget"})
            continue
        config = TrainConfig(
            backbone=spec.name,
            weights=None,
            image_size=sizes["image_size"],
            batch_size=batch,
            augment=AugmentConfig(factor=AUGMENTED_VIEWS + 1),
        )
        if extractor is None:
            keras.utils.set_random_seed(0)
            t0 = time.perf_counter()
            extractor, _ = build_feature_extractor(spec, config)
            log(f"feature extractor built in {time.perf_counter() - t0:.1f} s (policy {policy})")
        rows.append(extraction_at(extractor, spec.preprocess(), config, sizes))
    return rows


def extraction_at(extractor, preprocess, config: TrainConfig, sizes: dict) -> dict:
    """Images/s of ``extract_features`` (view 0, augmented views) and of the raw extractor at ``config.batch_size``."""
    import keras

    batch = config.batch_size
    n = batch * sizes["batches_per_pass"]
    rng = np.random.default_rng(batch)
    images = rng.integers(0, 256, size=(n, config.image_size, config.image_size, 3), dtype=np.uint8)
    indices, keys = np.arange(n), [f"{i:032x}" for i in range(n)]  # keys: stand-ins for md5s (they seed the views)
    views = {"view0": np.zeros(n, dtype=np.int64), "augmented": 1 + np.arange(n) % AUGMENTED_VIEWS}
    common = dict(preprocess=preprocess, augment=config.augment, seed=config.seed, cache=None, batch_size=batch)
    x_device = keras.ops.convert_to_tensor(np.asarray(preprocess(images[:batch].astype(np.float32))))
    forward = raw_forward(extractor)

    def engine(name, count=n):
        t0 = time.perf_counter()
        out = extract_features(extractor, images, indices[:count], keys[:count], views[name][:count], **common)
        elapsed = time.perf_counter() - t0
        assert out.shape == (count, 2048) and np.isfinite(out).all(), "features missing or not finite"
        return elapsed

    def raw():
        t0 = time.perf_counter()
        for _ in range(sizes["batches_per_pass"]):
            out = forward(x_device)
        sync(out)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    first = engine("view0", batch)  # warm-up: compiles (JAX: per shape), kernel selection
    engine("augmented", batch)
    raw()
    log(f"batch {batch}: warm-up {time.perf_counter() - t0:.1f} s (first engine call {first:.1f} s)")
    times: dict[str, list[float]] = {"view0": [], "augmented": [], "raw": []}
    for repeat in range(sizes["repeats"]):
        for name in list(times) if repeat % 2 == 0 else list(times)[::-1]:
            times[name].append(raw() if name == "raw" else engine(name))
    row = {
        "batch": batch,
        "n_images": n,
        "first_engine_call_s": first,
        "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
    }
    for name, values in times.items():
        row[f"{name}_images_per_s"] = n / statistics.median(values)
    log(
        f"batch {batch}: view 0 {row['view0_images_per_s']:.0f}, augmented {row['augmented_images_per_s']:.0f}, "
        f"raw {row['raw_images_per_s']:.0f} images/s"
    )
    return row


# -- (b) phase-2 fine-tuning step -------------------------------------------------------------------------


def bench_training(sizes: dict, budget_s: float) -> list[dict]:
    import keras

    spec = get_backbone("resnet50")
    preprocess = spec.preprocess()
    rows = []
    for batch in sizes["train_batches"]:
        if time.perf_counter() - STARTED > budget_s:
            rows.append({"batch": batch, "skipped": f"over the {budget_s:.0f} s budget"})
            continue
        config = TrainConfig(
            backbone=spec.name,
            weights=None,
            image_size=sizes["image_size"],
            batch_size=batch,
            fine_tune_layers=spec.fine_tune_layers,
            fine_tune_epochs=1,
        )
        keras.utils.set_random_seed(0)
        backbone = build_backbone(spec, image_size=config.image_size, weights=None)
        head = build_head(backbone.output_shape[-1], N_CLASSES, config)
        model = assemble_model(backbone, head, config)
        unfreeze_top_layers(backbone, config.fine_tune_layers)
        compile_model(model, config, config.fine_tune_learning_rate)
        trainable = step_flops(model)
        rng = np.random.default_rng(batch)
        images = rng.integers(0, 256, size=(batch, config.image_size, config.image_size, 3), dtype=np.uint8)
        x_host = np.asarray(preprocess(images.astype(np.float32)), dtype=np.float32)
        y_host = np.eye(N_CLASSES, dtype=np.float32)[rng.integers(0, N_CLASSES, batch)]
        inputs = {
            "device": (keras.ops.convert_to_tensor(x_host), keras.ops.convert_to_tensor(y_host)),
            "host": (x_host, y_host),
        }
        t0 = time.perf_counter()
        model.train_on_batch(*inputs["device"])  # compiles the train step
        first = time.perf_counter() - t0
        for _ in range(2):
            model.train_on_batch(*inputs["device"])
            model.train_on_batch(*inputs["host"])
        log(
            f"train batch {batch}: warm-up {time.perf_counter() - t0:.1f} s (first step {first:.1f} s); "
            f"{trainable['trainable_weighted_layers']} of {trainable['weighted_layers']} conv/dense layers trainable"
        )
        times: dict[str, list[float]] = {"device": [], "host": []}
        for step in range(sizes["train_steps"]):
            for name in ("device", "host") if step % 2 == 0 else ("host", "device"):
                t0 = time.perf_counter()
                logs = model.train_on_batch(*inputs[name], return_dict=True)  # returns host floats: a sync
                times[name].append(time.perf_counter() - t0)
        assert np.isfinite(logs["loss"]), f"training loss is {logs['loss']}"
        row = {
            "batch": batch,
            "steps": sizes["train_steps"],
            "first_step_s": first,
            "loss": float(logs["loss"]),
            "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
        }
        for name, values in times.items():
            row[f"{name}_step_ms"] = statistics.median(values) * 1000
            row[f"{name}_images_per_s"] = batch / statistics.median(values)
        log(
            f"train batch {batch}: {row['device_step_ms']:.1f} ms per step (batch on device), "
            f"{row['host_step_ms']:.1f} ms (from host)"
        )
        rows.append(row)
        del model, backbone, head
        keras.backend.clear_session()
    return rows


# -- the report -------------------------------------------------------------------------------------------


def add_floors(document: dict) -> None:
    """Floor time per image at the compute dtype's matmul rate, and each figure's time over it."""
    rates = {m["dtype"]: m["best_tflops"] for m in document["matmul"]}
    dtype = document["compute_dtype"]
    if dtype not in rates or not document.get("flops"):
        return
    rate = rates[dtype] * 1e12
    flops = document["flops"]
    document["floor"] = {
        "dtype": dtype,
        "rate_tflops": rates[dtype],
        "forward_ms_per_image": flops["forward_flops"] / rate * 1000,
        "train_ms_per_image": flops["train_flops"] / rate * 1000,
    }
    for row in document["extraction"]:
        for name in ("view0", "augmented", "raw"):
            if f"{name}_images_per_s" in row:
                row[f"{name}_x_floor"] = rate / flops["forward_flops"] / row[f"{name}_images_per_s"]
                row[f"{name}_tflops"] = row[f"{name}_images_per_s"] * flops["forward_flops"] / 1e12
    for row in document["training"]:
        for name in ("device", "host"):
            if f"{name}_images_per_s" in row:
                row[f"{name}_x_floor"] = rate / flops["train_flops"] / row[f"{name}_images_per_s"]
                row[f"{name}_tflops"] = row[f"{name}_images_per_s"] * flops["train_flops"] / 1e12


def save(document: dict, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2, default=str))


def print_table(document: dict) -> None:
    env = document["environment"]
    print(
        f"backend {env['backend']} ({env['library']} {env['library_version']}, Keras {env['keras']}); "
        f"devices: {', '.join(env['backend_devices']) or 'none (CPU)'}; policy {document['policy']} "
        f"(engine's precision_policy: {env['engine_policy']})"
    )
    if env.get("nvidia_smi"):
        print(f"nvidia-smi: {env['nvidia_smi']}")
    for key in ("configure_device_error", "precision_policy_error"):
        if key in env:
            print(f"ENGINE CALL FAILED: {key.removesuffix('_error')}: {env[key]}")
    print(
        f"ResNet50 at {document['image_size']} px, random weights, random uint8 images made on the spot"
        + (" (QUICK sizes: not figures to keep)" if document["quick"] else "")
    )
    for m in document["matmul"]:
        print(
            f"matmul {m['dtype']:<9} {m['n']}-square: {m['best_tflops']:8.2f} TFLOP/s best, "
            f"{m['median_tflops']:8.2f} median"
        )
    flops, floor = document.get("flops"), document.get("floor")
    if flops:
        print(
            f"FLOPs per image: forward {flops['forward_flops'] / 1e9:.2f} G (BENCHMARKS.md 2b: "
            f"{RESNET50_GFLOP_224} G at 224 px), training step {flops['train_flops'] / 1e9:.2f} G "
            f"(3 x the unfrozen part's {flops['unfrozen_forward_flops'] / 1e9:.2f} G + 1 x the rest)"
        )
    if floor:
        print(
            f"floor at {floor['rate_tflops']:.1f} TFLOP/s ({floor['dtype']}): forward "
            f"{floor['forward_ms_per_image'] * 1000:.1f} us/image, training {floor['train_ms_per_image'] * 1000:.1f}"
            " us/image"
        )
    print(f"{'what':<44}{'batch':>6}{'images/s':>11}{'ms/batch':>10}{'TFLOP/s':>9}{'x floor':>9}")
    labels = {
        "view0": "extract_features, view 0",
        "augmented": f"extract_features, views 1..{AUGMENTED_VIEWS}",
        "raw": "extractor alone, batch on device",
    }
    for row in document["extraction"]:
        if "skipped" in row:
            print(f"{'feature extraction':<44}{row['batch']:>6}  skipped: {row['skipped']}")
            continue
        for name, label in labels.items():
            ips = row[f"{name}_images_per_s"]
            print(
                f"{label:<44}{row['batch']:>6}{ips:>11.1f}{row['batch'] / ips * 1000:>10.2f}"
                f"{row.get(f'{name}_tflops', float('nan')):>9.4g}{row.get(f'{name}_x_floor', float('nan')):>9.2f}"
            )
    for row in document["training"]:
        if "skipped" in row:
            print(f"{'phase-2 train step':<44}{row['batch']:>6}  skipped: {row['skipped']}")
            continue
        for name, label in (
            ("device", "phase-2 train_on_batch, batch on device"),
            ("host", "phase-2 train_on_batch, NumPy batch"),
        ):
            print(
                f"{label:<44}{row['batch']:>6}{row[f'{name}_images_per_s']:>11.1f}{row[f'{name}_step_ms']:>10.2f}"
                f"{row.get(f'{name}_tflops', float('nan')):>9.4g}{row.get(f'{name}_x_floor', float('nan')):>9.2f}"
            )
    print("x floor = measured time / floor time (1.00 = at the matmul rate); TFLOP/s counts conv and dense FLOPs only.")
    if document.get("errors"):
        for error in document["errors"]:
            print(f"ERROR: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("BCD_GPU_CHECK_QUICK") == "1",
        help="tiny sizes, to test the script on a CPU (also BCD_GPU_CHECK_QUICK=1)",
    )
    parser.add_argument(
        "--policy",
        default="auto",
        help="Keras dtype policy; auto (default): the engine's precision_policy for this device",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=200.0,
        help="seconds after which no new measurement starts (default %(default)s)",
    )
    parser.add_argument("--out", help="JSON file (default: $OUT/gpu_check.json when OUT is set)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    out = Path(args.out) if args.out else None
    if out is None and os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "gpu_check.json"

    import keras

    env = environment(args.policy)
    keras.mixed_precision.set_global_policy(env["policy"])  # before any model is built, as a run's block does
    compute_dtype = keras.mixed_precision.global_policy().compute_dtype
    log(
        f"Keras {env['keras']} on {env['library']} {env['library_version']}, "
        f"devices {env['backend_devices'] or 'CPU'}, policy {env['policy']} (engine: {env['engine_policy']}), "
        f"compute dtype {compute_dtype}"
    )
    document = {
        "benchmark": "GPU check: ResNet50 feature extraction and phase-2 training step against the matmul rate",
        "environment": env,
        "policy": env["policy"],
        "compute_dtype": compute_dtype,
        "quick": args.quick,
        "image_size": sizes["image_size"],
        "sizes": sizes,
        "matmul": [],
        "extraction": [],
        "training": [],
        "errors": [],
        "notes": [
            "random weights (weights=None) and random uint8 images made on the spot: nothing read from ../shared",
            "FLOPs: 2 x the multiply-accumulates of Conv2D and Dense layers from their shapes (as bench_inference)",
            (
                "training step FLOPs per image = forward of all layers + 2 x forward of the layers from the lowest "
                "trainable one up (their activation and weight gradients): 3 x forward for the unfrozen part; "
                "optimizer update, BatchNorm and element-wise work not counted"
            ),
            "floor = FLOPs / the best matmul rate in the policy's compute dtype in this run; x floor = time / floor",
            (
                "extract_features: the engine's pipeline from uint8 images in host memory (cache=None), outputs back "
                "to NumPy; raw: the extractor alone on a preprocessed batch already on the device"
            ),
            (
                "float32 matmul is the backend's default arithmetic for float32: JAX computes float32 dots in TF32 "
                "on Ampere and newer GPUs, PyTorch in full float32 (allow_tf32 off); the floor uses the policy's "
                "compute dtype"
            ),
            (
                "train_on_batch: 'device' = the batch already a backend tensor on the device, 'host' = a NumPy batch "
                "copied in by Keras each step; medians over interleaved steps after warm-up; each step ends on the "
                "host (the returned loss), so it is synchronised"
            ),
        ],
    }
    dtypes = list(dict.fromkeys(["bfloat16", "float32", compute_dtype]))
    sections = [
        ("flops", lambda: resnet50_flops(sizes)),
        (
            "matmul",
            lambda: [matmul_rate(d, sizes["matmul_size"], sizes["matmul_burst"], sizes["repeats"] + 2) for d in dtypes],
        ),
        ("extraction", lambda: bench_extraction(sizes, env["policy"], args.budget_s)),
        ("training", lambda: bench_training(sizes, args.budget_s)),
    ]
    for name, run in sections:
        log(f"{name} ...")
        try:
            result = run()
        except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others' figures
            import traceback

            traceback.print_exc()
            document["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            result = None if name == "flops" else []
        document[name] = result
        add_floors(document)
        document["elapsed_s"] = time.perf_counter() - STARTED
        save(document, out)
    if out:
        log(f"wrote {out}")
    print_table(document)


if __name__ == "__main__":
    main()
