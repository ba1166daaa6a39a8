"""TensorFlow Lite conversion of a run's model, checked against Keras before anything is written."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from bcd_engine.errors import ConfigError
from bcd_engine.models.backend import name as backend_name

TFLITE_ATOL = 1e-4  # largest allowed probability difference, TFLite vs Keras, for float32 models
TFLITE_ATOL_MIXED = 1e-2  # ... for models trained in mixed precision (Keras computes in float16)
N_CHECK_IMAGES = 4


def to_tflite(model) -> bytes:
    """Convert a Keras 3 model to a TFLite flatbuffer (Keras SavedModel export, then TFLiteConverter).

    A model trained in mixed precision is first copied with float32 layers (same weights): TFLite's
    builtin kernels do not run float16 convolutions.
    """
    import tensorflow as tf

    source = _float32_copy(model) if reduced_precision(model) else model
    with tempfile.TemporaryDirectory(prefix="bcd-tflite-") as tmp, contextlib.redirect_stdout(sys.stderr):
        source.export(tmp, format="tf_saved_model")
        return tf.lite.TFLiteConverter.from_saved_model(tmp).convert()


def tflite_probabilities(model: bytes | str | os.PathLike, images: np.ndarray) -> np.ndarray:
    """Run a TFLite model (bytes or file) on a batch of preprocessed float32 images."""
    content = model if isinstance(model, bytes) else Path(model).read_bytes()
    images = np.asarray(images, dtype=np.float32)
    interpreter = _interpreter(content)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], images)
    interpreter.invoke()
    return np.array(interpreter.get_tensor(out["index"]))


def checked_tflite(loaded) -> tuple[bytes, float]:
    """Convert, then compare TFLite with Keras on seeded random images; ConfigError when they disagree, or when
    Keras runs on another backend than TensorFlow (the converter needs it)."""
    if backend_name() != "tensorflow":
        raise ConfigError(
            f"TensorFlow Lite export needs Keras' TensorFlow backend, and this process runs on "
            f"{backend_name()}: run the export again with KERAS_BACKEND=tensorflow (a run's .keras "
            f"model loads on every backend), or export it as .keras"
        )
    size = loaded.config.image_size
    try:
        content = to_tflite(loaded.model)
    except Exception as exc:  # the converter raises several types for unsupported graphs
        raise ConfigError(
            f"run {loaded.run_id}'s model cannot be converted to TFLite ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); export it as .keras"
        ) from exc
    rgb = np.random.default_rng(0).integers(0, 256, (N_CHECK_IMAGES, size, size, 3)).astype(np.float32)
    images = np.asarray(loaded.preprocess()(rgb), dtype=np.float32)
    expected = np.asarray(loaded.model.predict(images, verbose=0), dtype=np.float64)
    diff = float(np.abs(tflite_probabilities(content, images) - expected).max())
    atol = TFLITE_ATOL_MIXED if reduced_precision(loaded.model) else TFLITE_ATOL
    if not diff <= atol:
        raise ConfigError(
            f"TFLite model of run {loaded.run_id} differs from Keras by {diff:.2g} "
            f"(allowed {atol:g}); export it as .keras"
        )
    return content, diff


def _layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)


def reduced_precision(model) -> bool:
    return any(layer.dtype_policy.compute_dtype != "float32" for layer in _layers(model))


def _float32_copy(model):
    """The same model and weights with every layer computing in float32."""
    import keras

    def float32_layer(layer):
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=float32_layer, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def _interpreter(content: bytes):
    """LiteRT's interpreter when ``ai_edge_litert`` is installed, TensorFlow's otherwise."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated", category=UserWarning)
            return tf.lite.Interpreter(model_content=content)
    return Interpreter(model_content=content)
