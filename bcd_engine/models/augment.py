"""Training augmentations: parameters drawn by NumPy from a seed pair, pixels moved by Keras ops.

Every augmented view is decided by a seed pair, so the same (image, view) gives the same pixels in
every run, on every Keras backend (within float rounding): that is what lets the feature cache store
augmented views and reuse them, and a model trained on one backend be evaluated with the same
test-time views on another. View 0 is always the untouched image; validation and test images only
ever use view 0. The flip, the 90-degree turn, the rotation and the zoom are one affine map per image
(bilinear, reflecting at the borders); brightness, contrast and hue (a turn of YIQ's chroma plane, which
keeps luma) one colour map.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from bcd_engine.models.backend import compiled_function
from bcd_engine.models.config import AugmentConfig

_DRAWS = 7  # uniform numbers drawn per view, always all of them: turning one augmentation off keeps the others


def view_seeds(image_keys, views, *, seed: int) -> np.ndarray:
    """Seed pairs (int32, shape (n, 2)) for each (image key, view); keys are hex digests such as md5."""
    first = np.array([int(key[:8], 16) & 0x7FFFFFFF for key in image_keys], dtype=np.int64)
    second = (np.asarray(views, dtype=np.int64) + 1009 * seed) & 0x7FFFFFFF
    return np.stack([first, second], axis=1).astype(np.int32)


def view_parameters(seed_pairs: np.ndarray, config: AugmentConfig, *, size: int) -> dict[str, np.ndarray]:
    """The augmentation of each view, drawn from its seed pair: an affine map (n, 8) from output to input
    pixels for square images of ``size`` px, a brightness shift in 0..255 units and a contrast factor (n,)
    each, and a hue rotation (n, 3, 3) acting on RGB."""
    draws = np.array(
        [np.random.default_rng([int(a), int(b)]).random(_DRAWS) for a, b in np.asarray(seed_pairs)], dtype=np.float64
    ).reshape(-1, _DRAWS)
    flip = (draws[:, 0] < 0.5) & config.flips
    turns = np.floor(draws[:, 1] * 4).astype(int) * config.rot90
    angle = (2 * draws[:, 2] - 1) * (config.rotation_degrees * math.pi / 180)
    zoom = 1.0 + (2 * draws[:, 3] - 1) * config.scale
    maps = [_affine_map(size, f, t, a, z) for f, t, a, z in zip(flip, turns, angle, zoom)]
    hue_angle = (2 * draws[:, 6] - 1) * config.hue * 2 * math.pi
    return {
        "affine": np.array([m.reshape(-1)[:8] for m in maps], dtype=np.float32).reshape(-1, 8),
        "brightness": ((2 * draws[:, 4] - 1) * config.brightness * 255).astype(np.float32),
        "contrast": (1 + (2 * draws[:, 5] - 1) * config.contrast).astype(np.float32),
        "hue": np.array([_hue_rotation(a) for a in hue_angle], dtype=np.float32).reshape(-1, 3, 3),
    }


_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]])


def _hue_rotation(angle: float) -> np.ndarray:
    """3x3 map of RGB that turns hue by ``angle`` radians: the chroma plane of YIQ rotated, luma kept."""
    c, s = math.cos(angle), math.sin(angle)
    turn = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return np.linalg.inv(_RGB_TO_YIQ) @ turn @ _RGB_TO_YIQ


def _affine_map(size: int, flip: bool, turns: int, angle: float, zoom: float) -> np.ndarray:
    """3x3 map from an output pixel (x, y, 1) to the input point it samples: flip, then ``turns`` counter-clockwise
    quarter turns, then rotation by ``angle`` and zoom by ``zoom`` about the centre."""
    last = size - 1
    flipped = np.array([[-1, 0, last], [0, 1, 0], [0, 0, 1]], float) if flip else np.eye(3)
    quarter = np.linalg.matrix_power(np.array([[0, -1, last], [1, 0, 0], [0, 0, 1]], float), int(turns))
    c, s, centre = math.cos(angle) / zoom, math.sin(angle) / zoom, last / 2
    rotated = np.array([[c, -s, centre - c * centre + s * centre], [s, c, centre - s * centre - c * centre], [0, 0, 1]])
    return flipped @ quarter @ rotated


def augment_batch(
    images: np.ndarray,
    seed_pairs: np.ndarray,
    config: AugmentConfig,
    *,
    untouched: np.ndarray | None = None,
    as_tensor: bool = False,
):
    """The views decided by ``seed_pairs`` (n, 2) of square images (n, size, size, 3) in 0..255: float32 in 0..255,
    as NumPy (or, with ``as_tensor``, as the backend's tensor, to feed a model without a copy).

    Rows where ``untouched`` is true come back unchanged (their maps are the identity, which moves no pixel).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected square images (n, size, size, 3), got shape {images.shape}")
    parameters = view_parameters(seed_pairs, config, size=images.shape[1])
    if untouched is not None:
        parameters["affine"][untouched] = [1, 0, 0, 0, 1, 0, 0, 0]
        parameters["brightness"][untouched], parameters["contrast"][untouched] = 0, 1
        parameters["hue"][untouched] = np.eye(3)
    return _compiled(config, as_tensor)(
        images, parameters["affine"], parameters["brightness"], parameters["contrast"], parameters["hue"]
    )


@functools.lru_cache(maxsize=16)
def _compiled(config: AugmentConfig, as_tensor: bool):
    """The augmentation ops for ``config``, compiled once for the backend.

    Brightness (b), contrast (c, about the image's mean m) and hue (H) are linear in RGB, so they are
    applied at once: H((x - m) c + m + b) = cH x + H((1 - c) m + b), one 3x3 map and offset per image.
    """
    from keras import ops

    geometric = config.flips or config.rot90 or config.rotation_degrees > 0 or config.scale > 0
    colour = config.brightness > 0 or config.contrast > 0 or config.hue > 0

    def apply(images, affine, brightness, contrast, hue):
        x = ops.cast(images, "float32")
        if geometric:
            x = ops.image.affine_transform(x, affine, interpolation="bilinear", fill_mode="reflect")
        if colour:
            mean = ops.mean(x, axis=(1, 2))  # (n, 3)
            offset = ops.einsum("ndc,nc->nd", hue, (1 - contrast)[:, None] * mean + brightness[:, None])
            x = ops.einsum("nhwc,ndc->nhwd", x, contrast[:, None, None] * hue) + offset[:, None, None, :]
        return ops.clip(x, 0.0, 255.0)

    return compiled_function(apply, numpy=not as_tensor)


def preview_views(image: np.ndarray, config: AugmentConfig, *, n_views: int = 8, seed: int = 0) -> list[np.ndarray]:
    """``n_views`` augmented views of one square uint8 image, as uint8 arrays (view 0 is the image itself)."""
    image = np.asarray(image, dtype=np.uint8)
    seeds = view_seeds(["0" * 8] * n_views, range(n_views), seed=seed)
    augmented = augment_batch(np.repeat(image[None], n_views - 1, axis=0), seeds[1:], config) if n_views > 1 else []
    return [image, *(np.asarray(view).round().astype(np.uint8) for view in augmented)]
