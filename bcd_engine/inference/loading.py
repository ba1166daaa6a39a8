"""Loading a completed run's model safely: the file must lie in the artifacts folder and match its sha256
(:func:`bcd_engine.store.artifacts.run_model_file` checks it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bcd_engine.data.regions import prepare_for_model
from bcd_engine.errors import StoreError
from bcd_engine.inference.predict import predict_proba
from bcd_engine.inference.trust import (
    RunTrust,
    compiled_forward,
    features_and_probabilities,
    load_trust,
)
from bcd_engine.models.backbones import get_backbone
from bcd_engine.models.config import TrainConfig
from bcd_engine.store import RunStore
from bcd_engine.store.artifacts import run_model_file


@dataclass
class LoadedModel:
    """A run's Keras model with what is needed to feed it."""

    run_id: int
    model: object
    config: TrainConfig
    class_names: list[str]
    trust: RunTrust | None = None  # the run's OOD gate and temperature (None for runs trained before them)
    synthetic: bool = False  # trained on a SYNTHETIC set: its answers say nothing about real smears
    _forward: object = field(default=None, init=False, repr=False)  # the compiled forward pass, built on first use

    def preprocess(self):
        return get_backbone(self.config.backbone).preprocess()

    def forward(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (n, classes) for uint8 images at the model's size: one view each, in the run's colour mode.

        Raw model output, not calibrated (see :attr:`trust`).
        """
        return self.forward_with_features(images)[0]

    def forward_with_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (n, classes), pooled backbone features (n, d)) of uint8 images at the model's size.

        Runs the preprocessing and the model in batches through one compiled function, without the
        per-call overhead of ``model.predict`` (which matters when diagnosing one image at a time).
        """
        if self._forward is None:
            self._forward = compiled_forward(self.model, self.preprocess())
        features, probabilities = features_and_probabilities(
            self._forward, prepare_for_model(images, self.config), batch_size=self.config.batch_size
        )
        if not len(probabilities):
            return np.zeros((0, len(self.class_names))), features
        return probabilities, features

    def predict_arrays(
        self, images: np.ndarray, *, image_keys: list[str] | None = None, progress: bool = False
    ) -> np.ndarray:
        """Probabilities for uint8 images already at the model's size, with the run's test-time augmentation.

        ``image_keys`` (the images' md5 digests) make each view the one training used for that image.
        """
        images = prepare_for_model(images, self.config)
        return predict_proba(
            self.model,
            images,
            preprocess=self.preprocess(),
            batch_size=self.config.batch_size,
            augment=self.config.augment,
            tta_views=self.config.tta_views,
            seed=self.config.seed,
            image_keys=image_keys,
            progress=progress,
        )


def load_run_model(run_id: int, *, store: RunStore) -> LoadedModel:
    """Load the model a completed run saved, after checking it lies in the artifacts folder and its sha256."""
    import keras

    path, _ = run_model_file(run_id, store=store)
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras refuses unsafe or broken files with many types
        raise StoreError(
            f"model file of run {run_id} cannot be loaded safely ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}); refusing it"
        ) from exc
    run = store.get_run(run_id)
    return LoadedModel(
        run_id,
        model,
        TrainConfig.from_dict(run.config["train"]),
        list(run.config["class_names"]),
        trust=load_trust(run_id, store=store),
        synthetic=run.dataset.synthetic,
    )
