"""Using a trained run: load its model safely and evaluate it on another folder (diagnosis: ``diagnosis``)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import settings
from .backbones import get_backbone
from .colour import apply_colour_mode
from .config import TrainConfig
from .datasets import scan_dataset
from .errors import DataError, StoreError
from .evaluation import Evaluation, evaluate_probabilities
from .features import file_sha256
from .store import RunStore
from .training import load_images, predict_proba


@dataclass
class LoadedModel:
    """A run's Keras model with what is needed to feed it."""

    run_id: int
    model: object
    config: TrainConfig
    class_names: list[str]
    _forward: object = field(default=None, init=False, repr=False)  # the compiled forward pass, built on first use

    def preprocess(self):
        return get_backbone(self.config.backbone).preprocess()

    def forward(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (n, classes) for uint8 images at the model's size: one view each, in the run's colour mode.

        Runs the preprocessing and the model in batches through one compiled function, without the
        per-call overhead of ``model.predict`` (which matters when diagnosing one image at a time).
        """
        import tensorflow as tf

        if self._forward is None:
            size = self.config.image_size
            preprocess = self.preprocess()
            self._forward = tf.function(
                lambda x: self.model(preprocess(tf.cast(x, tf.float32)), training=False),
                input_signature=[tf.TensorSpec((None, size, size, 3), tf.uint8)],
            )
        images = apply_colour_mode(images, self.config.colour)
        step = self.config.batch_size
        batches = [np.asarray(self._forward(images[i:i + step]), np.float64) for i in range(0, len(images), step)]
        return np.concatenate(batches) if batches else np.zeros((0, len(self.class_names)))

    def predict_arrays(self, images: np.ndarray, *, image_keys: list[str] | None = None,
                       progress: bool = False) -> np.ndarray:
        """Probabilities for uint8 images already at the model's size, with the run's test-time augmentation.

        ``image_keys`` (the images' md5 digests) make each view the one training used for that image.
        """
        images = apply_colour_mode(images, self.config.colour)
        return predict_proba(self.model, images, preprocess=self.preprocess(), batch_size=self.config.batch_size,
                             augment=self.config.augment, tta_views=self.config.tta_views, seed=self.config.seed,
                             image_keys=image_keys, progress=progress)


def load_run_model(run_id: int, *, store: RunStore | None = None) -> LoadedModel:
    """Load the model a completed run saved, after checking it lies in the artifacts folder and its sha256."""
    import keras

    store = store or RunStore()
    path, _ = run_model_file(run_id, store=store)
    model = keras.models.load_model(path, compile=False, safe_mode=True)
    run = store.get_run(run_id)
    return LoadedModel(run_id, model, TrainConfig.from_dict(run.config["train"]), list(run.config["class_names"]))


def run_model_file(run_id: int, *, store: RunStore) -> tuple[Path, str]:
    """The model file a completed run saved and its recorded sha256, checked: the file lies in the
    artifacts folder and its content matches the record (StoreError otherwise)."""
    run = store.get_run(run_id)
    if run.status != "completed":
        raise StoreError(f"run {run_id} is {run.status}, not completed: it has no model to use")
    models = [a for a in store.get_artifacts(run_id) if a.kind == "model"]
    if not models:
        raise StoreError(f"run {run_id} has no saved model")
    root = settings.artifacts_dir().resolve()
    path = (root / models[-1].path).resolve()  # an absolute stored path stays as it is
    if root not in path.parents:
        raise StoreError(f"model of run {run_id} lies outside the artifacts folder {root}; refusing to load it")
    if not path.is_file():
        raise StoreError(f"model file of run {run_id} is missing: {path}")
    if file_sha256(path) != models[-1].sha256:
        raise StoreError(f"model file of run {run_id} does not match its recorded sha256; refusing to load it")
    return path, models[-1].sha256


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
    if not isinstance(mapping, dict) or set(mapping) - {"run", "data"} or not all(
        isinstance(part, dict) and all(isinstance(v, str) for v in part.values()) for part in mapping.values()
    ):
        raise DataError(f'label map {path} must be {{"run": {{class: label}}, "data": {{class: label}}}}')
    return mapping


def evaluate_run_on_folder(run_id: int, data_dir: str | os.PathLike, *, store: RunStore | None = None,
                           label_map: dict | None = None, progress: bool = False,
                           evaluation_name: str = "external") -> Evaluation:
    """External validation: the run's model on every readable image of another folder.

    Without ``label_map`` the folder's class names must be among the run's. With one (see
    :func:`load_label_map`) both sides are mapped onto shared labels and a shared label's probability
    is the sum of its run classes' probabilities; a folder with one class is allowed (its accuracy is
    then one minus the rate of wrong shared labels, e.g. the false-malignant rate of benign images).
    The evaluation is stored under ``evaluation_name``.
    """
    store = store or RunStore()
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
    store.save_evaluation(
        run_id, name=evaluation_name, data_dir=str(scan.root), metrics=evaluation.metrics,
        class_names=evaluation.class_names, confusion_matrix=evaluation.confusion_matrix, roc=evaluation.roc,
        predictions=[
            {"path": path, "true_class": class_names[t], "predicted_class": class_names[int(p)],
             "probabilities": prob.tolist()}
            for path, t, p, prob in zip(scan.paths, y_true, evaluation.predicted, y_prob)
        ],
    )
    return evaluation
