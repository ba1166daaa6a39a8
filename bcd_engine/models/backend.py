"""The one module that knows which Keras backend runs: TensorFlow (the default), JAX or PyTorch.

Everything else in the engine uses Keras' backend-neutral API (``keras.ops``, models, layers). The
few things each backend does its own way live here, each behind one small function: compiling a
model's forward pass (:func:`forward_function`) or a pure array function (:func:`compiled_function`),
taking a gradient (:func:`value_and_gradient`), and listing the GPUs (:func:`gpus`). Choose the
backend with ``KERAS_BACKEND=tensorflow|jax|torch`` before bcd starts. What is compiled for a model is
made once and kept for as long as the model lives (:func:`cached_for`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

_T = TypeVar("_T")


def name() -> str:
    """The running Keras backend: 'tensorflow', 'jax' or 'torch'."""
    import keras

    return keras.backend.backend()


def library_version() -> str:
    """The version of the library the backend runs on (TensorFlow's, JAX's or PyTorch's: each backend is named
    after the module it imports)."""
    import importlib

    return importlib.import_module(name()).__version__


def gpus() -> list[dict[str, Any]]:
    """The machine's GPUs as the backend sees them: ``{"name", "bfloat16"}`` each (bfloat16: the GPU computes in it
    natively, compute capability 8.0 or newer)."""
    backend = name()
    if backend == "tensorflow":
        import contextlib

        import tensorflow as tf

        found = []
        for gpu in tf.config.list_physical_devices("GPU"):
            with contextlib.suppress(RuntimeError):  # already initialised in this process
                tf.config.experimental.set_memory_growth(gpu, True)
            details = tf.config.experimental.get_device_details(gpu)
            found.append(
                {
                    "name": details.get("device_name", "GPU"),
                    "bfloat16": tuple(details.get("compute_capability", (0, 0))) >= (8, 0),
                }
            )
        return found
    if backend == "jax":
        import jax

        return [
            {
                "name": device.device_kind,
                "bfloat16": _capability(getattr(device, "compute_capability", "0.0")) >= (8, 0),
            }
            for device in jax.devices()
            if device.platform == "gpu"
        ]
    import torch

    return [
        {"name": torch.cuda.get_device_name(i), "bfloat16": torch.cuda.get_device_capability(i) >= (8, 0)}
        for i in range(torch.cuda.device_count())
    ]


def _capability(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in str(text).split(".") if part.isdigit())


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: what cached_for made}
_COMPILED_LOCK = threading.RLock()  # a make() may compile for another model


def cached_for(model, key: Hashable, make: Callable[[], _T]) -> _T:
    """``make()``, made once per (``model``, ``key``) and kept while ``model`` lives: bcd's one cache of what is
    compiled for a model (its forward passes, its Grad-CAM functions).

    The cache holds the model weakly, so what ``make`` returns must not hold the model itself (at most a
    weak reference to it), or the model would never be freed.
    """
    with _COMPILED_LOCK:
        made = _COMPILED.setdefault(model, {})
        if key not in made:
            made[key] = make()
        return made[key]


@dataclass(frozen=True, eq=False)
class _Forward:
    """A compiled forward pass that keeps its model alive while it is in use (the cache holds neither)."""

    model: Any
    run: Callable[[Any], Any]

    def __call__(self, images):
        return self.run(images)


def forward_function(model, preprocess: Callable) -> Callable[[np.ndarray], Any]:
    """``images -> model(preprocess(images))`` in inference mode, compiled once per (model, preprocess) for the
    backend: images (n, h, w, 3) in 0..255, uint8 or float32, NumPy or the backend's tensors; outputs come back
    as NumPy arrays (a list for a model with several outputs). The function keeps the model alive; the
    compiled pass is freed with the model."""
    model_ref = weakref.ref(model)
    return _Forward(model, cached_for(model, ("forward", preprocess), lambda: _BUILDERS[name()](model_ref, preprocess)))


def _tensorflow_forward(model_ref, preprocess):
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def run(images):
        return model_ref()(preprocess(tf.cast(images, tf.float32)), training=False)

    strategy = tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync > 1:  # split each batch over the devices, gathered back in order
        split = tf.function(lambda images: strategy.gather(strategy.run(run, args=(images,)), axis=0))
        return lambda images: _numpy(
            split(
                next(
                    iter(
                        strategy.experimental_distribute_dataset(
                            tf.data.Dataset.from_tensors(images).unbatch().batch(len(images))
                        )
                    )
                )
            )
        )
    return lambda images: _numpy(run(images))


def _jax_forward(model_ref, preprocess):
    import jax
    from keras import ops

    @jax.jit
    def run(trainable, non_trainable, images):
        outputs, _ = model_ref().stateless_call(
            trainable, non_trainable, preprocess(ops.cast(images, "float32")), training=False
        )
        return outputs

    def forward(images):
        model = model_ref()
        sharded, n = _sharded_over_devices(images)
        outputs = _numpy(
            run([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables], sharded)
        )
        return [output[:n] for output in outputs] if isinstance(outputs, list) else outputs[:n]

    return forward


def _sharded_over_devices(images):
    """(``images`` split over the devices of Keras' distribution, if one is set, and filled up to a multiple of
    them with copies of the first; the number of real images). Without a distribution: as they are."""
    import keras

    distribution = keras.distribution.distribution()
    n = len(images)
    if distribution is None:
        return images, n
    images = filled_for_devices(keras.ops.convert_to_numpy(images), len(distribution.device_mesh.devices.flat))
    return keras.distribution.distribute_tensor(images, distribution.get_data_layout(images.shape)), n


def filled_for_devices(array: np.ndarray, devices: int) -> np.ndarray:
    """``array`` with copies of its first row added until its length splits evenly over ``devices``."""
    filler = -len(array) % devices
    return np.concatenate([array, np.repeat(array[:1], filler, axis=0)]) if filler else array


def _torch_forward(model_ref, preprocess):
    import torch
    from keras import ops

    def forward(images):
        with torch.no_grad():
            return _numpy(model_ref()(preprocess(ops.cast(ops.convert_to_tensor(images), "float32")), training=False))

    return forward


_BUILDERS = {"tensorflow": _tensorflow_forward, "jax": _jax_forward, "torch": _torch_forward}


def compiled_function(function: Callable, *, numpy: bool = True) -> Callable:
    """``function`` (arrays in, arrays out, no model state) compiled for the backend; outputs as NumPy (or, with
    ``numpy=False``, as the backend's tensors)."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(function, reduce_retracing=True)
    elif backend == "jax":
        import jax

        compiled = jax.jit(function)
    else:
        from keras import ops

        compiled = lambda *arrays: function(*(ops.convert_to_tensor(array) for array in arrays))
    return (lambda *arrays: _numpy(compiled(*arrays))) if numpy else compiled


def value_and_gradient(function: Callable, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``function(x)``, its gradient with respect to ``x``) by the backend's own mechanism; ``function`` maps a
    tensor to a scalar through Keras layers and ops."""
    from keras import ops

    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        tensor = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(tensor)
            value = function(tensor)
        return _numpy(value), _numpy(tape.gradient(value, tensor))
    if backend == "jax":
        import jax

        value, grad = jax.value_and_grad(function)(ops.convert_to_tensor(x))
        return _numpy(value), _numpy(grad)
    tensor = ops.convert_to_tensor(x).detach().requires_grad_(True)
    value = function(tensor)
    value.backward()
    return _numpy(value), _numpy(tensor.grad)


def _numpy(outputs):
    """Backend tensors (one, or a list or tuple of them) as NumPy arrays."""
    from keras import ops

    if isinstance(outputs, (list, tuple)):
        return [ops.convert_to_numpy(output) for output in outputs]
    return ops.convert_to_numpy(outputs)
