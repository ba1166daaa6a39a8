"""A trained model travels: a run trained from a weights file that is then deleted keeps working, and a run
moves between stores as one bundle (``export --format bundle``, ``import``) with the same answers, while a bad
bundle is refused in one line with the store unchanged."""

from __future__ import annotations

import hashlib
import json
import tempfile
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import APP
from streamlit.testing.v1 import AppTest

from bcd_engine.cli import main
from bcd_engine.data.images import load_images
from bcd_engine.errors import BundleError, RerunError
from bcd_engine.export.run_bundle import MANIFEST, import_bundle, write_bundle
from bcd_engine.inference.diagnosis import Diagnoser
from bcd_engine.inference.explain import explain_image
from bcd_engine.inference.loading import load_run_model
from bcd_engine.models.config import TrainConfig
from bcd_engine.store import RunStore
from bcd_engine.training import worker
from bcd_engine.training.queue import queue_again
from bcd_engine.training.run import train
from ui import common

IMAGE_SIZE = 32


def use_store(patch: pytest.MonkeyPatch, root: Path) -> RunStore:
    """Make the store and artifacts under ``root`` the ones the engine and the CLI use; open it."""
    url = f"sqlite:///{root / 'results.db'}"
    patch.setenv("BCD_DATABASE_URL", url)
    patch.setenv("BCD_ARTIFACTS_DIR", str(root / "artifacts"))
    return RunStore.open(url)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, synthetic_dataset):
    """A lab's store with a MobileNetV2 run trained from a local weights file that was deleted afterwards."""
    root = tmp_path_factory.mktemp("lab")
    weights = root / "mobilenetv2_notop.weights.h5"
    keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3)
    ).save_weights(weights)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BCD_CACHE_DIR", str(root / "cache"))
        store = use_store(patch, root)
        config = TrainConfig.for_backbone(
            "mobilenetv2",
            weights=str(weights),
            image_size=IMAGE_SIZE,
            epochs=2,
            batch_size=8,
            augment=2,
            tta_views=2,
            dense_units=16,
            patience=2,
        )
        result = train(config, synthetic_dataset, store=store)
        assert result.status == "completed"
        weights.unlink()
        images = sorted(Path(synthetic_dataset).rglob("*.png"))[::7]
        yield {"root": root, "store": store, "run_id": result.run_id, "weights": weights, "images": images}


@pytest.fixture
def in_lab(lab, monkeypatch):
    """The lab's store as the engine's and the CLI's."""
    use_store(monkeypatch, lab["root"])
    monkeypatch.setenv("BCD_CACHE_DIR", str(lab["root"] / "cache"))
    return lab


