"""Occlusion audit of a run: which parts of its test images its accuracy depends on.

Each cell of a coarse grid is painted over in the image's median colour in turn (as the run's masked
regions are, :func:`bcd_engine.data.regions.paint_regions`) and the run's test split predicted again;
a cell whose masking costs accuracy is a part the model reads. Beside the grid: the accuracy with the
regions the dataset audit flags (or the dataset declares) masked, with the run's own test-time views
and stored with the run as the evaluation ``test (flagged regions masked)``, so a shortcut shows up as a
gap beside the accuracy as trained; and the share of Grad-CAM heat on the image's border and on those
regions. The grid and the heat use one view per image (no test-time augmentation), so that each masked
accuracy is compared with the one-view accuracy of the same images (``one_view``).
``python -m bcd_engine audit --run N --occlusion --json`` prints :meth:`OcclusionAudit.to_dict`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from bcd_engine.data.images import load_images
from bcd_engine.data.regions import Region, paint_regions, parse_regions, regions_text
from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.splits import split_from_assignments
from bcd_engine.errors import ConfigError
from bcd_engine.evaluation.confidence import bootstrap_ci
from bcd_engine.evaluation.metrics import evaluate_probabilities
from bcd_engine.inference.explain import explain_image, heat_share
from bcd_engine.inference.loading import load_run_model
from bcd_engine.store import TEST_EVALUATION, EvaluationRecord, RunStore, latest_evaluation
from bcd_engine.training.masking import auto_mask

DEFAULT_GRID = 4
MAX_GRID = 8
DEFAULT_HEAT_IMAGES = 64  # Grad-CAMs averaged for the heat shares (evenly spread over the test split)
MASKED_EVALUATION = "test (flagged regions masked)"
GRAYSCALE_EVALUATION, REINHARD_EVALUATION = "test (grayscale)", "test (reinhard)"  # stored by colour robustness
OCCLUSION_KEY = "occlusion"  # where a run's config keeps its latest occlusion audit


@dataclass(frozen=True)
class Accuracy:
    """An accuracy with its 95% bootstrap interval (groups of near-duplicates resampled together)."""

    estimate: float
    low: float | None
    high: float | None

    @classmethod
    def of(cls, y_true: np.ndarray, y_prob: np.ndarray, *, groups: np.ndarray) -> Accuracy:
        ci = bootstrap_ci(y_true, y_prob, metric="accuracy", groups=groups)
        return cls(ci["estimate"], ci["low"], ci["high"])

    @classmethod
    def from_dict(cls, data: dict) -> Accuracy:
        return cls(data["estimate"], data.get("low"), data.get("high"))

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class OccludedCell:
    """One grid cell masked: its place (row, column from the top left), its box and the one-view accuracy left."""

    row: int
    col: int
    region: Region
    accuracy: Accuracy
    drop: float  # one-view accuracy of the unmasked images minus this one

    def to_dict(self) -> dict:
        return {
            "row": self.row,
            "col": self.col,
            "box": self.region.to_text(),
            "accuracy": self.accuracy.to_dict(),
            "drop": self.drop,
        }


@dataclass(frozen=True)
class HeatOnRegions:
    """Mean share of Grad-CAM heat over ``n_images`` test images: on the border band, in the bottom-right corner and
    on the flagged regions together (each beside the share of the image it covers)."""

    n_images: int
    border: float
    border_area: float
    label_corner: float
    flagged: float
    flagged_area: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class OcclusionAudit:
    """What :func:`occlusion_audit` measured for one run."""

    run_id: int
    n_test: int
    grid: int
    n_grid_images: int  # test images the grid and the one-view accuracy are measured on (evenly spread)
    one_view: Accuracy  # those images unmasked, one view each
    cells: tuple[OccludedCell, ...]  # row by row
    flagged_regions: tuple[Region, ...]
    flagged_reason: str
    masked_by_run: str  # the run's own mask_regions ("none" when it trained on whole images)
    as_trained: Accuracy | None  # the run's stored test evaluation (its test-time views)
    flagged_masked: Accuracy | None  # the same views with the flagged regions masked; None when nothing is flagged
    heat: HeatOnRegions | None
    seconds: float

    @property
    def peak(self) -> OccludedCell:
        """The cell whose masking costs the most accuracy."""
        return max(self.cells, key=lambda cell: cell.drop)

    @property
    def flagged_drop(self) -> float | None:
        """Accuracy as trained minus accuracy with the flagged regions masked (a shortcut's share of the score)."""
        if self.as_trained is None or self.flagged_masked is None:
            return None
        return self.as_trained.estimate - self.flagged_masked.estimate

    def drop_grid(self) -> list[list[float]]:
        """The accuracy drops as ``grid`` rows of ``grid`` values (what the heat grid draws)."""
        return [[cell.drop for cell in self.cells[r * self.grid : (r + 1) * self.grid]] for r in range(self.grid)]

    def summary(self) -> str:
        """One line in words: the largest cell drop and the flagged regions' gap."""
        peak = self.peak
        text = (
            f"masking grid cell row {peak.row + 1}, column {peak.col + 1} of {self.grid}x{self.grid} costs the most: "
            f"{peak.drop:+.1%} (one view, {self.one_view.estimate:.1%} unmasked)"
        )
        if self.flagged_drop is not None:
            text += (
                f"; with the flagged regions masked the run scores {self.flagged_masked.estimate:.1%} against "
                f"{self.as_trained.estimate:.1%} as trained ({-self.flagged_drop:+.1%})"
            )
        return text

    def to_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "n_test": self.n_test,
            "grid": self.grid,
            "n_grid_images": self.n_grid_images,
            "one_view_accuracy": self.one_view.to_dict(),
            "cells": [cell.to_dict() for cell in self.cells],
            "peak": {"row": self.peak.row, "col": self.peak.col, "drop": self.peak.drop},
            "flagged_regions": [region.to_dict() for region in self.flagged_regions],
            "flagged_reason": self.flagged_reason,
            "masked_by_run": self.masked_by_run,
            "accuracy_as_trained": None if self.as_trained is None else self.as_trained.to_dict(),
            "accuracy_flagged_masked": None if self.flagged_masked is None else self.flagged_masked.to_dict(),
            "flagged_drop": self.flagged_drop,
            "heat": None if self.heat is None else self.heat.to_dict(),
            "seconds": self.seconds,
            "summary": self.summary(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> OcclusionAudit:
        """The audit a run's config keeps (:data:`OCCLUSION_KEY`), as :meth:`to_dict` wrote it."""
        grid = data["grid"]
        cells = tuple(
            OccludedCell(c["row"], c["col"], parse_regions(c["box"])[0], Accuracy.from_dict(c["accuracy"]), c["drop"])
            for c in data["cells"]
        )
        flagged = tuple(Region(r["x0"], r["y0"], r["x1"], r["y1"], r.get("name", "")) for r in data["flagged_regions"])

        def maybe(key: str) -> Accuracy | None:
            return None if data.get(key) is None else Accuracy.from_dict(data[key])

        heat = None if data.get("heat") is None else HeatOnRegions(**data["heat"])
        return cls(
            data["run_id"],
            data["n_test"],
            grid,
            data["n_grid_images"],
            Accuracy.from_dict(data["one_view_accuracy"]),
            cells,
            flagged,
            data["flagged_reason"],
            data["masked_by_run"],
            maybe("accuracy_as_trained"),
            maybe("accuracy_flagged_masked"),
            heat,
            data["seconds"],
        )


def grid_cells(grid: int) -> tuple[Region, ...]:
    """The ``grid`` x ``grid`` cells of an image, row by row from the top left."""
    if isinstance(grid, bool) or not isinstance(grid, int) or not 2 <= grid <= MAX_GRID:
        raise ConfigError(f"the occlusion grid must be 2 to {MAX_GRID} cells a side, got {grid!r}")
    return tuple(
        Region(c / grid, r / grid, (c + 1) / grid, (r + 1) / grid, f"cell row {r + 1}, column {c + 1}")
        for r in range(grid)
        for c in range(grid)
    )


def occlusion_audit(
    run_id: int,
    *,
    store: RunStore,
    grid: int = DEFAULT_GRID,
    grid_images: int | None = None,
    heat_images: int = DEFAULT_HEAT_IMAGES,
    progress: bool = False,
) -> OcclusionAudit:
    """Occlusion audit of run ``run_id`` on its stored test split (see the module's docstring).

    The flagged regions are those ``mask_regions=auto`` masks for the run's split (the region audit of
    its training and validation images, and the dataset's declared regions), also for a run trained with
    ``none``. The accuracy with them masked is stored as the run's ``test (flagged regions masked)``
    evaluation and the whole audit in the run's config (``"occlusion"``), where Compare, ``runs`` and the
    model card read it. ``grid_images`` (default: all) measures the grid on that many test images, evenly
    spread, to bound its cost (one pass over them per cell); the flagged regions are measured on all.
    """
    cells = grid_cells(grid)
    for name, value in (("grid images", grid_images), ("heat images", heat_images)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"{name} must be a whole number >= 0, got {value!r}")
    started = time.perf_counter()
    loaded = load_run_model(run_id, store=store)
    run = store.get_run(run_id)
    scan = scan_dataset(run.config["data_dir"], progress=progress)
    split = split_from_assignments(scan, store.get_split(run_id))
    test = split.test
    if not len(test):
        raise ConfigError(f"run {run_id} has no test images to occlude")
    labels, groups = scan.labels[test], scan.groups[test]
    paths = [scan.paths[i] for i in test]
    images = load_images(paths, image_size=loaded.config.image_size, progress=progress, description="test images")
    decision = auto_mask(scan, split, seed=loaded.config.seed)

    sample = _spread(len(test), len(test) if grid_images is None else max(1, grid_images))

    def one_view(masked: np.ndarray) -> Accuracy:
        return Accuracy.of(labels[sample], loaded.forward(masked), groups=groups[sample])

    unmasked = one_view(images[sample])
    occluded = []
    for k, region in enumerate(cells):
        accuracy = one_view(paint_regions(images[sample], [region]))
        occluded.append(OccludedCell(k // grid, k % grid, region, accuracy, unmasked.estimate - accuracy.estimate))

    stored = latest_evaluation(store.get_evaluations(run_id), TEST_EVALUATION)
    as_trained = None if stored is None else Accuracy.from_dict(stored.metrics["confidence_intervals"]["accuracy"])
    flagged_masked = None
    if decision.regions:
        probabilities = loaded.predict_arrays(
            paint_regions(images, decision.regions),
            image_keys=[scan.images[i].md5 for i in test],
            progress=progress,
        )
        evaluation = evaluate_probabilities(labels, probabilities, class_names=list(scan.class_names), groups=groups)
        store.save_scored_evaluation(
            run_id,
            evaluation,
            name=MASKED_EVALUATION,
            data_dir=scan.root,
            paths=paths,
            y_true=labels,
            y_prob=probabilities,
        )
        flagged_masked = Accuracy.from_dict(evaluation.metrics["confidence_intervals"]["accuracy"])

    audit = OcclusionAudit(
        run_id=run_id,
        n_test=len(test),
        grid=grid,
        n_grid_images=len(sample),
        one_view=unmasked,
        cells=tuple(occluded),
        flagged_regions=decision.regions,
        flagged_reason=decision.reason,
        masked_by_run=regions_text(parse_regions(loaded.config.mask_regions)),
        as_trained=as_trained,
        flagged_masked=flagged_masked,
        heat=_heat(loaded, images, decision.regions, heat_images),
        seconds=round(time.perf_counter() - started, 2),
    )
    store.update_run_config(run_id, {**store.get_run(run_id).config, OCCLUSION_KEY: audit.to_dict()})
    return audit


@dataclass(frozen=True)
class WithAndWithout:
    """A run's test accuracy as trained beside its accuracy without each known shortcut of the images: the flagged
    regions masked (this audit) and the colour taken away (the ``robustness`` command). None where not measured."""

    as_trained: float | None
    flagged_masked: float | None
    grayscale: float | None
    reinhard: float | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def with_and_without(evaluations: list[EvaluationRecord]) -> WithAndWithout:
    """:class:`WithAndWithout` from a run's stored evaluations (the latest of each name)."""

    def accuracy(name: str) -> float | None:
        found = latest_evaluation(evaluations, name)
        return None if found is None else found.metrics.get("accuracy")

    return WithAndWithout(
        accuracy(TEST_EVALUATION),
        accuracy(MASKED_EVALUATION),
        accuracy(GRAYSCALE_EVALUATION),
        accuracy(REINHARD_EVALUATION),
    )


def stored_occlusion(config: dict) -> OcclusionAudit | None:
    """The latest occlusion audit a run's ``config`` keeps; None when it was never audited."""
    found = config.get(OCCLUSION_KEY)
    return None if found is None else OcclusionAudit.from_dict(found)


def _heat(loaded, images: np.ndarray, regions: tuple[Region, ...], n_images: int) -> HeatOnRegions | None:
    """Mean Grad-CAM heat shares over up to ``n_images`` of ``images``, evenly spread."""
    if not n_images:
        return None
    chosen = _spread(len(images), n_images)
    shares = [heat_share(explain_image(loaded, images[i]).heatmap, regions=regions) for i in chosen]
    return HeatOnRegions(
        n_images=len(chosen),
        border=float(np.mean([s.border.heat for s in shares])),
        border_area=shares[0].border.area,
        label_corner=float(np.mean([s.label_corner.heat for s in shares])),
        flagged=float(np.mean([sum(r.heat for r in s.regions) for s in shares])),
        flagged_area=float(sum(r.area for r in shares[0].regions)),
    )


def _spread(n: int, k: int) -> np.ndarray:
    """Up to ``k`` of the indices 0..n-1, evenly spread (all of them when ``k >= n``)."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))
