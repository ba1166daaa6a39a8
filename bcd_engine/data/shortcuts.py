"""Shortcut detectors: features that know nothing of cells, and which image regions alone predict the class.

:func:`colour_features` are colour statistics of a whole image; a seeded random forest
(:func:`shortcut_forest`) trained on them shows how far the class can be told without cell morphology.
:func:`score_regions` looks for an overlay (a scale-bar label, a stamp) instead: a forest on each corner's
and border band's pixels alone, in grayscale relative to the image's median and contrast, so the stain's
colour cast and brightness (which every region carries alike) are taken out and what is left is content
at a fixed place. On the ALL dataset the bottom-right corner (its label) scores 85.5%, the other corners
59-67% (``audit --data``, seed 0). The dataset audit reports it; training with ``mask_regions=auto`` masks
what it flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import accuracy_score

from bcd_engine.data.regions import Region
from bcd_engine.errors import ConfigError

HIST_BINS = 16
N_COLOUR_FEATURES = 6 + 3 * HIST_BINS
CORNER_FRACTION = 0.25  # a corner region is this share of the width and of the height
BAND_FRACTION = 0.125  # a border band is this share of the height (top, bottom) or width (left, right)
LAYOUT_SIZE = 32  # pixels a side the region scores look at: an overlay survives, cell detail mostly does not
FLAG_MARGIN = 0.1  # a flagged region beats the median region by at least this much accuracy
SAME_SIGNAL = 0.05  # a band scoring within this of a flagged corner inside it carries that corner's signal
_N_TREES = 200
_REGION_TREES = 100

CANDIDATE_REGIONS: tuple[Region, ...] = (
    Region(0, 0, CORNER_FRACTION, CORNER_FRACTION, "top-left corner"),
    Region(1 - CORNER_FRACTION, 0, 1, CORNER_FRACTION, "top-right corner"),
    Region(0, 1 - CORNER_FRACTION, CORNER_FRACTION, 1, "bottom-left corner"),
    Region(1 - CORNER_FRACTION, 1 - CORNER_FRACTION, 1, 1, "bottom-right corner"),
    Region(0, 0, 1, BAND_FRACTION, "top band"),
    Region(0, 1 - BAND_FRACTION, 1, 1, "bottom band"),
    Region(0, 0, BAND_FRACTION, 1, "left band"),
    Region(1 - BAND_FRACTION, 0, 1, 1, "right band"),
)


@dataclass(frozen=True)
class RegionScore:
    """How well one region alone predicts the class (a random forest on its :func:`layout_features`)."""

    region: Region
    accuracy: float
    flagged: bool

    def to_dict(self) -> dict:
        return {
            "region": self.region.name,
            "box": self.region.to_text(),
            "accuracy": self.accuracy,
            "flagged": self.flagged,
        }


@dataclass(frozen=True)
class RegionAudit:
    """Every candidate region's score on one split, and the regions flagged as shortcuts."""

    scores: tuple[RegionScore, ...]
    chance_accuracy: float
    median_accuracy: float
    n_fit: int
    n_scored: int

    @property
    def flagged(self) -> tuple[Region, ...]:
        """The flagged regions: what ``mask_regions=auto`` masks."""
        return tuple(score.region for score in self.scores if score.flagged)

    def reason(self) -> str:
        """One line saying which regions are flagged and why (what a run's log and the audit print)."""
        if not self.flagged:
            return (
                f"no corner or border region alone predicts the class (best "
                f"{max(s.accuracy for s in self.scores):.1%}, chance {self.chance_accuracy:.1%})"
            )
        flagged = [score for score in self.scores if score.flagged]
        named = " and the ".join(f"{score.region.name} ({score.accuracy:.1%})" for score in flagged)
        return (
            f"the {named} alone {'predicts' if len(flagged) == 1 else 'predict'} the class (chance "
            f"{self.chance_accuracy:.1%}, median region {self.median_accuracy:.1%}; a random forest on its pixels "
            f"without colour, {self.n_fit} images fitted, {self.n_scored} scored)"
        )

    @classmethod
    def from_dict(cls, data: dict) -> RegionAudit:
        """The audit its :meth:`to_dict` describes (KeyError or ConfigError for another document)."""
        scores = tuple(
            RegionScore(
                Region(*(float(v) for v in entry["box"].split(",")), entry["region"]),
                float(entry["accuracy"]),
                bool(entry["flagged"]),
            )
            for entry in data["regions"]
        )
        return cls(
            scores, float(data["chance_accuracy"]), float(data["median_accuracy"]), data["n_fit"], data["n_scored"]
        )

    def to_dict(self) -> dict:
        return {
            "regions": [score.to_dict() for score in self.scores],
            "flagged": [region.to_text() for region in self.flagged],
            "chance_accuracy": self.chance_accuracy,
            "median_accuracy": self.median_accuracy,
            "n_fit": self.n_fit,
            "n_scored": self.n_scored,
            "reason": self.reason(),
        }


def colour_features(images) -> np.ndarray:
    """Per image: RGB channel means and standard deviations (0..1 scale) and a 16-bin histogram per channel.

    ``images`` is an (n, h, w, 3) uint8 array or a sequence of (h, w, 3) uint8 arrays; returns
    (n, N_COLOUR_FEATURES = 54).
    """
    if not len(images):
        return np.empty((0, N_COLOUR_FEATURES))
    return np.stack([_colour_stats(np.asarray(image)) for image in images])


