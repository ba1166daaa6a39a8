"""Regions a model must not learn from (a scale-bar label, a stamp), and images as a run's model sees them.

A :class:`Region` is a box in fractions of the image's width and height, so one region fits every image
size. :func:`paint_regions` covers regions with each image's median colour; :func:`prepare_for_model`
applies a run's colour mode and masked regions in one place, the one entry every consumer of a run uses
(training, evaluation, ``predict``, Diagnose, Grad-CAM, exported bundles).

The text form of a run's ``mask_regions`` setting:

- ``none``: nothing masked; ``auto``: the regions the dataset audit flags (resolved by training, never stored);
- ``x0,y0,x1,y1``: one box in fractions of width and height (``0.75,0.75,1,1`` is the bottom-right
  sixteenth), or in pixels of a stated image size with ``@WxH`` or ``@S`` (``168,188,224,224@224`` is the
  same box as ``0.75,0.8393,1,1``); several boxes are separated by ``;``.

A dataset may declare the regions it must not teach in :data:`REGIONS_FILE` beside its class folders::

    {"regions": [{"name": "scale-bar label", "box": "168,188,224,224@224"}]}

``mask_regions=auto`` masks them with the regions the dataset audit flags.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from bcd_engine.data.colour import apply_colour_mode
from bcd_engine.errors import ConfigError, DataError

REGIONS_FILE = "regions.json"
MAX_REGIONS_FILE_BYTES = 64 * 1024
NO_REGIONS = "none"
AUTO_REGIONS = "auto"
# How paint_regions fills a region; cached features of masked images are keyed by it, so a change of the rule is never
# read from features painted by the old one. "median-outside": each image's median colour outside the regions (until
# commit 89a3f06 the whole image's median, cached under no rule name).
PAINT_RULE = "median-outside"
_DECIMALS = 4
_SIZE_SUFFIX = re.compile(r"^(?P<box>[^@]*)@(?P<width>\d+)(?:x(?P<height>\d+))?$")


@dataclass(frozen=True)
class Region:
    """A box ``[x0, x1) x [y0, y1)`` in fractions of the image's width (x) and height (y), origin top-left."""

    x0: float
    y0: float
    x1: float
    y1: float
    name: str = ""  # what it is, e.g. "bottom-right corner" (not part of its identity in a run's config)

    def __post_init__(self):
        values = (self.x0, self.y0, self.x1, self.y1)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values):
            raise ConfigError(f"a region's corners must be numbers, got {values}")
        if not (0 <= self.x0 < self.x1 <= 1 and 0 <= self.y0 < self.y1 <= 1):
            raise ConfigError(f"a region needs 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions), got {values}")

    @property
    def area(self) -> float:
        """Its share of the image."""
        return (self.x1 - self.x0) * (self.y1 - self.y0)

    def pixels(self, height: int, width: int) -> tuple[slice, slice]:
        """(rows, columns) it covers in a ``height`` x ``width`` image: at least one pixel each way."""
        return _span(self.y0, self.y1, height), _span(self.x0, self.x1, width)

    def overlaps(self, other: Region) -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1

    def to_text(self) -> str:
        """``x0,y0,x1,y1`` in fractions, rounded to 4 decimals: the form a run's config stores."""
        return ",".join(f"{round(v, _DECIMALS):g}" for v in (self.x0, self.y0, self.x1, self.y1))

    def to_dict(self) -> dict:
        return {"x0": self.x0, "y0": self.y0, "x1": self.x1, "y1": self.y1, "name": self.name}


class SeenAs(Protocol):
    """What decides how a run's model sees an image (a TrainConfig has both)."""

    colour: str
    mask_regions: str


