"""The device a process trains on: the GPU with mixed precision when there is one, all CPU cores otherwise.

:func:`configure_device` describes the device (and lets TensorFlow grow GPU memory as needed); the
mixed-precision policy is Keras-process-wide, so it is set only around the work that trains, by
:func:`compute_precision`, and put back afterwards. With several GPUs, :func:`replicated` mirrors the
models built in its block over all of them (``tf.distribute.MirroredStrategy``).
"""
from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from typing import Any


def configure_device() -> dict[str, Any]:
    """Describe the device: name, whether to train in mixed precision (on a GPU), library versions."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):  # already initialised in this process
            tf.config.experimental.set_memory_growth(gpu, True)
    if gpus:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
        device = f"GPU: {name} x{len(gpus)}"
    else:
        device = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    environment = {
        "device": device,
        "mixed_precision": bool(gpus),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if len(gpus) > 1:  # only then: a run on one device describes it as before
        environment["replicas"] = len(gpus)
    return environment


def precision_policy(environment: dict[str, Any]) -> str:
    """The Keras dtype policy for a device that :func:`configure_device` described."""
    return "mixed_float16" if environment["mixed_precision"] else "float32"


@contextlib.contextmanager
def replicated(environment: dict[str, Any]) -> Iterator[int]:
    """Build and train under ``tf.distribute.MirroredStrategy`` over the GPUs inside the block when
    :func:`configure_device` found more than one; yields the number of replicas (1: nothing changes)."""
    replicas = environment.get("replicas", 1)
    if replicas == 1:
        yield 1
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