def region_features(images, region: Region) -> np.ndarray:
    """:func:`colour_features` of ``region`` of each image."""
    crops = []
    for image in images:
        image = np.asarray(image)
        crops.append(image[region.pixels(*image.shape[:2])])
    return colour_features(crops)


def layout_features(images) -> np.ndarray:
    """(n, 32, 32) float32: each image at LAYOUT_SIZE px in grayscale, less its median, over its standard deviation.

    What stays is where light and dark things are, not their colour or the image's brightness and contrast.
    """
    small = (
        np.stack(
            [
                np.asarray(
                    Image.fromarray(np.asarray(image)).resize((LAYOUT_SIZE, LAYOUT_SIZE), Image.Resampling.BOX),
                    dtype=np.float32,
                )
                for image in images
            ]
        )
        if len(images)
        else np.zeros((0, LAYOUT_SIZE, LAYOUT_SIZE, 3), np.float32)
    )
    gray = small @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    flat = gray.reshape(len(gray), -1)
    spread = np.maximum(flat.std(axis=1), 1e-3)[:, None, None]
    return (gray - np.median(flat, axis=1)[:, None, None]) / spread


def shortcut_forest(seed: int) -> RandomForestClassifier:
    """The random forest every shortcut test uses (seeded, all cores)."""
    return RandomForestClassifier(n_estimators=_N_TREES, random_state=seed, n_jobs=-1)


def forest_accuracy(features: np.ndarray, labels: np.ndarray, fit: np.ndarray, scored: np.ndarray, seed: int) -> float:
    """Accuracy on ``scored`` of :func:`shortcut_forest` fitted on ``fit`` (index arrays into features, labels)."""
    forest = shortcut_forest(seed).fit(features[fit], labels[fit])
    return float(accuracy_score(labels[scored], forest.predict(features[scored])))


def chance_accuracy(labels: np.ndarray) -> float:
    """The majority-class rate of ``labels``."""
    return float(np.bincount(labels).max() / len(labels))


def well_above_chance(accuracy: float, chance: float) -> bool:
    """At least halfway from chance to perfect."""
    return accuracy >= chance + 0.5 * (1 - chance)


def score_regions(
    images,
    labels: np.ndarray,
    fit: np.ndarray,
    scored: np.ndarray,
    *,
    seed: int = 0,
    regions: Sequence[Region] = CANDIDATE_REGIONS,
) -> RegionAudit:
    """Score each of ``regions`` alone: a forest fitted on the ``fit`` images' region pixels
    (:func:`layout_features`), tested on the ``scored`` ones.

    A region is flagged when it is well above chance (halfway from chance to perfect) and at least
    ``FLAG_MARGIN`` above the median region: cells and smear are everywhere, an overlay is in one place.
    A border band is not flagged when a flagged corner inside it scores within ``SAME_SIGNAL`` of it:
    the corner is the smaller mask for the same signal.
    """
    labels = np.asarray(labels)
    fit, scored = np.asarray(fit, dtype=np.int64), np.asarray(scored, dtype=np.int64)
    if not len(fit) or not len(scored):
        raise ConfigError("scoring regions needs images to fit on and images to score")
    layout = layout_features(images)
    chance = chance_accuracy(labels[scored])
    accuracies = []
    for region in regions:
        rows, cols = region.pixels(LAYOUT_SIZE, LAYOUT_SIZE)
        features = layout[:, rows, cols].reshape(len(layout), -1)
        forest = RandomForestClassifier(n_estimators=_REGION_TREES, random_state=seed, n_jobs=-1)
        forest.fit(features[fit], labels[fit])
        accuracies.append(float(accuracy_score(labels[scored], forest.predict(features[scored]))))
    median = float(np.median(accuracies))
    candidate = [well_above_chance(a, chance) and a >= median + FLAG_MARGIN for a in accuracies]
    flagged = []
    for i, region in enumerate(regions):
        explained = any(
            candidate[j]
            and other.area < region.area
            and other.overlaps(region)
            and accuracies[j] >= accuracies[i] - SAME_SIGNAL
            for j, other in enumerate(regions)
        )
        flagged.append(candidate[i] and not explained)
    scores = tuple(RegionScore(r, a, f) for r, a, f in zip(regions, accuracies, flagged))
    return RegionAudit(scores, chance, median, n_fit=len(fit), n_scored=len(scored))


def _colour_stats(image: np.ndarray) -> np.ndarray:
    """Means, standard deviations (0..1) and normalised 16-bin histograms of one (h, w, 3) uint8 image."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or image.size == 0:
        raise ConfigError(f"expected a non-empty (h, w, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    pixels = image.reshape(-1, 3)
    bins = (pixels >> 4).astype(np.int64) + HIST_BINS * np.arange(3)
    hist = np.bincount(bins.ravel(), minlength=3 * HIST_BINS) / len(pixels)
    scaled = pixels / 255.0
    return np.concatenate([scaled.mean(axis=0), scaled.std(axis=0), hist])
