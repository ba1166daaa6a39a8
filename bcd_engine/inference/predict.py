"""Predicting with a Keras model: class probabilities with test-time augmentation, and warm latency."""

from __future__ import annotations

import time

import numpy as np

from bcd_engine.models.backend import forward_function
from bcd_engine.models.batches import view_batches
from bcd_engine.models.config import AugmentConfig
from bcd_engine.progress import progress_bar


def predict_proba(
    model,
    images: np.ndarray,
    *,
    preprocess,
    batch_size: int = 32,
    augment: AugmentConfig | None = None,
    tta_views: int = 1,
    seed: int = 0,
    image_keys: list[str] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Class probabilities for uint8 images (n, size, size, 3).

    With ``tta_views`` > 1 (test-time augmentation) the probabilities are averaged over the image
    itself and ``tta_views - 1`` views made by the training augmentation ``augment``. With
    ``image_keys`` (the images' md5 digests) view v of an image is the same transform that training
    and its test evaluation used (so a stored evaluation can be reproduced); without them view v is
    one fixed transform for every image.
    """
    keys = image_keys if image_keys is not None else ["0" * 8] * len(images)
    forward = forward_function(model, preprocess)
    rows = np.arange(len(images))
    total = np.zeros((len(images), int(model.output_shape[-1])))
    with progress_bar(tta_views * len(images), "predicting", enabled=progress) as bar:
        for view in range(tta_views):
            views = np.full(len(images), view)
            done = 0
            for batch in view_batches(
                images, rows, views, keys, augment=augment or AugmentConfig(), seed=seed, batch_size=batch_size
            ):
                total[done : done + len(batch)] += np.asarray(forward(batch), dtype=np.float64)
                done += len(batch)
            bar.update(len(images))
    return total / tta_views


def measure_latency(model, image: np.ndarray, *, preprocess, repeats: int = 10) -> float:
    """Mean warm single-image inference latency in milliseconds."""
    forward = forward_function(model, preprocess)
    x = np.asarray(image, dtype=np.float32)[None]
    forward(x)
    started = time.perf_counter()
    for _ in range(repeats):
        forward(x)
    return (time.perf_counter() - started) / repeats * 1000
