"""Training on tiny synthetic images with random weights: backbones, cache, equivalence, cancellation."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
from helpers import skip_slow_backbone_off_tensorflow

from bcd_engine.errors import ConfigError
from bcd_engine.models.backbones import BACKBONES, build_backbone, get_backbone
from bcd_engine.models.config import AugmentConfig, TrainConfig
from bcd_engine.store import Protocol, RunStore

pytestmark = pytest.mark.every_backend  # CI runs this file on JAX too (README: Keras backends)

keras = pytest.importorskip("keras")


@pytest.fixture
def store(workspace) -> RunStore:
    """A private run store (every test here trains into one)."""
    return workspace


def tiny_config(backbone: str = "mobilenetv2", **overrides) -> TrainConfig:
    spec = get_backbone(backbone)
    base = dict(
        weights=None,
        image_size=max(32, spec.min_size),
        epochs=2,
        batch_size=8,
        dense_units=16,
        dropout=0.0,
        augment=AugmentConfig(factor=2),
        patience=2,
    )
    base.update(overrides)
    return TrainConfig(backbone=backbone, **base)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_and_trains_one_step(name):
    skip_slow_backbone_off_tensorflow(name, "its training step")
    spec = get_backbone(name)
    size = max(32, spec.min_size)
    backbone = build_backbone(spec, image_size=size, weights=None)
    assert backbone.get_layer(spec.last_conv_layer) is not None
    inputs = keras.Input((size, size, 3))
    outputs = keras.layers.Dense(4, activation="softmax")(keras.layers.GlobalAveragePooling2D()(backbone(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile("adam", "categorical_crossentropy", run_eagerly=True)  # DenseNet121's step traced: 46 s; eager: 4.5 s
    x = spec.preprocess()(np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32"))
    loss = model.train_on_batch(x, keras.utils.to_categorical([0, 3], 4))
    assert np.isfinite(float(np.asarray(loss).ravel()[0]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"backbone": "alexnet"}, "unknown backbone 'alexnet'"),
        ({"backbone": "inceptionv3", "image_size": 64}, "below inceptionv3's minimum of 75"),
        ({"augment": AugmentConfig(factor=1), "epochs": 0}, "epochs must be >= 1"),
        ({"optimizer": "adagrad"}, "optimizer must be one of"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(overrides, message):
    backbone = overrides.pop("backbone", "mobilenetv2")
    with pytest.raises(ConfigError, match=message):
        tiny_config(backbone, **overrides)


def test_a_stored_config_is_a_record_and_a_new_request_checks_its_weights_file(tmp_path):
    missing = tmp_path / "moved.weights.h5"
    with pytest.raises(ConfigError, match=f"weights file not found: {missing}"):
        TrainConfig.for_backbone("mobilenetv2", weights=str(missing))
    stored = tiny_config(weights=str(missing)).to_dict()  # as a run's config holds it once the file is gone
    assert TrainConfig.from_dict(stored).weights == str(missing)
    with pytest.raises(ConfigError, match=r"must be a Keras \.weights\.h5"):
        tiny_config(weights=str(tmp_path / "w.bin"))


def test_augmentation_factor_is_bounded():
    with pytest.raises(ConfigError, match="between 1 and 20"):
        AugmentConfig(factor=21)


def test_train_stores_run_split_epochs_evaluation_and_model(store, synthetic_dataset, monkeypatch):
    from bcd_engine.training import run as training
    from bcd_engine.training.run import train

    groups_given = []
    evaluate = training.evaluate_probabilities
    monkeypatch.setattr(
        training,
        "evaluate_probabilities",
        lambda *args, groups, **kwargs: groups_given.append(groups) or evaluate(*args, groups=groups, **kwargs),
    )
    result = train(tiny_config(), synthetic_dataset, store=store)
    assert result.status == "completed"
    run = store.get_run(result.run_id)
    assert run.status == "completed" and run.test_accuracy == result.test_accuracy
    assert run.environment[run.environment["backend"]] and run.environment["device"]
    split = store.get_split(result.run_id)
    assert {row["subset"] for row in split} == {"train", "val", "test"}
    assert len(split) == result.n_train + result.n_val + result.n_test
    assert [e.epoch for e in store.get_epochs(result.run_id)][:1] == [1]
    (evaluation,) = store.get_evaluations(result.run_id)
    assert evaluation.name == "test"
    assert np.asarray(evaluation.confusion_matrix).sum() == result.n_test
    for key in ("accuracy", "loss", "macro_f1", "parameters", "model_bytes", "latency_ms", "ece", "reliability"):
        assert key in evaluation.metrics
    interval = evaluation.metrics["confidence_intervals"]["accuracy"]
    assert interval["low"] <= evaluation.metrics["accuracy"] <= interval["high"]
    # The intervals resample the test images' duplicate groups, as stored with the split.
    assert groups_given[0].tolist() == [int(row["group_id"]) for row in split if row["subset"] == "test"]
    assert set(evaluation.metrics["per_class"]) == set(run.config["class_names"])
    assert len(store.get_predictions(evaluation.id)) == result.n_test
    artifacts = {artifact.kind: artifact for artifact in store.get_artifacts(result.run_id)}
    assert artifacts["model"].path.endswith("model.keras") and len(artifacts["model"].sha256) == 64
    assert artifacts["trust"].path.endswith("trust.npz")  # the OOD gate and temperature beside the model


def test_feature_cache_is_hit_on_identical_run_and_missed_when_augmentation_changes(store, synthetic_dataset):
    from bcd_engine.training.run import train

    first = train(tiny_config(), synthetic_dataset, store=store)
    again = train(tiny_config(), synthetic_dataset, store=store)
    changed = train(tiny_config(augment=AugmentConfig(factor=2, hue=0.05)), synthetic_dataset, store=store)
    assert first.feature_cache["misses"] > 0 and first.feature_cache["hits"] == 0
    assert again.feature_cache["misses"] == 0 and again.feature_cache["hits"] == first.feature_cache["misses"]
    assert changed.feature_cache["hits"] == 0 and changed.feature_cache["file"] != first.feature_cache["file"]
    assert again.test_accuracy == first.test_accuracy

    def probabilities(run_id: int) -> list[list[float]]:
        (evaluation,) = store.get_evaluations(run_id)
        return [prediction.probabilities for prediction in store.get_predictions(evaluation.id)]

    np.testing.assert_allclose(probabilities(again.run_id), probabilities(first.run_id), atol=1e-6)  # the same seed


def test_training_on_the_cache_equals_training_end_to_end_on_the_same_views(tmp_path):
    from bcd_engine.models.augment import augment_batch, view_seeds
    from bcd_engine.models.features import (
        FeatureCache,
        build_feature_extractor,
        extract_features,
    )
    from bcd_engine.models.head import (
        assemble_model,
        build_head,
        compile_model,
        fit_head_on_features,
    )

    config = tiny_config(epochs=3, patience=10, dense_units=8)
    spec = get_backbone(config.backbone)
    preprocess = spec.preprocess()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(12) % 4
    keys = [f"{i:032x}" for i in range(12)]
    train_rows, val_rows = np.arange(8).repeat(2), np.arange(8, 12)
    train_views = np.tile([0, 1], 8)

    keras.utils.set_random_seed(0)
    extractor, backbone = build_feature_extractor(spec, config)
    cache = FeatureCache.for_config(config, root=tmp_path)
    common = dict(preprocess=preprocess, augment=config.augment, seed=config.seed, cache=cache, batch_size=4)
    train_x = extract_features(extractor, images, train_rows, [keys[i] for i in train_rows], train_views, **common)
    val_x = extract_features(extractor, images, val_rows, [keys[i] for i in val_rows], np.zeros(4, int), **common)
    keras.utils.set_random_seed(config.seed)  # as train does: the order of the examples follows the run's seed
    head = fit_head_on_features(train_x, labels[train_rows], val_x, labels[val_rows], n_classes=4, config=config)
    cached_model = assemble_model(backbone, head, config)

    # The naive way: the same views as images, through the frozen backbone on every step.
    seeds = view_seeds([keys[i] for i in train_rows], train_views, seed=config.seed)
    view_images = np.stack(
        [
            images[i].astype("float32") if v == 0 else augment_batch(images[i][None], s[None], config.augment)[0]
            for i, v, s in zip(train_rows, train_views, seeds, strict=True)
        ]
    )
    keras.utils.set_random_seed(config.seed)  # the same order of the examples
    naive = assemble_model(backbone, build_head(train_x.shape[1], 4, config, seed=config.seed), config)  # same start
    compile_model(naive, config, config.learning_rate)
    targets = keras.utils.to_categorical(labels[train_rows], 4)
    val_data = (preprocess(images[val_rows].astype("float32")), keras.utils.to_categorical(labels[val_rows], 4))
    naive.fit(
        preprocess(view_images),
        targets,
        batch_size=config.batch_size,
        shuffle=True,
        validation_data=val_data,
        epochs=config.epochs,
        verbose=0,
        callbacks=[keras.callbacks.EarlyStopping(monitor="val_loss", patience=10, restore_best_weights=True)],
    )

    probe = preprocess(images.astype("float32"))
    np.testing.assert_allclose(cached_model.predict(probe, verbose=0), naive.predict(probe, verbose=0), atol=1e-4)


def test_cancelling_a_run_stops_it_and_keeps_its_epochs(store, synthetic_dataset):
    from bcd_engine.training.run import train

    config = tiny_config("scratch_cnn", epochs=1000, patience=1000, augment=AugmentConfig(factor=1))
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(result=train(config, synthetic_dataset, store=store)))
    worker.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (store.list_runs() and store.get_epochs(store.list_runs()[0].id)):
        time.sleep(0.2)
    run_id = store.list_runs()[0].id
    store.request_cancel(run_id)
    cancelled_at = time.monotonic()
    worker.join(60)
    assert not worker.is_alive()
    assert time.monotonic() - cancelled_at < 15
    assert outcome["result"].status == "cancelled"
    assert store.get_run(run_id).status == "cancelled"
    assert len(store.get_epochs(run_id)) >= 1


def test_phase_two_unfreezes_top_layers_but_keeps_batchnorm_frozen(store, synthetic_dataset):
    from bcd_engine.models.head import unfreeze_top_layers
    from bcd_engine.training.run import train

    result = train(tiny_config(fine_tune_epochs=1, fine_tune_layers=6), synthetic_dataset, store=store)
    assert result.status == "completed"
    assert {e.phase for e in store.get_epochs(result.run_id)} == {1, 2}

    backbone = build_backbone(get_backbone("mobilenetv2"), image_size=32, weights=None)
    unfreeze_top_layers(backbone, 6)
    top, rest = backbone.layers[-6:], backbone.layers[:-6]
    assert not any(layer.trainable for layer in rest)
    assert all(layer.trainable != isinstance(layer, keras.layers.BatchNormalization) for layer in top)


def test_imagenet_weights_offline_name_the_file_to_provide(monkeypatch, tmp_path):
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(file_utils, "get_file", offline)
    spec = get_backbone("mobilenetv2")
    with pytest.raises(ConfigError, match=r"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1\.0_224_no_top\.h5"):
        build_backbone(spec, image_size=224, weights="imagenet")


def test_a_run_keeps_its_heartbeat_fresh_in_phases_without_batches(store, monkeypatch, caplog):
    from bcd_engine.training import monitor as training

    monkeypatch.setattr(training, "HEARTBEAT_SECONDS", 0.05)
    run_id = store.create_run(backbone="scratch_cnn", protocol=Protocol.holdout(), config={}, status="running")
    store.start_run(run_id, environment={})
    before = store.get_run(run_id).heartbeat_at
    with training.heartbeat(store, run_id):
        time.sleep(0.4)  # e.g. saving or evaluating: no Keras batch, no callback
    assert store.get_run(run_id).heartbeat_at > before

    def failed_beats():
        return [r for r in caplog.records if "heartbeat of run 4242 failed" in r.getMessage()]

    with caplog.at_level(logging.WARNING), training.heartbeat(store, 4242):  # no such run: every beat fails
        deadline = time.monotonic() + 10
        while not failed_beats() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert failed_beats(), "a failed beat must be logged"
    assert all(r.levelno == logging.WARNING and "no run with id 4242" in r.getMessage() for r in failed_beats())
    assert not any(t.name == "bcd-heartbeat-4242" for t in threading.enumerate())  # the beating stopped
