"""External evaluation: a trained run on another folder, with a label map when the class names differ."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from bcd_engine.data.images import load_images
from bcd_engine.data.scan import scan_dataset
from bcd_engine.errors import (
    DataError,
)
from bcd_engine.evaluation.metrics import Evaluation, evaluate_probabilities
from bcd_engine.inference.loading import load_run_model
from bcd_engine.store import RunStore


def load_label_map(path: str | os.PathLike) -> dict:
    """Read a label map: JSON ``{"run": {run class: shared label}, "data": {folder class: shared label}}``.

    Either part may be left out (identity). Example mapping the ALL classes onto benign/malignant and
    a folder of normal lymphocytes onto benign::

        {"run": {"Benign": "benign", "Early": "malignant", "Pre": "malignant", "Pro": "malignant"},
         "data": {"lymphocyte": "benign"}}
    """
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read label map {path}: {exc}") from exc
    if (
        not isinstance(mapping, dict)
        or set(mapping) - {"run", "data"}
        or not all(
            isinstance(part, dict) and all(isinstance(v, str) for v in part.values()) for part in mapping.values()
        )
    ):
        raise DataError(f'label map {path} must be {{"run": {{class: label}}, "data": {{class: label}}}}')
    return mapping


def evaluate_run_on_folder(
    run_id: int,
    data_dir: str | os.PathLike,
    *,
    store: RunStore,
    label_map: dict | None = None,
    progress: bool = False,
    evaluation_name: str = "external",
) -> Evaluation:
    """External validation: the run's model on every readable image of another folder.

    Without ``label_map`` the folder's class names must be among the run's. With one (see
    :func:`load_label_map`) both sides are mapped onto shared labels and a shared label's probability
    is the sum of its run classes' probabilities; a folder with one class is allowed (its accuracy is
    then one minus the rate of wrong shared labels, e.g. the false-malignant rate of benign images).
    The evaluation is stored under ``evaluation_name``, with how many images the run's out-of-domain gate
    flagged (``ood_flagged``, ``ood_flagged_share``) when it has one; the metrics cover every image.
    """
    loaded = load_run_model(run_id, store=store)
    scan = scan_dataset(data_dir, progress=progress, allow_single_class=True)
    run_map = {name: (label_map or {}).get("run", {}).get(name, name) for name in loaded.class_names}
    data_map = {name: (label_map or {}).get("data", {}).get(name, name) for name in scan.class_names}
    class_names = list(dict.fromkeys(run_map.values()))
    unknown = sorted({label for label in data_map.values() if label not in class_names})
    if unknown:
        raise DataError(
            f"class names of {data_dir} ({', '.join(scan.class_names)}) differ from run {run_id}'s "
            f"({', '.join(class_names)}): unknown {', '.join(unknown)}; pass a label map to relate them"
        )
    images = load_images(list(scan.paths), image_size=loaded.config.image_size, progress=progress)
    y_true = np.array([class_names.index(data_map[scan.class_names[k]]) for k in scan.labels])
    merge = np.array([[run_map[run_class] == label for label in class_names] for run_class in loaded.class_names])
    y_prob = loaded.predict_arrays(images, image_keys=[r.md5 for r in scan.images], progress=progress) @ merge
    evaluation = evaluate_probabilities(y_true, y_prob, class_names=class_names, groups=scan.groups)
    if loaded.trust is not None:  # the gate looks at each image as it is, as predict does
        flagged = ~loaded.trust.gate.in_domain(loaded.forward_with_features(images)[1])
        evaluation = dataclasses.replace(
            evaluation,
            metrics={
                **evaluation.metrics,
                "ood_flagged": int(flagged.sum()),
                "ood_flagged_share": float(flagged.mean()),
            },
        )
    store.save_scored_evaluation(
        run_id, evaluation, name=evaluation_name, data_dir=scan.root, paths=scan.paths, y_true=y_true, y_prob=y_prob
    )
    return evaluation
