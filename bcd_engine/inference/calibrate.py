"""Fitting the OOD gate and the temperature of a run trained before bcd fitted them (or fitting them again).

Uses the split the store recorded for the run: the gate on its training images, its threshold on held-out
scores of its validation and training images, the temperature on its validation images, and both measured on its
test images, exactly as training does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from bcd_engine.errors import DataError, StoreError
from bcd_engine.inference.loading import load_run_model
from bcd_engine.inference.predict import predict_proba
from bcd_engine.inference.trust import fit_trust, load_split_images, save_trust
from bcd_engine.store import RunStore


@dataclass(frozen=True)
class CalibrationResult:
    """What :func:`calibrate_run` reports: the test ECE before (``ece``, None when the evaluation has none) and
    after calibration with ``temperature``, the out-of-domain gate's threshold, the share of in-domain images it
    is set to pass and the test images it flags, and the number of images in each subset of the split."""

    run_id: int
    ece: float | None
    temperature: float
    ece_calibrated: float
    ood_threshold: float
    ood_pass_rate: float
    ood_flagged: int
    ood_flagged_share: float
    images: dict[str, int]  # train, val, test

    def to_dict(self) -> dict:
        """The JSON shape ``calibrate --json`` prints: the fields in their order."""
        return asdict(self)


def calibrate_run(run_id: int, *, store: RunStore, progress: bool = False) -> CalibrationResult:
    """Fit and save run ``run_id``'s gate and temperature from its recorded split; the figures training would
    have stored with its test evaluation (added to it), with the test ECE before calibration beside them."""
    loaded = load_run_model(run_id, store=store)
    rows = store.get_split(run_id)
    subsets = {row["subset"] for row in rows}
    if not {"train", "test"} <= subsets:
        raise StoreError(f"run {run_id} has no recorded train/test split (subsets: {sorted(subsets) or 'none'})")
    paths = [row["path"] for row in rows]
    missing = [path for path in paths if not Path(path).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(paths)} images run {run_id} was trained on are missing "
            f"(first: {missing[0]}); calibrate where its dataset is"
        )
    labels = np.array([loaded.class_names.index(row["class_name"]) for row in rows])
    index = {
        name: np.array([i for i, row in enumerate(rows) if row["subset"] == name], dtype=int)
        for name in ("train", "val", "test")
    }
    evaluation = store.latest_evaluation(run_id)
    if evaluation is None:
        raise StoreError(f"run {run_id} has no test evaluation")
    stored = {p.path: p.probabilities for p in store.get_predictions(evaluation.id)}
    test_paths = [paths[i] for i in index["test"]]
    if any(path not in stored for path in test_paths):
        raise StoreError(f"run {run_id}'s test evaluation does not cover its test split")
    images = load_split_images(paths, image_size=loaded.config.image_size, seen_as=loaded.config, progress=progress)
    config = loaded.config
    val_answers = None
    if config.tta_views > 1 and len(index["val"]):  # the temperature is fitted on answers made as the test's are
        val_answers = predict_proba(
            loaded.model,
            images[index["val"]],
            preprocess=loaded.preprocess(),
            batch_size=config.batch_size,
            augment=config.augment,
            tta_views=config.tta_views,
            seed=config.seed,
        )
    trust, metrics = fit_trust(
        loaded.model,
        images,
        labels,
        train=index["train"],
        val=index["val"],
        test=index["test"],
        test_probabilities=np.array([stored[p] for p in test_paths]),
        preprocess=loaded.preprocess(),
        batch_size=loaded.config.batch_size,
        val_probabilities=val_answers,
    )
    save_trust(trust, run_id, store=store)
    store.add_evaluation_metrics(evaluation.id, metrics)
    return CalibrationResult(
        run_id=run_id,
        ece=evaluation.metrics.get("ece"),
        **{field.name: metrics[field.name] for field in fields(CalibrationResult) if field.name in metrics},
        images={name: len(found) for name, found in index.items()},
    )
