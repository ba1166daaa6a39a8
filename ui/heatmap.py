"""A Grad-CAM heatmap a person can read: the image and the overlay side by side, a colour scale from low to high
attention, and a note when most of the heat lies on the image's border or its label corner."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import streamlit as st

from bcd_engine.inference import explain

SCALE_STEPS = 256  # colours across the scale


def colour_scale(length: int = SCALE_STEPS, thickness: int = 24) -> np.ndarray:
    """The heatmap's colours as a standing uint8 RGB strip: high attention at the top, low at the bottom."""
    column = (explain.jet(np.linspace(1.0, 0.0, length)) * 255).round().astype(np.uint8)
    return np.repeat(column[:, None], thickness, axis=1)


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
    original, overlaid, scale, words = container.columns([4, 4, 1, 3])
    original.image(image, width="stretch", caption="The image as the model saw it")
    overlaid.image(explain.overlay(image, heatmap, opacity=opacity), width="stretch", caption=caption)
    scale.image(colour_scale(), width=24)
    words.caption(
        "**Colour scale**: dark red at the top, most attention; then yellow, cyan; dark blue at the bottom, little "
        "attention. Relative to this image: its hottest spot is always dark red."
    )
    for note in explain.heat_share(heatmap, regions=regions).notes:
        container.warning(note, icon=":material/center_focus_weak:")
