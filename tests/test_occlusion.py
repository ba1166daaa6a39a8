"""Cells, not the label: two runs on a synthetic set whose corner label alone tells the class, one trained on whole
images and one with ``mask_regions=auto``; their occlusion audits, and the mask applied alike by every consumer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import APP, workspace_store

from bcd_engine import cli
from bcd_engine.data.images import load_image
from bcd_engine.data.synthetic import make_synthetic_dataset
from bcd_engine.errors import ConfigError
from bcd_engine.export.run_bundle import import_bundle, write_bundle
from bcd_engine.inference.diagnosis import Diagnoser, Source
from bcd_engine.inference.loading import load_run_model
from bcd_engine.models.config import AugmentConfig, TrainConfig
from bcd_engine.protocols.occlusion import MASKED_EVALUATION, grid_cells, occlusion_audit, stored_occlusion
from bcd_engine.store import RunStore, latest_evaluation
from bcd_engine.training.run import train

BOTTOM_RIGHT = "0.75,0.75,1,1"
CLASSES = ("Benign", "Early", "Pre")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The marked dataset, a store with the two runs (trained once for the module) and their occlusion audits."""
    root = tmp_path_factory.mktemp("occlusion")
    data = make_synthetic_dataset(
        root / "dataset", n_per_class=30, image_size=32, class_names=CLASSES, corner_marker=True
    )
    base = dict(
        backbone="scratch_cnn",
        image_size=32,
        epochs=20,
        patience=20,
        batch_size=8,
        dense_units=16,
        learning_rate=3e-3,
        augment=AugmentConfig(factor=1),
        val_fraction=0.2,
        test_fraction=0.3,
    )
    with pytest.MonkeyPatch.context() as patch:
        store = workspace_store(root / "workspace", patch)
        whole = train(TrainConfig(**base, mask_regions="none"), data, store=store).run_id
        masked = train(TrainConfig(**base), data, store=store).run_id
        audits = {run_id: occlusion_audit(run_id, store=store, heat_images=2) for run_id in (whole, masked)}
        yield {"data": data, "store": store, "whole": whole, "masked": masked, "audits": audits, "root": root}
        store.close()


def test_auto_masks_the_flagged_corner_and_records_it(lab):
    store = lab["store"]
    masked, whole = store.get_run(lab["masked"]).config, store.get_run(lab["whole"]).config
    assert masked["train"]["mask_regions"] == BOTTOM_RIGHT
    assert masked["mask"]["setting"] == "auto" and "bottom-right corner" in masked["mask"]["reason"]
    assert whole["train"]["mask_regions"] == "none" and whole["mask"]["setting"] == "none"


def test_the_unmasked_run_loses_accuracy_when_the_corner_is_covered_and_the_masked_run_does_not(lab):
    whole, masked = lab["audits"][lab["whole"]], lab["audits"][lab["masked"]]
    assert [r.to_text() for r in whole.flagged_regions] == [BOTTOM_RIGHT]
    assert [r.to_text() for r in masked.flagged_regions] == [BOTTOM_RIGHT]
    assert whole.as_trained.estimate >= 0.8  # the label alone is enough
    assert whole.flagged_drop >= 0.3
    assert masked.flagged_drop == 0  # it never saw the corner: covering it changes nothing
    for audit in (whole, masked):
        assert audit.as_trained.low <= audit.as_trained.estimate <= audit.as_trained.high


def test_the_occlusion_grid_of_the_unmasked_run_peaks_at_the_label(lab):
    audit = lab["audits"][lab["whole"]]
    assert (audit.peak.row, audit.peak.col) == (3, 3) and audit.peak.drop >= 0.3
    grid = np.array(audit.drop_grid())
    assert grid.shape == (4, 4) and grid[3, 3] == grid.max()
    masked = lab["audits"][lab["masked"]]
    assert masked.cells[-1].drop == 0  # the masked run's bottom-right cell is painted already


def test_the_audit_is_stored_with_the_run_and_its_json_reads_back(lab):
    store = lab["store"]
    for run_id, audit in lab["audits"].items():
        run = store.get_run(run_id)
        assert stored_occlusion(run.config).to_dict() == audit.to_dict()
        evaluation = latest_evaluation(store.get_evaluations(run_id), MASKED_EVALUATION)
        assert evaluation.metrics["accuracy"] == audit.flagged_masked.estimate
        document = json.loads(json.dumps(audit.to_dict()))
        assert len(document["cells"]) == 16 and document["heat"]["n_images"] == 2
        assert 0 <= document["heat"]["flagged"] <= 1 and document["heat"]["flagged_area"] == pytest.approx(1 / 16)


def test_grid_cells_cover_the_image_once():
    cells = grid_cells(3)
    mask = np.zeros((9, 9), int)
    for cell in cells:
        mask[cell.pixels(9, 9)] += 1
    assert (mask == 1).all()
    with pytest.raises(ConfigError, match="2 to 8"):
        grid_cells(1)


def _relabelled(lab, tmp_path):
    """A test image of the first class and the same image with the last class's label drawn in its corner."""
    source = sorted((lab["data"] / CLASSES[0]).glob("*.png"))[0]
    other = sorted((lab["data"] / CLASSES[-1]).glob("*.png"))[0]
    image, label = load_image(source, image_size=32), load_image(other, image_size=32)
    swapped = image.copy()
    swapped[24:, 24:] = label[24:, 24:]
    from PIL import Image

    paths = tmp_path / "original.png", tmp_path / "swapped.png"
    Image.fromarray(image).save(paths[0])
    Image.fromarray(swapped).save(paths[1])
    return image, swapped, paths


