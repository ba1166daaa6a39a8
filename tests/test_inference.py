"""Loading trained models safely: only bcd's own files, checked by sha256, movable with their store."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers import workspace_store

from bcd_engine.data.images import load_images
from bcd_engine.data.scan import scan_dataset
from bcd_engine.errors import StoreError
from bcd_engine.inference.diagnosis import Diagnoser, Source
from bcd_engine.inference.loading import load_run_model
from bcd_engine.models.augment import augment_batch, view_seeds
from bcd_engine.models.config import AugmentConfig, TrainConfig
from bcd_engine.protocols.robustness import colour_robustness_of_run
from bcd_engine.store import Protocol
from bcd_engine.training.run import train

pytestmark = pytest.mark.every_backend  # CI runs this file on JAX too (README: Keras backends)


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, synthetic_dataset):
    """One tiny run trained once for the module: (its workspace folder, what ``train`` reported)."""
    root = tmp_path_factory.mktemp("trained")
    config = TrainConfig(
        backbone="scratch_cnn",
        image_size=32,
        epochs=1,
        batch_size=8,
        dense_units=8,
        augment=AugmentConfig(factor=1),
        tta_views=3,
    )
    with pytest.MonkeyPatch.context() as patch:
        store = workspace_store(root, patch)
        result = train(config, synthetic_dataset, store=store)
        store.close()  # the write-ahead log folded back into results.db: the file alone is the store
    return root, result


@pytest.fixture
def trained(trained_once, tmp_path, monkeypatch):
    """A private copy of the module's trained run under ``tmp_path`` (store, model files and caches), as
    ``workspace`` lays them out: each test may change or break its copy."""
    root, result = trained_once
    shutil.copy2(root / "results.db", tmp_path / "results.db")
    for folder in ("artifacts", "cache"):
        if (root / folder).exists():
            shutil.copytree(root / folder, tmp_path / folder)
    return workspace_store(tmp_path, monkeypatch), result


def test_model_path_is_stored_relative_to_the_artifacts_folder(trained):
    store, result = trained
    paths = {artifact.kind: artifact.path for artifact in store.get_artifacts(result.run_id)}
    assert paths == {"model": f"run-{result.run_id}/model.keras", "trust": f"run-{result.run_id}/trust.npz"}


def test_store_and_artifacts_can_move_together(trained, tmp_path, monkeypatch, synthetic_dataset):
    store, result = trained
    moved = tmp_path / "shipped" / "artifacts"
    shutil.copytree(tmp_path / "artifacts", moved)
    shutil.rmtree(tmp_path / "artifacts")
    monkeypatch.setenv("BCD_ARTIFACTS_DIR", str(moved))
    image = sorted(synthetic_dataset.glob("*/*.png"))[0]
    (prediction,) = Diagnoser.for_runs([result.run_id], store=store).diagnose([Source(image.name, image)])
    assert sum(prediction.probabilities.values()) == pytest.approx(1, abs=1e-5)


def test_tta_predictions_average_the_augmented_views_and_are_deterministic(trained):
    import keras

    store, result = trained
    loaded = load_run_model(result.run_id, store=store)
    config = loaded.config
    assert config.tta_views == 3
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    # View 0 is the image itself; view v is the training augmentation with the seeds of (image key, v).
    views = [images.astype(np.float32)]
    for view in range(1, config.tta_views):
        seeds = view_seeds(["0" * 8] * len(images), [view] * len(images), seed=config.seed)
        views.append(
            np.stack(
                [
                    augment_batch(image[None], pair[None], config.augment)[0]
                    for image, pair in zip(images, seeds, strict=True)
                ]
            )
        )
    per_view = [keras.ops.convert_to_numpy(loaded.model(loaded.preprocess()(v), training=False)) for v in views]

    tta = loaded.predict_arrays(images)
    np.testing.assert_allclose(tta, np.mean(per_view, axis=0), atol=1e-5)
    assert np.abs(tta - per_view[0]).max() > 1e-4  # not the single view: test-time augmentation is on
    np.testing.assert_allclose(loaded.forward(images), per_view[0], atol=1e-5)
    np.testing.assert_allclose(loaded.predict_arrays(images), tta)


def test_a_tampered_model_file_is_never_loaded(trained, tmp_path):
    store, result = trained
    model_file = tmp_path / "artifacts" / f"run-{result.run_id}" / "model.keras"
    model_file.write_bytes(model_file.read_bytes() + b"tampered")
    with pytest.raises(StoreError, match="does not match its recorded sha256"):
        load_run_model(result.run_id, store=store)


def test_a_model_outside_the_artifacts_folder_is_never_loaded(trained, tmp_path):
    store, result = trained
    store.save_artifact(result.run_id, kind="model", path="../../etc/model.keras", sha256="0" * 64, size_bytes=1)
    with pytest.raises(StoreError, match="outside the artifacts folder"):
        load_run_model(result.run_id, store=store)


def test_an_unfinished_run_has_no_model(trained):
    store, _ = trained
    queued = store.create_run(backbone="scratch_cnn", protocol=Protocol.holdout(), config={})
    with pytest.raises(StoreError, match="is queued, not completed"):
        load_run_model(queued, store=store)


def test_external_evaluation_with_a_label_map_onto_shared_labels(trained, tmp_path, synthetic_dataset):
    import json

    from bcd_engine.errors import DataError
    from bcd_engine.inference.evaluate import evaluate_run_on_folder, load_label_map

    store, result = trained
    external = tmp_path / "external"
    shutil.copytree(synthetic_dataset / "Benign", external / "lymphocyte")
    map_file = tmp_path / "map.json"
    map_file.write_text(
        json.dumps(
            {
                "run": {"Benign": "benign", "Early": "malignant", "Pre": "malignant", "Pro": "malignant"},
                "data": {"lymphocyte": "benign"},
            }
        )
    )
    evaluation = evaluate_run_on_folder(result.run_id, external, store=store, label_map=load_label_map(map_file))
    n_images = len(list(external.glob("*/*.png")))
    assert evaluation.class_names == ["benign", "malignant"]
    assert np.asarray(evaluation.confusion_matrix).tolist()[1] == [0, 0]
    assert sum(evaluation.confusion_matrix[0]) == n_images
    (external_eval,) = [e for e in store.get_evaluations(result.run_id) if e.name == "external"]
    predictions = store.get_predictions(external_eval.id)
    assert all(abs(sum(p.probabilities) - 1) < 1e-5 and p.true_class == "benign" for p in predictions)

    with pytest.raises(DataError, match="unknown lymphocyte"):
        evaluate_run_on_folder(result.run_id, external, store=store)
    map_file.write_text("[1, 2]")
    with pytest.raises(DataError, match="label map"):
        load_label_map(map_file)


def test_colour_robustness_of_a_grayscale_run(workspace, synthetic_dataset):
    store = workspace
    config = TrainConfig(
        backbone="scratch_cnn", image_size=32, epochs=1, batch_size=8, dense_units=8, colour="grayscale"
    )
    run_id = train(config, synthetic_dataset, store=store).run_id
    result = colour_robustness_of_run(run_id, store=store)
    # A grayscale model sees the same pixels whether or not the test images were made gray first.
    assert result["normalised"]["grayscale"]["model_accuracy"] == result["original"]["model_accuracy"]
    interval = result["original"]["model_accuracy_ci"]
    assert interval["low"] <= result["original"]["model_accuracy"] <= interval["high"]
    assert all(0 <= row["colour_only_accuracy"] <= 1 for row in result["normalised"].values())
    names = [e.name for e in store.get_evaluations(run_id)]
    assert names == ["test", "test (grayscale)", "test (reinhard)"]


def test_a_stored_test_evaluation_can_be_reproduced_from_the_saved_model(workspace, synthetic_dataset):
    """Cached test-time views (training) and views made from the saved model (later) are the same transforms."""
    store = workspace
    config = TrainConfig(
        backbone="mobilenetv2",
        weights=None,
        image_size=32,
        epochs=1,
        batch_size=8,
        dense_units=8,
        augment=AugmentConfig(factor=3),
        tta_views=3,
    )
    run_id = train(config, synthetic_dataset, store=store).run_id
    (evaluation,) = store.get_evaluations(run_id)
    stored = store.get_predictions(evaluation.id)
    scan = scan_dataset(synthetic_dataset)
    md5 = {path: record.md5 for path, record in zip(scan.paths, scan.images, strict=True)}
    paths = [p.path for p in stored]
    images = load_images(paths, image_size=32)
    again = load_run_model(run_id, store=store).predict_arrays(images, image_keys=[md5[p] for p in paths])
    np.testing.assert_allclose(again, [p.probabilities for p in stored], atol=1e-4)


def test_model_identity_tells_a_reused_run_id_from_the_deleted_run(trained, synthetic_dataset):
    from bcd_engine.store.artifacts import model_identity

    store, result = trained
    before = model_identity(result.run_id, store=store)
    (artifact,) = [a for a in store.get_artifacts(result.run_id) if a.kind == "model"]
    assert artifact.sha256 in before
    store.delete_run(result.run_id)
    config = TrainConfig(
        backbone="scratch_cnn",
        image_size=32,
        epochs=1,
        batch_size=8,
        dense_units=8,
        augment=AugmentConfig(factor=1),
        tta_views=1,
        seed=1,
    )
    again = train(config, synthetic_dataset, store=store)
    assert again.run_id == result.run_id  # SQLite hands the id out again
    assert model_identity(again.run_id, store=store) != before
