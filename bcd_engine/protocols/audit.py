"""Dataset audits: split leakage through duplicate groups, colour and corner shortcuts, colour robustness.

A shortcut audit trains a random forest on simple colour statistics, which know nothing of cell
morphology. If they separate the classes on a group-aware test split, a CNN can score well for the
wrong reason. :func:`audit_dataset` is what ``python -m bcd_engine audit --data DIR --json`` prints.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score

from bcd_engine.data.colour import NORMALISATION_METHODS, normalise_colour
from bcd_engine.data.images import load_images
from bcd_engine.data.regions import Region, read_declared_regions
from bcd_engine.data.scan import ScanResult, scan_dataset
from bcd_engine.data.shortcuts import (
    CORNER_FRACTION,
    chance_accuracy,
    colour_features,
    forest_accuracy,
    region_features,
    score_regions,
    shortcut_forest,
    well_above_chance,
)
from bcd_engine.data.shortcuts import N_COLOUR_FEATURES as N_COLOUR_FEATURES  # where the audits' users look
from bcd_engine.data.splits import (
    DEFAULT_FRACTION,
    SUBSETS,
    Split,
    holdout_split,
    split_from_assignments,
)
from bcd_engine.errors import ConfigError
from bcd_engine.store import RunStore

NO_PATIENT_IDS_WARNING = "no patient identifiers: image-level splits of one patient's fields are optimistic"


@dataclass(frozen=True)
class DatasetAudit:
    """What :func:`audit_dataset` reports: the hold-out split's :func:`leakage_audit` and the
    :func:`shortcut_audit`."""

    leakage: dict[str, Any]
    shortcuts: dict[str, Any]

    @property
    def ok(self) -> bool:
        """Whether no duplicate group crosses the split and no image is in two subsets."""
        return self.leakage["ok"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape ``audit --data DIR --json`` prints: ``{"leakage": {...}, "shortcuts": {...}}``."""
        return {"leakage": dict(self.leakage), "shortcuts": dict(self.shortcuts)}


def corner_features(images, *, fraction: float = CORNER_FRACTION) -> np.ndarray:
    """:func:`colour_features` of each image's bottom-right patch (``fraction`` of its height and width).

    That is where the ALL dataset's red scale-bar label sits; the patch also carries the stain's colour cast.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"corner fraction must be in (0, 1], got {fraction!r}")
    return region_features(images, Region(1 - fraction, 1 - fraction, 1, 1, "bottom-right corner"))


def leakage_audit(scan: ScanResult, assignments_or_split) -> dict[str, Any]:
    """Whether any exact or near-duplicate group of ``scan`` straddles two subsets of a split or CV fold.

    ``assignments_or_split`` is a :class:`Split`, a mapping {"train"/"val"/"test": indices}, stored
    assignment rows (dicts with "path" and "subset"), or CV folds as (train_idx, test_idx) pairs.
    Groups crossing subsets put copies of the same field on both sides and inflate test figures.
    """
    protocol, partitions = _partitions(scan, assignments_or_split)
    index_of = {path: i for i, path in enumerate(scan.paths)}
    kinds = (("exact", scan.duplicate_groups), ("near", scan.near_duplicate_groups))
    crossing: list[dict[str, Any]] = []
    overlapping = 0
    for fold, subsets in enumerate(partitions):
        subset_of: dict[int, str] = {}
        for name, indices in subsets.items():
            for i in np.asarray(indices, dtype=np.int64).tolist():
                overlapping += i in subset_of
                subset_of[i] = name
        for kind, groups in kinds:
            for group in groups:
                sides = sorted({subset_of[index_of[p]] for p in group if index_of[p] in subset_of})
                if len(sides) > 1:
                    entry = {"kind": kind, "subsets": sides, "paths": list(group)}
                    crossing.append({**entry, "fold": fold} if protocol == "cross-validation" else entry)
    warnings = [NO_PATIENT_IDS_WARNING]
    if crossing:
        warnings.append(
            f"{len(crossing)} duplicate group(s) cross subsets: the same field is on both sides, "
            "so test figures are inflated"
        )
    if overlapping:
        warnings.append(f"{overlapping} image assignment(s) put one image in two subsets of the same split")
    return {
        "protocol": protocol,
        "ok": not crossing and not overlapping,
        "n_images": scan.n_images,
        "n_folds": len(partitions),
        "subset_sizes": [{name: len(indices) for name, indices in subsets.items()} for subsets in partitions],
        "counts": {
            "exact_duplicate_groups": len(scan.duplicate_groups),
            "near_duplicate_groups": len(scan.near_duplicate_groups),
            "crossing_exact": sum(c["kind"] == "exact" for c in crossing),
            "crossing_near": sum(c["kind"] == "near" for c in crossing),
            "overlapping_assignments": overlapping,
        },
        "crossing_groups": crossing,
        "warnings": warnings,
    }


def run_leakage_audit(run_ids, *, store: RunStore) -> dict[str, Any]:
    """:func:`leakage_audit` of stored runs' splits (e.g. every fold of a CV): ``{"runs": [{"run_id", ...}], "ok"}``."""
    rows, scans = [], {}
    for run_id in run_ids:
        run = store.get_run(run_id)
        data_dir = run.config["data_dir"]
        scan = scans[data_dir] = scans.get(data_dir) or scan_dataset(data_dir)  # CV folds share one folder
        rows.append(
            {"run_id": run_id, "run_protocol": run.protocol.label, **leakage_audit(scan, store.get_split(run_id))}
        )
    return {"runs": rows, "ok": all(row["ok"] for row in rows)}


