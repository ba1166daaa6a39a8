"""Colour robustness of a trained run: how much accuracy it keeps when stain colour is taken away.

The run's own test split is normalised (grayscale, Reinhard) and predicted again; beside it, a
colour-only classifier trained on the run's training images is tested on the same normalised images.
A model that reads cell morphology keeps its accuracy; the colour-only baseline should fall, and what
it keeps measures the acquisition cues that survive normalisation (brightness, focus).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score

from bcd_engine.data.colour import NORMALISATION_METHODS, normalise_colour
from bcd_engine.data.images import load_images
from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.splits import split_from_assignments
from bcd_engine.evaluation.metrics import evaluate_probabilities
from bcd_engine.inference.loading import load_run_model
from bcd_engine.protocols.audit import colour_features, shortcut_forest
from bcd_engine.store import TEST_EVALUATION, RunStore

BASELINE_IMAGE_SIZE = 64  # the colour-only baseline's image size (as in the shortcut audit)


def colour_robustness_of_run(
    run_id: int, *, methods=NORMALISATION_METHODS, store: RunStore, seed: int = 0, progress: bool = False
) -> dict:
    """Accuracy of run ``run_id`` and of a colour-only baseline on its test split, original and normalised.

    Each normalised evaluation is stored with the run as ``test (<method>)``. Reinhard's target
    statistics come from the run's training images. Returns ``{"run_id", "protocol", "n_test",
    "original": {"model_accuracy", "colour_only_accuracy"}, "normalised": {method: {...}}}``, each
    model accuracy with its 95% bootstrap interval.
    """
    loaded = load_run_model(run_id, store=store)
    run = store.get_run(run_id)
    scan = scan_dataset(run.config["data_dir"], progress=progress)
    split = split_from_assignments(scan, store.get_split(run_id))
    labels = scan.labels
    paths = list(scan.paths)

    test_keys = [scan.images[i].md5 for i in split.test]
    size = loaded.config.image_size
    test_images = load_images(
        [paths[i] for i in split.test], image_size=size, progress=progress, description="test images"
    )
    train_reference = load_images(
        [paths[i] for i in split.train[:: max(1, len(split.train) // 256)]],
        image_size=size,
        description="Reinhard reference",
    )
    small = load_images(paths, image_size=BASELINE_IMAGE_SIZE, progress=progress, description="baseline images")
    forest = shortcut_forest(seed).fit(colour_features(small[split.train]), labels[split.train])

    def measure(images: np.ndarray, small_images: np.ndarray, name: str) -> dict:
        probabilities = loaded.predict_arrays(images, image_keys=test_keys, progress=progress)
        evaluation = evaluate_probabilities(
            labels[split.test], probabilities, class_names=list(scan.class_names), groups=scan.groups[split.test]
        )
        if name != TEST_EVALUATION:
            store.save_scored_evaluation(
                run_id,
                evaluation,
                name=name,
                data_dir=scan.root,
                paths=[paths[i] for i in split.test],
                y_true=labels[split.test],
                y_prob=probabilities,
            )
        return {
            "model_accuracy": evaluation.accuracy,
            "model_accuracy_ci": evaluation.metrics["confidence_intervals"]["accuracy"],
            "colour_only_accuracy": float(
                accuracy_score(labels[split.test], forest.predict(colour_features(small_images)))
            ),
        }

    result = {
        "run_id": run_id,
        "backbone": loaded.config.backbone,
        "colour_mode": loaded.config.colour,
        "protocol": run.protocol.label,
        "n_test": len(split.test),
        "original": measure(test_images, small[split.test], TEST_EVALUATION),
        "normalised": {},
    }
    for method in methods:
        reinhard = method == "reinhard"
        result["normalised"][method] = measure(
            normalise_colour(test_images, method=method, reference=train_reference if reinhard else None),
            normalise_colour(small[split.test], method=method, reference=small[split.train] if reinhard else None),
            f"test ({method})",
        )
    return result
