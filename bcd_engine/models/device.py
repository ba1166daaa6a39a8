"""The device a process trains on: the GPU with mixed precision when there is one, all CPU cores otherwise."""
from __future__ import annotations

import os
import platform


def configure_device() -> dict:
    """Use the GPU with mixed precision when there is one, all CPU cores otherwise; describe the device."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        for gpu in gpus:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # already initialised in this process
                pass
        keras.mixed_precision.set_global_policy("mixed_float16")
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
        device = f"GPU: {name} x{len(gpus)}"
    else:
        keras.mixed_precision.set_global_policy("float32")
        device = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {
        "device": device,
        "mixed_precision": bool(gpus),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
