"""Scale-out: the same queued runs through the local worker and through a local Ray cluster.

Four small runs (the scratch CNN on a synthetic set) are queued in a fresh store and trained by
``python -m bcd_engine worker --once`` (one process, one run after another), then, in another fresh
store, by ``worker --executor ray --once`` on a Ray head started here with ``--num-cpus`` CPUs (one CPU a
run, so that many runs at once). Wall times are from launching the worker command to its exit; the
cluster's own start is timed apart. Then one run each way: the difference is the overhead Ray adds to a
run (connecting, a task's worker process starting and importing TensorFlow, the hand-over in the store).

    python benchmarks/bench_scale_out.py [--runs 4] [--num-cpus 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info  # noqa: E402 - after the path set-up above

from bcd_engine.data.synthetic import make_synthetic_dataset  # noqa: E402
from bcd_engine.models.config import TrainConfig  # noqa: E402
from bcd_engine.store import RunStore  # noqa: E402
from bcd_engine.training.queue import queue_run  # noqa: E402

CONFIG = TrainConfig.for_backbone("scratch_cnn", image_size=64, epochs=6, patience=6, batch_size=16, dense_units=32)


def log(msg: str) -> None:
    print(f"[bench_scale_out] {msg}", file=sys.stderr, flush=True)


def start_head(num_cpus: int) -> tuple[str, float]:
    """``ray start --head`` as the README does; (address ``auto``, seconds until it answers)."""
    started = time.perf_counter()
    subprocess.run(["ray", "start", "--head", f"--num-cpus={num_cpus}"], check=True, capture_output=True)
    return "auto", time.perf_counter() - started


def stop_head() -> None:
    """``ray stop``: it stops every Ray process of this user on the machine, so run nothing else with Ray meanwhile."""
    subprocess.run(["ray", "stop"], check=False, capture_output=True)


def through_worker(work: Path, data: Path, runs: int, options: list[str]) -> dict:
    """Queue ``runs`` runs in a fresh store under ``work`` and time the worker command that trains them."""
    work.mkdir()
    env = {
        **os.environ,
        "BCD_DATABASE_URL": f"sqlite:///{work / 'results.db'}",
        "BCD_ARTIFACTS_DIR": str(work / "artifacts"),
        "BCD_CACHE_DIR": str(work / "cache"),
        "PYTHONPATH": str(ROOT),
    }
    store = RunStore.open(env["BCD_DATABASE_URL"])
    ids = [queue_run(store, CONFIG, data) for _ in range(runs)]
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "bcd_engine", "worker", "--once", "--json", *options],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    records = [store.get_run(run_id) for run_id in ids]
    if any(r.status != "completed" for r in records):
        raise RuntimeError(f"not all runs completed: {[(r.id, r.status, r.error) for r in records]}")
    return {
        "runs": runs,
        "wall_s": round(wall, 1),
        "run_seconds": [round(r.seconds, 1) for r in records],
        "workers": sorted({r.worker_id.rsplit(":", 1)[0] for r in records}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp:
        tmp = Path(tmp)
        data = make_synthetic_dataset(
            tmp / "data", n_per_class=24, image_size=64, seed=0, class_names=("Benign", "Early", "Pre", "Pro")
        )
        log(f"{args.runs} runs through the local worker")
        local = through_worker(tmp / "local", data, args.runs, [])
        log(f"starting a Ray head with {args.num_cpus} CPUs")
        address, head_s = start_head(args.num_cpus)
        try:
            ray_options = ["--executor", "ray", "--ray-address", address]
            log(f"{args.runs} runs through the Ray cluster at {address}")
            on_ray = through_worker(tmp / "ray", data, args.runs, ray_options)
            log("one run through each")
            one_local = through_worker(tmp / "local-1", data, 1, [])
            one_ray = through_worker(tmp / "ray-1", data, 1, ray_options)
        finally:
            stop_head()
    result = {
        "machine": machine,
        "config": CONFIG.to_dict(),
        "images": 96,
        "ray_cpus": args.num_cpus,
        "ray_head_start_s": round(head_s, 1),
        "local": local,
        "ray": on_ray,
        "speedup_local_over_ray": round(local["wall_s"] / on_ray["wall_s"], 2),
        "one_run": {
            "local": one_local,
            "ray": one_ray,
            "ray_overhead_s": round(one_ray["wall_s"] - one_local["wall_s"], 1),
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {machine['summary']}")
    print(f"{args.runs} runs of {CONFIG.backbone} at {CONFIG.image_size} px, {CONFIG.epochs} epochs, 96 images:")
    print(f"  local worker:          {local['wall_s']:7.1f} s wall (runs {local['run_seconds']} s)")
    print(f"  Ray, {args.num_cpus} CPUs:           {on_ray['wall_s']:7.1f} s wall (runs {on_ray['run_seconds']} s)")
    print(f"  local / Ray:           {result['speedup_local_over_ray']:7.2f}x")
    print(f"  Ray head start:        {head_s:7.1f} s (not in the walls above)")
    print(
        f"one run: local {one_local['wall_s']:.1f} s, Ray {one_ray['wall_s']:.1f} s: Ray adds "
        f"{result['one_run']['ray_overhead_s']:.1f} s (run itself: {one_local['run_seconds'][0]} s local, "
        f"{one_ray['run_seconds'][0]} s on Ray)"
    )


if __name__ == "__main__":
    main()
