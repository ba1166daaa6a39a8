"""Exporting a run: .keras and TFLite files that predict like the stored model, labels.json and the model card."""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile

import numpy as np
import pytest
from helpers import APP, workspace_store

from bcd_engine.errors import ConfigError, RunNotFoundError, StoreError
from bcd_engine.export.bundle import export_run
from bcd_engine.export.card import model_card
from bcd_engine.export.tflite import TFLITE_ATOL, tflite_probabilities, to_tflite
from bcd_engine.files import file_sha256
from bcd_engine.inference.loading import load_run_model
from bcd_engine.models.backbones import BACKBONES, get_backbone, preprocessing_info
from bcd_engine.models.config import AugmentConfig, TrainConfig
from bcd_engine.store import Protocol
from bcd_engine.training.run import train

keras = pytest.importorskip("keras")

AUDIT = {
    "leakage": {"ok": True},
    "shortcuts": {
        "colour_only_accuracy": 0.996,
        "corner_only_accuracy": 0.812,
        "opposite_corner_accuracy": 0.75,
        "chance_accuracy": 0.25,
        "corner_fraction": 0.25,
        "interpretation": "Colour alone suffices.",
    },
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_dataset):
    """A store with one completed tiny scratch-CNN run (trained once for the module)."""
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as patch:
        store = workspace_store(root, patch)
        config = TrainConfig(
            backbone="scratch_cnn",
            image_size=32,
            epochs=1,
            batch_size=8,
            dense_units=8,
            augment=AugmentConfig(factor=1),
            tta_views=2,
        )
        yield store, train(config, synthetic_dataset, store=store).run_id


def _inputs(n: int = 3) -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 1, (n, 32, 32, 3)).astype(np.float32)


def test_keras_export_loads_back_and_predicts_the_same(trained, tmp_path):
    store, run_id = trained
    result = export_run(run_id, format="keras", out_dir=tmp_path / "new" / "folder", store=store)
    assert [p.name for p in result.paths] == ["model.keras", "labels.json", "MODEL_CARD.md"]
    assert all(p.is_file() for p in result.paths) and result.max_abs_diff is None
    exported = keras.models.load_model(result.model_path, compile=False, safe_mode=True)
    original = load_run_model(run_id, store=store).model
    np.testing.assert_allclose(
        exported.predict(_inputs(), verbose=0), original.predict(_inputs(), verbose=0), atol=1e-6
    )
    # The exported file is the one the run saved: its sha256 is the store's, and the card names it.
    (artifact,) = [a for a in store.get_artifacts(run_id) if a.kind == "model"]
    assert file_sha256(result.model_path) == artifact.sha256
    assert artifact.sha256 in result.card_path.read_text()
    labels = json.loads(result.labels_path.read_text())
    assert labels["class_names"] == ["Benign", "Early", "Pre", "Pro"]
    assert labels["image_size"] == 32
    assert labels["preprocessing"]["backbone"] == "scratch_cnn" and labels["preprocessing"]["divisor"] == 255.0


def test_tflite_export_matches_keras(trained, tmp_path):
    store, run_id = trained
    result = export_run(run_id, format="tflite", out_dir=tmp_path, store=store, audit=AUDIT)
    assert result.model_path.name == "model.tflite" and result.max_abs_diff <= TFLITE_ATOL
    expected = load_run_model(run_id, store=store).model.predict(_inputs(5), verbose=0)
    np.testing.assert_allclose(tflite_probabilities(result.model_path, _inputs(5)), expected, atol=TFLITE_ATOL)
    card = result.card_path.read_text()
    assert "model.tflite" in card and "Interpreter" in card and "99.6%" in card


def test_a_mixed_precision_model_converts_in_float32():
    from bcd_engine.models.backbones import build_backbone
    from bcd_engine.models.head import assemble_model, build_head

    config = TrainConfig(backbone="scratch_cnn", image_size=32, dense_units=8)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        backbone = build_backbone(get_backbone("scratch_cnn"), image_size=32, weights=None)
        model = assemble_model(backbone, build_head(backbone.output_shape[-1], 4, config), config)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.layers[1].dtype_policy.compute_dtype == "float16"
    probabilities = tflite_probabilities(to_tflite(model), _inputs())
    np.testing.assert_allclose(probabilities, model.predict(_inputs(), verbose=0), atol=1e-2)


