"""Augmented views: decided by their seed pair alone, and each augmentation doing what its name says."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bcd_engine.models.augment import _RGB_TO_YIQ, augment_batch, preview_views, view_parameters, view_seeds
from bcd_engine.models.config import AugmentConfig

pytestmark = pytest.mark.every_backend  # CI runs this file on JAX too (README: Keras backends)

NONE = AugmentConfig(flips=False, rot90=False, rotation_degrees=0, scale=0, brightness=0, contrast=0, hue=0)
IMAGES = np.random.default_rng(0).integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
SEEDS = view_seeds([f"{i:032x}" for i in range(6)], np.arange(1, 7), seed=3)


def test_a_view_depends_on_its_seed_pair_only():
    config = AugmentConfig(factor=8)
    views = augment_batch(IMAGES, SEEDS, config)
    assert views.shape == IMAGES.shape and views.dtype == np.float32 and 0 <= views.min() <= views.max() <= 255
    np.testing.assert_array_equal(views, augment_batch(IMAGES, SEEDS, config))
    alone = augment_batch(IMAGES[2:3], SEEDS[2:3], config)  # the other images in the batch change nothing
    np.testing.assert_allclose(alone[0], views[2], atol=1e-3)
    other = augment_batch(IMAGES, view_seeds([f"{i:032x}" for i in range(6)], np.arange(7, 13), seed=3), config)
    assert all(np.abs(other[i] - views[i]).max() > 1 for i in range(6))


def test_flips_and_quarter_turns_move_pixels_exactly():
    only_flips, only_turns = dataclasses.replace(NONE, flips=True), dataclasses.replace(NONE, rot90=True)
    flips, turns = augment_batch(IMAGES, SEEDS, only_flips), augment_batch(IMAGES, SEEDS, only_turns)
    flipped = view_parameters(SEEDS, only_flips, size=24)["affine"][:, 0] < 0  # x_in = 23 - x_out
    # A quarter turn's map has (cos, sin) of its angle in its first column: (1, 0), (0, 1), (-1, 0), (0, -1).
    first_column = np.round(view_parameters(SEEDS, only_turns, size=24)["affine"][:, [0, 3]]).astype(int)
    turned = [{(1, 0): 0, (0, 1): 1, (-1, 0): 2, (0, -1): 3}[tuple(column)] for column in first_column]
    for i in range(6):
        np.testing.assert_array_equal(flips[i], np.fliplr(IMAGES[i]) if flipped[i] else IMAGES[i])
        np.testing.assert_array_equal(turns[i], np.rot90(IMAGES[i], turned[i]))  # counter-clockwise, as before
    assert 0 < flipped.sum() < 6 and len(set(turned)) > 1


def test_colour_augmentations_shift_brightness_scale_contrast_and_turn_hue_keeping_luma():
    grey = np.full((1, 8, 8, 3), 100, np.uint8)
    seeds = SEEDS[:1]
    bright = augment_batch(grey, seeds, dataclasses.replace(NONE, brightness=0.2))
    shift = view_parameters(seeds, dataclasses.replace(NONE, brightness=0.2), size=8)["brightness"][0]
    np.testing.assert_allclose(bright, 100 + shift, atol=1e-3)
    assert abs(shift) <= 0.2 * 255
    contrast = augment_batch(IMAGES[:1], seeds, dataclasses.replace(NONE, contrast=0.5))
    factor = view_parameters(seeds, dataclasses.replace(NONE, contrast=0.5), size=24)["contrast"][0]
    expected = np.clip((IMAGES[0] - IMAGES[0].mean(axis=(0, 1))) * factor + IMAGES[0].mean(axis=(0, 1)), 0, 255)
    np.testing.assert_allclose(contrast[0], expected, atol=1e-2)
    hued = augment_batch(IMAGES, SEEDS, dataclasses.replace(NONE, hue=0.1))
    luma = lambda x: np.asarray(x, np.float64) @ _RGB_TO_YIQ[0]
    unclipped = (hued > 0.5) & (hued < 254.5)
    keep = unclipped.all(axis=-1)
    np.testing.assert_allclose(luma(hued)[keep], luma(IMAGES)[keep], atol=0.05)
    assert np.abs(hued - IMAGES).max() > 5
    np.testing.assert_allclose(augment_batch(grey, seeds, dataclasses.replace(NONE, hue=0.1)), grey, atol=1e-3)


def test_the_preview_starts_with_the_image_itself():
    views = preview_views(IMAGES[0], AugmentConfig(), n_views=4)
    assert len(views) == 4 and all(v.dtype == np.uint8 and v.shape == IMAGES[0].shape for v in views)
    np.testing.assert_array_equal(views[0], IMAGES[0])
    with pytest.raises(ValueError, match="square"):
        augment_batch(IMAGES[:, :20], SEEDS, AugmentConfig())
