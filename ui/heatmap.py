"""A Grad-CAM heatmap a person can read: the image and the overlay side by side, a colour scale from low to high
attention, and a note when most of the heat lies on the image's border or its label corner."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import streamlit as st

from bcd_engine.inference import explain

SCALE_STEPS = 256  # colours across the scale


def colour_scale(width: int = SCALE_STEPS, height: int = 14) -> np.ndarray:
    """The heatmap's colours from low (left) to high (right) attention, as a uint8 RGB strip."""
    row = (explain.jet(np.linspace(0.0, 1.0, width)) * 255).round().astype(np.uint8)
    return np.repeat(row[None], height, axis=0)


def show(
    image: np.ndarray,
    heatmap: np.ndarray,
    *,
    opacity: float,
    caption: str,
    regions: Sequence[explain.Box] = (),
    container=st,
) -> None:
    """``image`` and ``heatmap`` (Grad-CAM, [0, 1]) side by side, the colour scale under them, then a note for each
    region holding most of the heat (the border, the label corner, each of ``regions``: a run's masked or flagged
    ones). ``caption`` names the image (already Markdown-safe)."""
    original, overlaid = container.columns(2)
    original.image(image, width="stretch", caption="The image as the model saw it")
    overlaid.image(explain.overlay(image, heatmap, opacity=opacity), width="stretch", caption=caption)
    container.image(colour_scale(), width="stretch")
    container.caption(
        "Colour scale: ← dark blue, little attention · cyan · yellow · dark red, most attention →. "
        "Relative to this image: its hottest spot is always dark red."
    )
    for note in explain.heat_share(heatmap, regions=regions).notes:
        container.warning(note, icon=":material/center_focus_weak:")