def cli(capfd, *args) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, the last line of stderr)."""
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, (err.strip().splitlines() or [""])[-1]


def answers(store: RunStore, run_id: int, images: list[Path]) -> dict:
    """What run ``run_id`` says about ``images``: probabilities, gate verdicts and Grad-CAM heatmaps."""
    loaded = load_run_model(run_id, store=store)
    pixels = load_images([str(p) for p in images], image_size=IMAGE_SIZE)
    results = Diagnoser([loaded]).diagnose_arrays([pixels])
    return {
        "probabilities": np.array([list(r.calibrated_probabilities.values()) for r in results]),
        "verdicts": [(r.in_domain, round(r.ood_score, 6)) for r in results],
        "heatmaps": np.stack([explain_image(loaded, image).heatmap for image in pixels]),
    }


def test_a_run_whose_weights_file_is_gone_predicts_explains_evaluates_and_exports(
    in_lab, synthetic_dataset, tmp_path, capfd
):
    run_id, image = in_lab["run_id"], in_lab["images"][0]
    assert not in_lab["weights"].exists()
    code, out, err = cli(capfd, "predict", "--run", run_id, "--json", image)
    assert code == 0, err
    assert json.loads(out)[0]["predicted_class"] in {"Benign", "Early", "Pre", "Pro"}
    assert cli(capfd, "explain", "--run", run_id, "--out", tmp_path / "cam.png", image)[0] == 0
    assert (tmp_path / "cam.png").stat().st_size > 0
    assert cli(capfd, "evaluate", "--run", run_id, "--data", synthetic_dataset, "--json")[0] == 0
    for fmt in ("keras", "tflite", "bundle"):
        code, out, err = cli(capfd, "export", "--run", run_id, "--format", fmt, "--out", tmp_path / fmt, "--json")
        assert code == 0, err
        assert all(Path(f).is_file() for f in json.loads(out)["files"])

    code, out, err = cli(capfd, "rerun", "--run", run_id)
    assert code == 2 and out == ""
    assert err.startswith("bcd: error:") and f"weights file {in_lab['weights']}, which is gone" in err
    assert f"rerun --run {run_id} --weights PATH" in err
    with pytest.raises(RerunError, match="which is gone"):
        queue_again(in_lab["store"], run_id)
    assert [r.id for r in in_lab["store"].list_runs()] == [run_id]  # nothing queued


def test_diagnose_and_compare_pages_use_a_run_whose_weights_file_is_gone(in_lab, monkeypatch):
    monkeypatch.delenv("BCD_DEMO_MODE", raising=False)
    monkeypatch.setattr(worker, "spawn_worker", lambda: 0)
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/diagnose.py").run()
    assert at.multiselect(key="diagnose_runs").value == [in_lab["run_id"]]
    image = in_lab["images"][0]
    at.file_uploader(key="diagnose_upload").set_value((image.name, image.read_bytes(), "image/png")).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.subheader[0].value == common.plain(image.name)  # a visitor's file name, shown as text
    assert at.metric[0].label == "Predicted class" or "out of domain" in at.caption[0].value.lower()

    at.switch_page("pages/compare.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.selectbox(key="compare_bundle_run").value == in_lab["run_id"]
    (download,) = [b for b in at.get("download_button") if b.proto.label == "Download bundle"]
    assert download.proto.label == "Download bundle"


def test_rerun_takes_a_copy_of_the_weights_file(in_lab, tmp_path):
    copy = tmp_path / "copy.weights.h5"
    keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3)
    ).save_weights(copy)
    store = in_lab["store"]
    new_id = queue_again(store, in_lab["run_id"], weights=copy)
    try:
        queued = store.get_run(new_id)
        assert queued.status == "queued" and queued.config["train"]["weights"] == str(copy)
    finally:
        store.delete_run(new_id)


def test_a_bundle_carries_the_run_to_another_store_with_the_same_answers(in_lab, tmp_path, monkeypatch, capfd):
    lab_store, run_id, images = in_lab["store"], in_lab["run_id"], in_lab["images"]
    source = answers(lab_store, run_id, images)
    code, out, err = cli(capfd, "export", "--run", run_id, "--format", "bundle", "--out", tmp_path, "--json")
    assert code == 0, err
    (bundle,) = json.loads(out)["files"]

    demo = use_store(monkeypatch, tmp_path / "demo")
    code, out, err = cli(capfd, "import", bundle, "--json")
    assert code == 0, err
    new_id = json.loads(out)["run_id"]
    imported, original = demo.get_run(new_id), lab_store.get_run(run_id)
    assert imported.status == "completed" and imported.backbone == original.backbone
    assert (imported.test_accuracy, imported.macro_auc) == (original.test_accuracy, original.macro_auc)
    assert (imported.host, imported.environment["backend"]) == (original.host, original.environment["backend"])
    assert imported.started_at == original.started_at and imported.seconds == original.seconds
    assert imported.dataset == original.dataset
    provenance = imported.config["imported"]
    assert provenance["source_run_id"] == run_id
    assert provenance["bundle_sha256"] == hashlib.sha256(Path(bundle).read_bytes()).hexdigest()
    assert imported.config["dataset"]["fingerprint"] == original.config["dataset"]["fingerprint"]
    assert {k: v for k, v in imported.config.items() if k not in ("imported", "dataset")} == {
        k: v for k, v in original.config.items() if k != "dataset"
    }
    assert demo.get_split(new_id) == lab_store.get_split(run_id)
    assert [e.val_loss for e in demo.get_epochs(new_id)] == [e.val_loss for e in lab_store.get_epochs(run_id)]
    moved_evaluations, source_evaluations = demo.get_evaluations(new_id), lab_store.get_evaluations(run_id)
    assert [(e.name, e.metrics, e.confusion_matrix, e.roc) for e in moved_evaluations] == [
        (e.name, e.metrics, e.confusion_matrix, e.roc) for e in source_evaluations
    ]
    assert [p.probabilities for p in demo.get_predictions(moved_evaluations[0].id)] == [
        p.probabilities for p in lab_store.get_predictions(source_evaluations[0].id)
    ]

    moved = answers(demo, new_id, images)
    np.testing.assert_allclose(moved["probabilities"], source["probabilities"], atol=1e-6)
    assert moved["verdicts"] == source["verdicts"]
    np.testing.assert_allclose(moved["heatmaps"], source["heatmaps"], atol=1e-5)
    code, out, _ = cli(capfd, "predict", "--run", new_id, "--json", images[0])
    assert code == 0
    np.testing.assert_allclose(
        list(json.loads(out)[0]["calibrated_probabilities"].values()), source["probabilities"][0], atol=1e-6
    )


def rewritten(
    bundle: Path,
    target: Path,
    *,
    replace: dict[str, bytes | None] = (),
    add: dict[str, bytes] = (),
    manifest: bool = True,
) -> Path:
    """A copy of ``bundle`` with members replaced (None: removed) or added; the manifest's checksums follow the
    changes when ``manifest``."""
    replace, add = dict(replace), dict(add)
    with zipfile.ZipFile(bundle) as source:
        contents = {name: source.read(name) for name in source.namelist()}
    for name, content in replace.items():
        if content is None:
            contents.pop(name)
        else:
            contents[name] = content
    contents.update(add)
    if manifest:
        doc = json.loads(contents[MANIFEST])
        doc["members"] = {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for name, data in contents.items()
            if name != MANIFEST
        }
        contents[MANIFEST] = json.dumps(doc).encode()
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for name, data in contents.items():
            out.writestr(name, data)
    return target


def written(target: Path, content: bytes) -> Path:
    target.write_bytes(content)
    return target


def unsafe_model() -> bytes:
    """A .keras file with a Lambda layer: arbitrary code that safe mode refuses to load."""
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    outputs = keras.layers.Dense(4, activation="softmax")(keras.layers.Lambda(lambda x: x[:, 0, 0, :] * 2)(inputs))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        keras.Model(inputs, outputs).save(path)
        return path.read_bytes()


BAD_BUNDLES = {
    "not a zip": ("not a run bundle", lambda bundle, target: written(target, b"PK\x03\x04 broken")),
    "wrong checksum": (
        "does not match the sha256",
        lambda bundle, target: rewritten(
            bundle, target, replace={"labels.json": b'{"class_names": ["a", "b"]}'}, manifest=False
        ),
    ),
    "manifest not an object": (
        "manifest is not one of bundle format",
        lambda bundle, target: rewritten(bundle, target, replace={MANIFEST: b"[]"}, manifest=False),
    ),
    "missing member": (
        "lacks model.keras",
        lambda bundle, target: rewritten(bundle, target, replace={"model.keras": None}),
    ),
    "path outside the bundle": (
        "never has",
        lambda bundle, target: rewritten(bundle, target, add={"../../evil.py": b"print('pwned')"}),
    ),
    "unsafe model": (
        "cannot be loaded safely",
        lambda bundle, target: rewritten(bundle, target, replace={"model.keras": unsafe_model()}),
    ),
    "zip bomb": (
        "zip bomb",
        lambda bundle, target: rewritten(bundle, target, replace={"split.json": b" " * (8 << 20) + b"[]"}),
    ),
    "not completed": (
        "not completed",
        lambda bundle, target: rewritten(bundle, target, replace={"run.json": _with_status(bundle, "failed")}),
    ),
}


def _with_status(bundle: Path, status: str) -> bytes:
    with zipfile.ZipFile(bundle) as source:
        doc = json.loads(source.read("run.json"))
    return json.dumps({**doc, "status": status}).encode()


@pytest.fixture(scope="module")
def good_bundle(lab, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        use_store(patch, lab["root"])
        return write_bundle(lab["run_id"], out_dir=tmp_path_factory.mktemp("bundle"), store=lab["store"])


@pytest.mark.parametrize("kind", sorted(BAD_BUNDLES))
def test_a_bad_bundle_is_refused_in_one_line_and_leaves_the_store_unchanged(
    kind, good_bundle, tmp_path, monkeypatch, capfd
):
    fragment, make = BAD_BUNDLES[kind]
    bad = make(good_bundle, tmp_path / "bad.zip")
    demo = use_store(monkeypatch, tmp_path / "demo")
    with pytest.raises(BundleError, match=fragment):
        import_bundle(bad, store=demo)
    code, out, err = cli(capfd, "import", bad)
    assert code == 2 and out == "" and err.startswith("bcd: error:") and fragment in err
    assert demo.list_runs() == [] and demo.list_datasets() == []
    assert not (tmp_path / "demo" / "artifacts").exists() or not any((tmp_path / "demo" / "artifacts").iterdir())
