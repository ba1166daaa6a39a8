"""What a run needs before its answers are shown: an out-of-distribution gate and a calibration temperature.

Both are fitted on the run's own split after training (the gate on its training images' pooled features, its
threshold on held-out scores of its validation and training images, the temperature on its validation images) and
saved beside the model
(:mod:`bcd_engine.store.artifacts` says where). :func:`bcd_engine.inference.calibrate.calibrate_run` fits them
for a run trained before they existed, from the split the store recorded.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bcd_engine.data.images import load_images
from bcd_engine.data.regions import SeenAs, prepare_for_model
from bcd_engine.errors import StoreError, WriteError
from bcd_engine.evaluation.calibration import apply_temperature, fit_temperature
from bcd_engine.evaluation.confidence import expected_calibration_error
from bcd_engine.evaluation.ood import VALIDATION_QUANTILE_RULE, MahalanobisGate
from bcd_engine.files import atomic_path
from bcd_engine.models.backend import forward_function
from bcd_engine.store import RunStore
from bcd_engine.store.artifacts import TRUST_KIND, artifact_file, record_artifact, trust_path

FEATURE_LAYER = "pool"  # the global pooling layer between backbone and head (models.backbones.pooling_layer)


@dataclass(frozen=True)
class RunTrust:
    """A run's OOD gate and the temperature that calibrates its probabilities."""

    gate: MahalanobisGate
    temperature: float

    def calibrate(self, probabilities: np.ndarray) -> np.ndarray:
        return apply_temperature(probabilities, self.temperature)

    def save(self, path: Path) -> None:
        """Write ``path`` whole or not at all (WriteError when it cannot be written)."""
        try:
            with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    means=self.gate.means,
                    precision=self.gate.precision,
                    threshold=self.gate.threshold,
                    pass_rate=self.gate.pass_rate,
                    rule=self.gate.rule,
                    temperature=self.temperature,
                )
        except OSError as exc:
            raise WriteError(f"cannot save {path}: {exc.strerror or exc}") from exc

    @classmethod
    def load(cls, path: Path) -> RunTrust:
        """Read a gate :meth:`save` wrote, or one saved before gates named their rule (its threshold is a quantile
        of the validation scores); StoreError for a file that is not one (pickled objects are never loaded)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                rule = str(data["rule"]) if "rule" in data.files else VALIDATION_QUANTILE_RULE
                gate = MahalanobisGate(
                    data["means"], data["precision"], float(data["threshold"]), float(data["pass_rate"]), rule
                )
                return cls(gate, float(data["temperature"]))
        except (ValueError, KeyError, zipfile.BadZipFile) as exc:
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise StoreError(f"the OOD gate {path} is not one bcd saved ({detail}); refusing it") from None


def feature_model(model):
    """The run's model with two outputs: its pooled backbone features and its class probabilities.

    The features are the pooling layer's output (bcd's models name it ``pool``); in a model without one,
    whatever feeds its last layer.
    """
    import keras

    names = {layer.name for layer in model.layers}
    features = model.get_layer(FEATURE_LAYER).output if FEATURE_LAYER in names else model.layers[-1].input
    return keras.Model(model.inputs, [features, model.output])


def compiled_forward(model, preprocess):
    """One compiled function: uint8 images (n, size, size, 3), as the model sees them (its colour mode applied),
    to (pooled features, probabilities)."""
    return forward_function(feature_model(model), preprocess)


def features_and_probabilities(forward, images: np.ndarray, *, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, d), probabilities (n, classes)) of uint8 images through ``forward`` (:func:`compiled_forward`),
    ``batch_size`` at a time."""
    features, probabilities = [], []
    for start in range(0, len(images), batch_size):
        f, p = forward(images[start : start + batch_size])
        features.append(np.asarray(f, np.float64))
        probabilities.append(np.asarray(p, np.float64))
    if not features:
        return np.zeros((0, 0)), np.zeros((0, 0))
    return np.concatenate(features), np.concatenate(probabilities)


def fit_trust(
    model,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    train: np.ndarray,
    val: np.ndarray,
    test: np.ndarray,
    test_probabilities: np.ndarray,
    preprocess,
    batch_size: int,
    val_probabilities: np.ndarray | None = None,
) -> tuple[RunTrust, dict]:
    """Fit the gate (training images; threshold on held-out in-domain scores: the validation images' and the
    training images' cross-fitted ones, :meth:`MahalanobisGate.fit`) and the temperature (validation), and measure
    both on the test images, which neither saw: (trust, metrics for the test evaluation, among them the share of
    the test images the gate refuses).

    ``test_probabilities`` are the run's test probabilities as evaluated (with its test-time views), and
    ``val_probabilities`` the validation images' seen the same way (None: one view each, computed here). The
    temperature is fitted on answers made as the test's and Diagnose's are: averaging several views already
    softens them, so a temperature fitted on single views would make averaged answers under-confident.
    """
    forward = compiled_forward(model, preprocess)
    train_f, _ = features_and_probabilities(forward, images[train], batch_size=batch_size)
    val_f, val_p = features_and_probabilities(forward, images[val], batch_size=batch_size)
    test_f, _ = features_and_probabilities(forward, images[test], batch_size=batch_size)
    gate = MahalanobisGate.fit(train_f, labels[train], val_f)
    if val_probabilities is not None:
        val_p = np.asarray(val_probabilities, np.float64)
    trust = RunTrust(gate, fit_temperature(labels[val], val_p) if len(val) else 1.0)
    flagged = ~gate.in_domain(test_f) if len(test_f) else np.zeros(0, bool)
    return trust, {
        "temperature": trust.temperature,
        "ece_calibrated": expected_calibration_error(labels[test], trust.calibrate(test_probabilities)),
        "ood_threshold": gate.threshold,
        "ood_pass_rate": gate.pass_rate,
        "ood_rule": gate.rule,
        "ood_flagged": int(flagged.sum()),
        "ood_flagged_share": float(flagged.mean()) if len(flagged) else 0.0,
    }


def save_trust(trust: RunTrust, run_id: int, *, store: RunStore) -> Path:
    """Save ``trust`` in the run's folder (:func:`~bcd_engine.store.artifacts.trust_path`) and record it as the
    run's ``trust`` artifact."""
    path = trust_path(run_id)
    trust.save(path)
    record_artifact(store, run_id, kind=TRUST_KIND, path=path)
    return path


def load_trust(run_id: int, *, store: RunStore) -> RunTrust | None:
    """The run's gate and temperature, checked as every artifact is; None for a run that has none (trained before
    them)."""
    found = artifact_file(run_id, TRUST_KIND, store=store)
    return None if found is None else RunTrust.load(found[0])


def load_split_images(paths: list[str], *, image_size: int, seen_as: SeenAs, progress: bool = False) -> np.ndarray:
    return prepare_for_model(load_images(paths, image_size=image_size, progress=progress), seen_as)
