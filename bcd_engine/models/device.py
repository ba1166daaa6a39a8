"""The device a process trains on: the GPUs with mixed precision when there are some, all CPU cores otherwise.

:func:`configure_device` describes the device on the running Keras backend (TensorFlow, JAX or PyTorch);
the mixed-precision policy is Keras-process-wide, so it is set only around the work that trains, by
:func:`compute_precision`, and put back afterwards: bfloat16 on GPUs that compute in it natively (compute
capability 8.0 and newer), float16 with loss scaling on older ones. With several GPUs, :func:`replicated`
spreads the models built in its block over all of them (TensorFlow's ``MirroredStrategy``, Keras'
``DataParallel`` distribution on JAX; PyTorch trains on one).
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from typing import Any

from bcd_engine.models import backend


def configure_device() -> dict[str, Any]:
    """Describe the device: name, backend and its library's version, the precision to train in, versions."""
    import keras

    gpus = backend.gpus()
    if gpus:
        device = f"GPU: {gpus[0]['name']} x{len(gpus)}"
        precision = "mixed_bfloat16" if all(gpu["bfloat16"] for gpu in gpus) else "mixed_float16"
    else:
        device = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        precision = "float32"
    environment = {
        "device": device,
        "mixed_precision": bool(gpus),
        "precision": precision,
        "backend": backend.name(),
        backend.name(): backend.library_version(),  # e.g. "jax": "0.10.2"
        "keras": keras.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if len(gpus) > 1 and backend.name() != "torch":  # only then: a run on one device describes it as before
        environment["replicas"] = len(gpus)
    return environment


def precision_policy(environment: dict[str, Any]) -> str:
    """The Keras dtype policy for a device that :func:`configure_device` described (runs stored before bcd
    recorded ``precision`` trained in float16 on a GPU)."""
    return environment.get("precision") or ("mixed_float16" if environment["mixed_precision"] else "float32")


@contextlib.contextmanager
def replicated(environment: dict[str, Any]) -> Iterator[int]:
    """Build and train over all the GPUs inside the block when :func:`configure_device` found more than one;
    yields the number of replicas (1: nothing changes)."""
    replicas = environment.get("replicas", 1)
    if replicas == 1:
        yield 1
        return
    if backend.name() == "jax":
        import keras

        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        try:
            yield replicas
        finally:
            keras.distribution.set_distribution(previous)
        return
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy()
    with strategy.scope():
        yield strategy.num_replicas_in_sync


@contextlib.contextmanager
def compute_precision(policy: str) -> Iterator[None]:
    """Build and train under Keras' dtype ``policy`` inside the block; the previous policy is restored after it."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
