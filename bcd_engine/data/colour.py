"""Colour normalisation: take stain colour away as a shortcut (grayscale or Reinhard colour transfer).

Used by colour-robust training (``TrainConfig.colour``), by robustness evaluations and by the audits.
"""

from __future__ import annotations

import numpy as np

from bcd_engine.errors import ConfigError

NORMALISATION_METHODS = ("grayscale", "reinhard")
COLOUR_MODES = ("rgb", "grayscale")  # what a model may be trained on (applied to every image it sees)
# Reinhard et al. (2001): RGB -> LMS cone space, then log LMS -> decorrelated l-alpha-beta.
_RGB_TO_LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
_LOG_LMS_TO_LAB = np.diag([3**-0.5, 6**-0.5, 2**-0.5]) @ np.array([[1, 1, 1], [1, 1, -2], [1, -1, 0]])
_LMS_FLOOR = 1e-4


def normalise_colour(images, *, method: str = "grayscale", reference=None) -> np.ndarray:
    """Remove colour cues from uint8 RGB images (n, h, w, 3); returns uint8 of the same shape.

    ``grayscale``: ITU-R 601 luminance copied to all three channels. ``reinhard``: each image's
    per-channel mean and standard deviation in Reinhard's l-alpha-beta space are set to a target,
    the average per-image statistics of ``reference`` images (default: ``images`` themselves).
    """
    if method not in NORMALISATION_METHODS:
        raise ConfigError(f"method must be one of {NORMALISATION_METHODS}, got {method!r}")
    pixels = _check_images(images).astype(np.float64)
    if method == "grayscale":
        luminance = pixels @ np.array([0.299, 0.587, 0.114])
        return np.repeat(np.clip(np.rint(luminance), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    lab = _to_lab(pixels)
    ref = lab if reference is None else _to_lab(_check_images(reference).astype(np.float64))
    target_mean = ref.mean(axis=(1, 2)).mean(axis=0)
    target_std = ref.std(axis=(1, 2)).mean(axis=0)
    mean = lab.mean(axis=(1, 2), keepdims=True)
    std = lab.std(axis=(1, 2), keepdims=True)
    matched = (lab - mean) / np.where(std > 1e-8, std, 1.0) * target_std + target_mean
    return np.clip(np.rint(_from_lab(matched)), 0, 255).astype(np.uint8)


def apply_colour_mode(images: np.ndarray, mode: str, *, chunk: int = 256) -> np.ndarray:
    """Images as a model trained with colour ``mode`` sees them: unchanged for ``rgb``, else normalised.

    Works through ``chunk`` images at a time, so a whole dataset never needs a float copy in memory.
    """
    if mode not in COLOUR_MODES:
        raise ConfigError(f"colour mode must be one of {COLOUR_MODES}, got {mode!r}")
    if mode == "rgb" or len(images) == 0:
        return images
    out = np.empty_like(_check_images(images))
    for start in range(0, len(images), chunk):
        out[start : start + chunk] = normalise_colour(images[start : start + chunk], method=mode)
    return out


def _check_images(images) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ConfigError(f"expected uint8 RGB images of shape (n, h, w, 3), got {arr.dtype} {arr.shape}")
    return arr


def _to_lab(rgb: np.ndarray) -> np.ndarray:
    return np.log10(np.maximum(rgb / 255.0 @ _RGB_TO_LMS.T, _LMS_FLOOR)) @ _LOG_LMS_TO_LAB.T


def _from_lab(lab: np.ndarray) -> np.ndarray:
    lms = 10.0 ** (lab @ np.linalg.inv(_LOG_LMS_TO_LAB).T)
    return lms @ np.linalg.inv(_RGB_TO_LMS).T * 255.0