def test_model_card_has_metrics_with_cis_protocol_and_warnings(trained):
    store, run_id = trained
    run, (test,) = store.get_run(run_id), store.get_evaluations(run_id)
    external = dataclasses.replace(test, name="external", data_dir="/data/other-lab")
    card = model_card(run, [test, external], split=store.get_split(run_id))
    ci = test.metrics["confidence_intervals"]["accuracy"]
    assert f"| Accuracy | {test.metrics['accuracy']:.3f} | {ci['low']:.3f} – {ci['high']:.3f} |" in card
    assert "| Macro F1 |" in card and "| Macro AUC |" in card and f"| ECE | {test.metrics['ece']:.3f} |" in card
    assert "### test (7 images" in card and "### external" in card and "/data/other-lab" in card
    assert f"Protocol: {Protocol.holdout().label}" in card
    assert "No patient identifiers: image-level split" in card
    assert "Not a medical device." in card and "Colour shortcut" in card
    assert "2 test-time augmented views" in card
    split_line = next(line for line in card.splitlines() if line.startswith("- Split:"))
    assert split_line.endswith("train, 7 val, 7 test (48 images)")
    assert "Duplicates: no exact or near-duplicate images in the split." in card
    assert f"python -m bcd_engine audit --data {run.config['data_dir']}" in card
    assert 'keras.models.load_model("model.keras", compile=False)' in card


def test_model_card_includes_a_given_audit(trained):
    store, run_id = trained
    card = model_card(store.get_run(run_id), store.get_evaluations(run_id), audit=AUDIT["shortcuts"])
    assert "Colour-only accuracy: 99.6%" in card and "Corner-only accuracy" in card and "Chance accuracy" in card
    assert "bcd_engine audit --data" not in card
    assert "Split: not stored" in card


def test_model_card_reports_duplicate_groups_and_groups_crossing_the_split(trained):
    store, run_id = trained
    rows = [
        {"path": f"{i}.png", "class_name": "Benign", "subset": subset, "group_id": group}
        for i, (subset, group) in enumerate([("train", "a"), ("train", "a"), ("test", "b"), ("test", "c")])
    ]
    card = model_card(store.get_run(run_id), [], split=rows)
    assert "1 group(s) of exact or near-duplicate images (2 images); each group is kept on one side" in card
    rows[0]["subset"] = "val"
    assert "1 group(s) cross subsets: test figures are inflated" in model_card(store.get_run(run_id), [], split=rows)


def test_preprocessing_info_reproduces_every_backbone_preprocess():
    rgb = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    for name in BACKBONES:
        info = preprocessing_info(name)
        mine = (rgb[..., info["channels"]] / info["divisor"] - np.array(info["mean"])) / np.array(info["std"])
        np.testing.assert_allclose(
            mine, np.asarray(get_backbone(name).preprocess()(rgb.copy())), atol=1e-4, err_msg=name
        )


def test_bad_format_and_bad_audit_are_config_errors(trained, tmp_path):
    store, run_id = trained
    with pytest.raises(ConfigError, match="format must be one of keras, tflite"):
        export_run(run_id, format="onnx", out_dir=tmp_path, store=store)
    with pytest.raises(ConfigError, match="audit must be"):
        export_run(run_id, format="keras", out_dir=tmp_path, store=store, audit={"accuracy": 1})
    assert not any(tmp_path.iterdir())


def test_existing_files_are_kept_unless_overwrite(trained, tmp_path):
    store, run_id = trained
    (tmp_path / "MODEL_CARD.md").write_text("mine")
    with pytest.raises(ConfigError, match=r"MODEL_CARD\.md already exist"):
        export_run(run_id, format="keras", out_dir=tmp_path, store=store)
    assert (tmp_path / "MODEL_CARD.md").read_text() == "mine"
    export_run(run_id, format="keras", out_dir=tmp_path, store=store, overwrite=True)
    assert "Not a medical device." in (tmp_path / "MODEL_CARD.md").read_text()


def test_unknown_runs_and_runs_without_a_model_are_refused(trained, tmp_path):
    store, _ = trained
    with pytest.raises(RunNotFoundError, match="no run with id 9999"):
        export_run(9999, format="keras", out_dir=tmp_path, store=store)
    queued = store.create_run(backbone="scratch_cnn", protocol=Protocol.holdout(), config={})
    with pytest.raises(StoreError, match="not completed"):
        export_run(queued, format="tflite", out_dir=tmp_path, store=store)
    assert not any(tmp_path.iterdir())


def test_compare_page_exports_a_run_as_tensorflow_lite_and_offers_the_zip(trained, tmp_path):
    from streamlit.testing.v1 import AppTest

    store, run_id = trained
    at = AppTest.from_file(APP, default_timeout=180)
    at.run()
    at.switch_page("pages/compare.py").run()
    at.selectbox(key="compare_export_run").set_value(run_id)
    at.selectbox(key="compare_export_fmt").set_value("tflite")
    at.button(key="compare_export").click().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    exported, fmt, content, max_diff = at.session_state["compare.export"]
    assert (exported, fmt) == (run_id, "tflite") and max_diff <= TFLITE_ATOL
    assert any(c.value.startswith("Largest difference from the Keras model's probabilities") for c in at.caption)
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        assert sorted(archive.namelist()) == ["MODEL_CARD.md", "labels.json", "model.tflite"]
        archive.extract("model.tflite", tmp_path)
    expected = load_run_model(run_id, store=store).model.predict(_inputs(), verbose=0)
    np.testing.assert_allclose(tflite_probabilities(tmp_path / "model.tflite", _inputs()), expected, atol=TFLITE_ATOL)