def test_the_mask_is_applied_alike_by_the_model_predict_diagnose_and_a_bundle(lab, tmp_path, capfd, monkeypatch):
    store, masked, whole = lab["store"], lab["masked"], lab["whole"]
    image, swapped, paths = _relabelled(lab, tmp_path)
    pair = np.stack([image, swapped])

    seen = load_run_model(masked, store=store).forward(pair)
    np.testing.assert_array_equal(seen[0], seen[1])  # the corner never reaches the masked run's model
    assert not np.allclose(*load_run_model(whole, store=store).forward(pair))  # it does reach the other one

    diagnoser = Diagnoser.for_runs([masked], store=store)
    answers = diagnoser.diagnose([Source("a.png", paths[0]), Source("b.png", paths[1])], tta=False)
    first, second = (dict(answer.to_dict(), name=None, path=None) for answer in answers)
    assert first == second

    monkeypatch.setenv("BCD_DATABASE_URL", f"sqlite:///{lab['root'] / 'workspace' / 'results.db'}")  # the CLI's store
    capfd.readouterr()
    assert cli.main(["predict", "--run", str(masked), str(paths[0]), str(paths[1]), "--json"]) == 0
    predicted = json.loads(capfd.readouterr().out)
    assert dict(predicted[0], path=None) == dict(predicted[1], path=None)

    bundle = write_bundle(masked, out_dir=tmp_path / "bundle", store=store)
    monkeypatch.setenv("BCD_ARTIFACTS_DIR", str(tmp_path / "elsewhere"))
    other = RunStore.open(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    imported = import_bundle(bundle, store=other).run_id
    loaded = load_run_model(imported, store=other)
    assert loaded.config.mask_regions == BOTTOM_RIGHT
    np.testing.assert_allclose(loaded.forward(pair), seen, atol=1e-6)
    assert stored_occlusion(other.get_run(imported).config).to_dict() == lab["audits"][masked].to_dict()
    other.close()


def test_audit_occlusion_on_the_command_line(lab, capfd, monkeypatch):
    monkeypatch.setenv("BCD_DATABASE_URL", f"sqlite:///{lab['root'] / 'workspace' / 'results.db'}")
    capfd.readouterr()
    code = cli.main(["audit", "--run", str(lab["whole"]), "--occlusion", "--grid", "2", "--heat-images", "0", "--json"])
    document = json.loads(capfd.readouterr().out)
    assert code == 0 and document["grid"] == 2 and (document["peak"]["row"], document["peak"]["col"]) == (1, 1)
    assert document["heat"] is None and document["flagged_drop"] >= 0.3
    assert cli.main(["audit", "--run", "1", "--run", "2", "--occlusion"]) == cli.EXIT_BAD_INPUT


def test_compare_shows_the_runs_with_and_without_the_label_and_their_occlusion_grids(lab, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from bcd_engine.training import worker

    root = lab["root"] / "workspace"
    monkeypatch.setenv("BCD_DATABASE_URL", f"sqlite:///{root / 'results.db'}")
    monkeypatch.setenv("BCD_ARTIFACTS_DIR", str(root / "artifacts"))
    monkeypatch.setenv("BCD_CACHE_DIR", str(root / "cache"))
    monkeypatch.setattr(worker, "spawn_worker", lambda: 0)
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/compare.py").run()
    at.multiselect(key="compare_selected").set_value([lab["whole"], lab["masked"]]).run()
    assert not at.exception, at.exception
    (table,) = [d.value for d in at.dataframe if {"as trained", "flagged regions masked"} <= set(d.value.columns)]
    rows = table.set_index("masked in training")
    whole, masked = lab["audits"][lab["whole"]], lab["audits"][lab["masked"]]
    assert rows.loc["none", "flagged regions masked"] == pytest.approx(whole.flagged_masked.estimate)
    assert rows.loc[BOTTOM_RIGHT, "as trained"] == pytest.approx(masked.as_trained.estimate)
    charts = {c.proto.id.rpartition("-")[2]: json.loads(c.proto.spec) for c in at.get("plotly_chart")}
    grid = np.array(charts[f"compare_occlusion_{lab['whole']}"]["data"][0]["z"])  # the run's latest audit
    assert np.unravel_index(grid.argmax(), grid.shape) == (len(grid) - 1, len(grid) - 1)  # bottom-right is hottest


def test_train_on_the_command_line_says_what_it_masked_and_why(lab, tmp_path, capfd, monkeypatch):
    workspace_store(tmp_path, monkeypatch).close()
    capfd.readouterr()
    args = ["train", "--data", str(lab["data"]), "--backbone", "scratch_cnn", "--image-size", "32", "--epochs", "1"]
    code = cli.main([*args, "--augment", "1", "--val-fraction", "0.2", "--test-fraction", "0.3"])
    lines = capfd.readouterr().out.splitlines()
    reason = lab["store"].get_run(lab["masked"]).config["mask"]["reason"]  # the same images and split: same audit
    assert code == 0 and "bottom-right corner" in reason
    assert [line for line in lines if line.startswith("masked regions: ")] == [
        f"masked regions: {BOTTOM_RIGHT} ({reason})"
    ]