def parse_regions(text: str) -> tuple[Region, ...]:
    """The regions a ``mask_regions`` text names (see the module's docstring); ``()`` for ``none``.

    ``auto`` is refused: it is resolved to concrete regions before a run trains.

    >>> parse_regions("168,188,224,224@224")[0].to_text()
    '0.75,0.8393,1,1'
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"mask regions must be 'none', 'auto' or x0,y0,x1,y1 boxes, got {text!r}")
    text = text.strip()
    if text.lower() == NO_REGIONS:
        return ()
    if text.lower() == AUTO_REGIONS:
        raise ConfigError("mask regions 'auto' must be resolved to regions (by the dataset audit) before use")
    return tuple(_parse_box(part.strip()) for part in text.split(";") if part.strip())


def regions_text(regions: Sequence[Region]) -> str:
    """The ``mask_regions`` text of ``regions``: fractions joined by ``;``, or ``none``."""
    return ";".join(region.to_text() for region in regions) or NO_REGIONS


def check_mask_setting(text: str) -> str:
    """``text`` if it is a valid ``mask_regions`` setting (``auto``, ``none`` or boxes), else ConfigError."""
    if isinstance(text, str) and text.strip().lower() == AUTO_REGIONS:
        return AUTO_REGIONS
    return regions_text(parse_regions(text))


def region_mask(regions: Sequence[Region], height: int, width: int) -> np.ndarray:
    """A (height, width) boolean array, True on every pixel of any region."""
    mask = np.zeros((height, width), dtype=bool)
    for region in regions:
        mask[region.pixels(height, width)] = True
    return mask


def paint_regions(images: np.ndarray, regions: Sequence[Region], *, chunk: int = 256) -> np.ndarray:
    """``images`` (n, h, w, 3) uint8 with every region painted in each image's median colour (per channel) outside
    the regions, so nothing of what they cover reaches the painted image (the whole image's median when the
    regions cover all of it).

    Returns the input itself when there is nothing to paint, else a new array (``chunk`` images at a time).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ConfigError(f"expected uint8 RGB images of shape (n, h, w, 3), got {images.dtype} {images.shape}")
    if not regions or not len(images):
        return images
    covered = region_mask(regions, *images.shape[1:3])
    outside = ~covered if not covered.all() else covered
    out = np.empty_like(images)
    for start in range(0, len(images), chunk):
        batch = images[start : start + chunk]
        median = np.median(batch[:, outside], axis=1).round().astype(np.uint8)
        out[start : start + chunk] = np.where(covered[None, :, :, None], median[:, None, None, :], batch)
    return out


def prepare_for_model(images: np.ndarray, config: SeenAs) -> np.ndarray:
    """Images as the model of a run with ``config`` sees them: its regions masked, then its colour mode applied.

    Every consumer of a run (training, evaluation, prediction, Grad-CAM, bundles) goes through here.
    """
    return apply_colour_mode(paint_regions(images, parse_regions(config.mask_regions)), config.colour)


def read_declared_regions(data_dir: str | os.PathLike) -> tuple[Region, ...]:
    """The regions the dataset at ``data_dir`` declares in its :data:`REGIONS_FILE`; ``()`` without one.

    DataError, naming the file, when it is malformed.
    """
    path = Path(data_dir) / REGIONS_FILE
    try:
        if not path.is_file():
            return ()
        if path.stat().st_size > MAX_REGIONS_FILE_BYTES:
            raise DataError(f"{path} is larger than {MAX_REGIONS_FILE_BYTES // 1024} KB; it is not a list of regions")
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} cannot be read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    entries = document.get("regions") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "box" in e for e in entries):
        raise DataError(f'{path}: expected {{"regions": [{{"name": ..., "box": "x0,y0,x1,y1"}}, ...]}}')
    try:
        return tuple(replace(_parse_box(str(e["box"])), name=str(e.get("name", "declared"))) for e in entries)
    except ConfigError as exc:
        raise DataError(f"{path}: {exc}") from exc


def _parse_box(text: str) -> Region:
    sized = _SIZE_SUFFIX.match(text)
    box = sized["box"] if sized else text
    try:
        values = [float(v) for v in box.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise ConfigError(f"a mask region is x0,y0,x1,y1 (fractions, or pixels with @WxH), got {text!r}")
    if sized:
        width = int(sized["width"])
        height = int(sized["height"] or width)
        if width < 1 or height < 1:
            raise ConfigError(f"a region's stated image size must be positive, got {text!r}")
        values = [values[0] / width, values[1] / height, values[2] / width, values[3] / height]
    elif max(values) > 1:
        raise ConfigError(f"region {text!r} has values above 1: give fractions, or pixels with the size (@WxH)")
    return Region(*values)


def _span(start: float, stop: float, length: int) -> slice:
    first = min(int(np.floor(start * length + 1e-9)), length - 1)
    return slice(first, max(first + 1, int(np.ceil(stop * length - 1e-9))))
