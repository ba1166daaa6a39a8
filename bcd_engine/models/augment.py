"""Training augmentations as stateless TensorFlow ops.

Every augmented view is decided by a seed pair, so the same (image, view) gives the same pixels in
every run: that is what lets the feature cache store augmented views and reuse them. View 0 is always
the untouched image; validation and test images only ever use view 0.
"""
from __future__ import annotations

import math

import numpy as np

from bcd_engine.models.config import AugmentConfig


def view_seeds(image_keys, views, *, seed: int) -> np.ndarray:
    """Seed pairs (int32, shape (n, 2)) for each (image key, view); keys are hex digests such as md5."""
    first = np.array([int(key[:8], 16) & 0x7FFFFFFF for key in image_keys], dtype=np.int64)
    second = (np.asarray(views, dtype=np.int64) + 1009 * seed) & 0x7FFFFFFF
    return np.stack([first, second], axis=1).astype(np.int32)


def augment_image(image, seed, config: AugmentConfig):
    """One augmented view of ``image`` (float32 HxWx3 in 0..255) decided by ``seed`` (int32 pair)."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=8)
    x = tf.convert_to_tensor(image, tf.float32) / 255.0
    if config.flips:
        x = tf.image.stateless_random_flip_left_right(x, seeds[0])
    if config.rot90:
        x = tf.image.rot90(x, tf.random.stateless_uniform([], seeds[1], 0, 4, dtype=tf.int32))
    if config.rotation_degrees > 0 or config.scale > 0:
        angle = tf.random.stateless_uniform([], seeds[2], -1.0, 1.0) * (config.rotation_degrees * math.pi / 180)
        zoom = 1.0 + tf.random.stateless_uniform([], seeds[3], -1.0, 1.0) * config.scale
        x = _rotate_and_zoom(x, angle, zoom)
    if config.brightness > 0:
        x = x + tf.random.stateless_uniform([], seeds[4], -config.brightness, config.brightness)
    if config.contrast > 0:
        x = tf.image.stateless_random_contrast(x, 1 - config.contrast, 1 + config.contrast, seeds[5])
    if config.hue > 0:
        x = tf.image.stateless_random_hue(tf.clip_by_value(x, 0.0, 1.0), config.hue, seeds[6])
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def _rotate_and_zoom(x, angle, zoom):
    """Rotate by ``angle`` (radians) and zoom by ``zoom`` about the centre, reflecting at the borders."""
    import tensorflow as tf

    height = tf.cast(tf.shape(x)[0], tf.float32)
    width = tf.cast(tf.shape(x)[1], tf.float32)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    # Maps each output pixel to the input pixel it samples.
    transform = tf.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None],
        transforms=transform[None],
        output_shape=tf.shape(x)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    return out[0]


def preview_views(image: np.ndarray, config: AugmentConfig, *, n_views: int = 8, seed: int = 0) -> list[np.ndarray]:
    """``n_views`` augmented views of one uint8 image, as uint8 arrays (view 0 is the image itself)."""
    seeds = view_seeds(["0" * 8] * n_views, range(n_views), seed=seed)
    views = [np.asarray(image, dtype=np.uint8)]
    for view in range(1, n_views):
        views.append(np.asarray(augment_image(image.astype(np.float32), seeds[view], config)).round().astype(np.uint8))
    return views
