"""Predicting with a Keras model: class probabilities with test-time augmentation, and warm latency."""
from __future__ import annotations

import time

import numpy as np

from bcd_engine.models.augment import augment_image, view_seeds
from bcd_engine.models.config import AugmentConfig
from bcd_engine.progress import progress_bar


def predict_proba(model, images: np.ndarray, *, preprocess, batch_size: int = 32, augment: AugmentConfig | None = None,
                  tta_views: int = 1, seed: int = 0, image_keys: list[str] | None = None,
                  progress: bool = False) -> np.ndarray:
    """Class probabilities for uint8 images (n, size, size, 3).

    With ``tta_views`` > 1 (test-time augmentation) the probabilities are averaged over the image
    itself and ``tta_views - 1`` views made by the training augmentation ``augment``. With
    ``image_keys`` (the images' md5 digests) view v of an image is the same transform that training
    and its test evaluation used (so a stored evaluation can be reproduced); without them view v is
    one fixed transform for every image.
    """
    import tensorflow as tf

    keys = image_keys if image_keys is not None else ["0" * 8] * len(images)
    # One dataset of (image, row) for every view: the images are put into the graph once.
    base = tf.data.Dataset.from_tensor_slices((images, np.arange(len(images))))
    total = 0.0
    with progress_bar(tta_views * len(images), "predicting", enabled=progress) as bar:
        for view in range(tta_views):
            if view:
                seeds = tf.constant(view_seeds(keys, np.full(len(images), view), seed=seed))
                ds = base.map(lambda x, row, s=seeds: augment_image(tf.cast(x, tf.float32), tf.gather(s, row), augment),
                              num_parallel_calls=tf.data.AUTOTUNE)
            else:
                ds = base.map(lambda x, row: tf.cast(x, tf.float32))
            ds = ds.map(preprocess).batch(batch_size).prefetch(tf.data.AUTOTUNE)
            total = total + np.asarray(model.predict(ds, verbose=0), dtype=np.float64)
            bar.update(len(images))
    return total / tta_views


def measure_latency(model, image: np.ndarray, *, preprocess, repeats: int = 10) -> float:
    """Mean warm single-image inference latency in milliseconds."""
    import tensorflow as tf

    x = preprocess(tf.cast(image[None], tf.float32))
    infer = tf.function(lambda t: model(t, training=False))
    infer(x)
    started = time.perf_counter()
    for _ in range(repeats):
        np.asarray(infer(x))
    return (time.perf_counter() - started) / repeats * 1000




