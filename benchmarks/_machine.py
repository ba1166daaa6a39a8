"""What machine a benchmark figure came from: CPU model and SIMD flags, cores, memory, GPUs, versions, load.

Shared by the benchmark scripts, so every figure they print carries the same machine description.
``cpu_model`` is bench_training_speed's helper; this adds the rest.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_training_speed import cpu_model

_SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "asimd", "sve")


def cpu_flags() -> list[str]:
    """The SIMD flags from :data:`_SIMD_FLAGS` that /proc/cpuinfo lists (empty when unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in _SIMD_FLAGS if flag in present]
    except OSError:
        pass
    return []


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cpu_quota() -> float | None:
    """CPUs allowed by a cgroup v2 quota (containers), or None when there is none."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else round(int(quota) / int(period), 2)
    except (OSError, ValueError):
        return None


def machine_info() -> dict:
    """The machine and software a figure was measured on; ``summary`` is one line of it for tables."""
    import keras
    import tensorflow as tf

    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            gpus.append(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name))
        except Exception:  # noqa: BLE001 - details are best effort
            gpus.append(gpu.name)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "cpu_quota": _cpu_quota(),
        "memory_gib": _memory_gib(),
        "gpus": gpus,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": load_average(),
    }
    info["summary"] = (
        f"{info['cpu']}, {usable} cores"
        + (f" (cgroup quota {info['cpu_quota']})" if info["cpu_quota"] else "")
        + (f", GPU: {', '.join(gpus)}" if gpus else ", no GPU")
        + f", TensorFlow {tf.__version__}"
    )
    return info


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages now (other work on the machine shows here)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def print_report_start(document: dict, machine: dict, *, as_json: bool) -> bool:
    """Print the whole document as JSON and return True (the report is done), or else print the text
    report's first line, the machine with its load averages at start and end, and return False."""
    if as_json:
        print(json.dumps(document, indent=2))
        return True
    print(
        f"machine: {machine['summary']}; load average {machine['load_average_at_start']} at start, "
        f"{document['load_average_at_end']} at end"
    )
    return False