def holdout_data(
    scan: ScanResult,
    *,
    seed: int = 0,
    image_size: int = 64,
    progress: bool = False,
    val_fraction: float = DEFAULT_FRACTION,
    test_fraction: float = DEFAULT_FRACTION,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images (n, size, size, 3), labels, and the training (train + val) and test indices of a hold-out split.

    The split is :func:`holdout_split` with these fractions and ``seed``, the one ``train`` makes for a
    config with the same values; validation images join the training side because the audits tune nothing.
    """
    split = holdout_split(scan.labels, scan.groups, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    images = load_images(scan.paths, image_size=image_size, progress=progress, description="audit: loading")
    return images, scan.labels, np.sort(np.concatenate([split.train, split.val])), split.test


def shortcut_audit(
    scan: ScanResult,
    *,
    seed: int = 0,
    image_size: int = 64,
    progress: bool = False,
    val_fraction: float = DEFAULT_FRACTION,
    test_fraction: float = DEFAULT_FRACTION,
) -> dict[str, Any]:
    """Test accuracy of a random forest on whole-image colour statistics and on the bottom-right corner alone,
    and which corner or border regions alone predict the class.

    Corner statistics also carry the stain's colour cast, so the top-left corner of the same size is
    scored as a control (``opposite_corner_accuracy``). ``regions`` is :func:`score_regions` of every
    corner and border band (pixels without colour, so an overlay such as a label stands out; its
    ``flagged`` boxes are what ``train --mask-regions auto`` masks); ``declared_regions`` those the
    dataset's ``regions.json`` names. Each forest is trained on the train + val side of the group-aware
    holdout split and tested on its test side; ``chance_accuracy`` is the majority-class rate on the test side.
    """
    started = time.perf_counter()
    images, labels, train, test = holdout_data(
        scan,
        seed=seed,
        image_size=image_size,
        progress=progress,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
    chance = chance_accuracy(labels[test])
    colour = forest_accuracy(colour_features(images), labels, train, test, seed)
    corner = forest_accuracy(corner_features(images), labels, train, test, seed)
    opposite = forest_accuracy(corner_features(images[:, ::-1, ::-1]), labels, train, test, seed)
    regions = score_regions(images, labels, train, test, seed=seed)
    return {
        "colour_only_accuracy": colour,
        "corner_only_accuracy": corner,
        "opposite_corner_accuracy": opposite,
        "chance_accuracy": chance,
        "colour_shortcut": well_above_chance(colour, chance),
        "corner_shortcut": well_above_chance(corner, chance),
        "regions": regions.to_dict(),
        "declared_regions": [region.to_dict() for region in read_declared_regions(scan.root)],
        "n_train": len(train),
        "n_test": len(test),
        "image_size": image_size,
        "corner_fraction": CORNER_FRACTION,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 2),
        "interpretation": _interpretation(colour, corner, opposite, chance) + f" Regions: {regions.reason()}.",
    }


def audit_dataset(
    data_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    progress: bool = False,
    val_fraction: float = DEFAULT_FRACTION,
    test_fraction: float = DEFAULT_FRACTION,
) -> DatasetAudit:
    """Scan ``data_dir`` and audit it: leakage of the hold-out split for ``seed`` and the fractions, and shortcuts."""
    scan = scan_dataset(data_dir, progress=progress)
    fractions = {"val_fraction": val_fraction, "test_fraction": test_fraction}
    return DatasetAudit(
        leakage=leakage_audit(scan, holdout_split(scan.labels, scan.groups, seed=seed, **fractions)),
        shortcuts=shortcut_audit(scan, seed=seed, progress=progress, **fractions),
    )


def colour_robustness(
    scan: ScanResult, *, seed: int = 0, image_size: int = 64, progress: bool = False
) -> dict[str, Any]:
    """Colour-only random forest accuracy on the test split before and after colour normalisation.

    ``accuracy``: trained on original colours, tested on normalised test images (a fall shows the
    model relied on colour). ``retrained_accuracy``: trained and tested on normalised images (what
    colour statistics can still tell once the colour cast is removed). Reinhard's target comes from
    the training images.
    """
    started = time.perf_counter()
    images, labels, train, test = holdout_data(scan, seed=seed, image_size=image_size, progress=progress)
    features = colour_features(images)
    forest = shortcut_forest(seed).fit(features[train], labels[train])
    normalised = {}
    for method in NORMALISATION_METHODS:
        converted = normalise_colour(images, method=method, reference=images[train])
        converted_features = colour_features(converted)
        normalised[method] = {
            "accuracy": float(accuracy_score(labels[test], forest.predict(converted_features[test]))),
            "retrained_accuracy": forest_accuracy(converted_features, labels, train, test, seed),
        }
    return {
        "original_accuracy": float(accuracy_score(labels[test], forest.predict(features[test]))),
        "normalised": normalised,
        "chance_accuracy": chance_accuracy(labels[test]),
        "n_train": len(train),
        "n_test": len(test),
        "image_size": image_size,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _partitions(scan: ScanResult, value) -> tuple[str, list[dict[str, np.ndarray]]]:
    """("holdout" | "cross-validation", one {subset: indices} mapping per split or fold)."""
    if isinstance(value, Split):
        return "holdout", [{name: getattr(value, name) for name in SUBSETS}]
    if isinstance(value, Mapping):
        unknown = set(value) - set(SUBSETS)
        if unknown:
            raise ConfigError(f"split subsets must be among {SUBSETS}, got {sorted(unknown)}")
        return "holdout", [{name: _indices(scan, idx) for name, idx in value.items()}]
    if isinstance(value, Sequence) and value and all(isinstance(row, Mapping) for row in value):
        return _partitions(scan, split_from_assignments(scan, value))
    pairs = isinstance(value, Sequence) and value and all(isinstance(f, (tuple, list)) and len(f) == 2 for f in value)
    if pairs:
        return "cross-validation", [{"train": _indices(scan, tr), "test": _indices(scan, te)} for tr, te in value]
    raise ConfigError(
        "expected a Split, a {subset: indices} mapping, assignment rows with path and subset, "
        "or CV folds as (train_idx, test_idx) pairs"
    )


def _indices(scan: ScanResult, indices) -> np.ndarray:
    out = np.asarray(indices, dtype=np.int64).ravel()
    if out.size and (out.min() < 0 or out.max() >= scan.n_images):
        raise ConfigError(f"split indices must be from 0 to {scan.n_images - 1}")
    return out


def _interpretation(colour: float, corner: float, opposite: float, chance: float) -> str:
    if well_above_chance(colour, chance):
        text = (
            f"Colour statistics alone classify {colour:.1%} of test images (chance {chance:.1%}): the classes "
            "differ in colour, so a model can score well without looking at cell morphology."
        )
    else:
        text = f"Colour statistics alone reach {colour:.1%} (chance {chance:.1%}): no strong colour shortcut."
    return text + (
        f" The bottom-right corner (scale-bar label) alone gives {corner:.1%}, the top-left corner of the same "
        f"size {opposite:.1%}: the difference is what the label adds beyond colour and content."
    )
