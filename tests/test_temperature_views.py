"""The calibration temperature is fitted on validation answers made as the run's test answers are.

A run with several test-time views averages them, which already softens its answers; a temperature fitted on
single-view validation answers then made the averaged answers under-confident (ECE 0.043 before calibration,
0.080 after, for one run with temperature 1.32).
"""

from __future__ import annotations

import numpy as np

from bcd_engine.evaluation.calibration import apply_temperature
from bcd_engine.evaluation.confidence import expected_calibration_error
from bcd_engine.inference.trust import FEATURE_LAYER, fit_trust

N, D, CLASSES = 600, 8, 4


def _over_confident_model(labels: np.ndarray):
    """A model on feature vectors whose answers are right about 70% of the time and always about 97% sure."""
    import keras

    inputs = keras.Input((D,))
    pooled = keras.layers.Identity(name=FEATURE_LAYER)(inputs)
    dense = keras.layers.Dense(CLASSES, activation="softmax")
    model = keras.Model(inputs, dense(pooled))
    dense.set_weights([np.eye(D, CLASSES, dtype=np.float32) * 8.0, np.zeros(CLASSES, np.float32)])
    rng = np.random.default_rng(0)
    shown = np.where(rng.random(len(labels)) < 0.7, labels, (labels + 1) % CLASSES)
    features = np.eye(D, dtype=np.float32)[shown] + rng.normal(0, 0.05, (len(labels), D)).astype(np.float32)
    return model, features


def _fit(labels, model, features, **kwargs):
    rows = np.arange(N)
    train, val, test = rows[:300], rows[300:450], rows[450:]
    return fit_trust(
        model,
        features,
        labels,
        train=train,
        val=val,
        test=test,
        test_probabilities=kwargs.pop("test_probabilities"),
        preprocess=lambda x: x,
        batch_size=64,
        **kwargs,
    )


def test_the_temperature_is_fitted_on_the_validation_answers_the_run_gives():
    labels = np.random.default_rng(1).integers(0, CLASSES, N)
    model, features = _over_confident_model(labels)
    single = np.asarray(model(features))
    averaged = np.full((N, CLASSES), 0.3 / (CLASSES - 1))  # averaged views: right 70% of the time, 70% sure
    averaged[np.arange(N), single.argmax(1)] = 0.7
    assert expected_calibration_error(labels[450:], averaged[450:]) < 0.08

    on_single_views, _ = _fit(labels, model, features, test_probabilities=averaged[450:])
    trust, metrics = _fit(
        labels, model, features, test_probabilities=averaged[450:], val_probabilities=averaged[300:450]
    )
    # Fitted on the single views' over-confident answers, the temperature softens the already calibrated
    # averaged answers and raises their ECE; fitted on the averaged answers, it leaves them about as they are.
    before = expected_calibration_error(labels[450:], averaged[450:])
    softened = expected_calibration_error(labels[450:], apply_temperature(averaged[450:], on_single_views.temperature))
    assert on_single_views.temperature > 1.5 and softened > before + 0.1
    assert abs(trust.temperature - 1.0) < 0.1
    assert metrics["ece_calibrated"] < before + 0.02
