"""Class mode: ``prepare-class`` on a tiny synthetic set, a bounded head training on its pack, the host's runs
beside it, and the class-mode panel of demo mode's Train page (AppTest), which writes nothing anywhere."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import APP
from streamlit.testing.v1 import AppTest

from bcd_engine import cli
from bcd_engine.classroom import (
    HeadSettings,
    HeadTraining,
    RemoteTraining,
    class_queue,
    find_packs,
    host_runs,
    load_pack,
    prepare_pack,
)
from bcd_engine.classroom import session as bounds
from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.splits import holdout_split
from bcd_engine.errors import BusyError, ConfigError, DataError
from bcd_engine.store import Protocol, RunStore

VIEWS = 2


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory, synthetic_dataset) -> Path:
    """The class folder that ``prepare-class`` wrote for the tiny synthetic set (VGG16, random weights, 32 px)."""
    root = tmp_path_factory.mktemp("class")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BCD_CACHE_DIR", str(root / "cache"))
        argv = ["prepare-class", "--data", str(synthetic_dataset), "--image-size", "32", "--views", str(VIEWS)]
        assert cli.main([*argv, "--out", str(root / "packs"), "--json"]) == 0
    return root / "packs"


@pytest.fixture(scope="module")
def pack(pack_dir):
    (only,), problems = find_packs(pack_dir)
    assert problems == []
    return only


def test_prepare_class_writes_a_pack_with_the_train_split_and_duplicate_groups_on_one_side(
    pack_dir, pack, synthetic_dataset
):
    folder = pack_dir / pack.name
    assert sorted(p.name for p in folder.iterdir()) == ["features.npz", "pack.json"]
    meta = json.loads((folder / "pack.json").read_text())
    scan = scan_dataset(synthetic_dataset)
    assert meta["dataset"] == {"name": "dataset", "n_images": 48, "synthetic": True, "fingerprint": scan.fingerprint}
    assert meta["backbone"] == "vgg16" and meta["weights"] == "random-seed-0" and meta["image_size"] == 32
    assert str(synthetic_dataset) not in (folder / "pack.json").read_text()  # no server path in the pack
    assert pack.split == holdout_split(scan.labels, scan.groups, seed=0)  # the split Train makes with seed 0
    subsets = [set(pack.groups[getattr(pack.split, name)]) for name in ("train", "val", "test")]
    assert not (subsets[0] & subsets[1] or subsets[0] & subsets[2] or subsets[1] & subsets[2])
    assert pack.features.shape == (48, 512) and pack.train_views.shape == (len(pack.split.train), VIEWS - 1, 512)
    x, y = pack.training_data(VIEWS)
    assert x.shape == (len(pack.split.train) * VIEWS, 512)
    assert np.array_equal(y[::VIEWS], pack.labels[pack.split.train])
    assert load_pack(folder).split == pack.split


@pytest.fixture(scope="module")
def trained(pack):
    """(the training, its result): 3 epochs on the pack, queued on the class queue in this process."""
    training = HeadTraining(pack, HeadSettings(views=VIEWS, dense_units=32, epochs=3, learning_rate=1e-2))
    job = class_queue().submit(training.steps(), visitor="a student")
    assert job.wait(120)
    return training, job.result()


def test_a_head_training_reports_curves_a_confusion_matrix_and_its_protocol(pack, trained):
    training, result = trained
    counts = np.array(result.confusion_matrix)
    assert counts.shape == (4, 4) and counts.sum() == result.n_test == len(pack.split.test)
    assert result.test_accuracy == pytest.approx(np.trace(counts) / counts.sum())
    assert result.accuracy_interval[0] <= result.test_accuracy <= result.accuracy_interval[1]
    assert [e.epoch for e in result.history] == [1, 2, 3] == [e.epoch for e in training.history]
    assert result.n_train_rows == len(pack.split.train) * VIEWS and 1 <= result.best_epoch <= 3
    assert "holdout on the pack's split" in result.protocol and "frozen vgg16 features" in result.protocol
    assert result.seconds > 0 and json.loads(json.dumps(result.to_dict()))["settings"]["views"] == VIEWS


def test_a_training_stops_at_its_compute_limit_and_a_session_runs_one_at_a_time(pack):
    limited = HeadTraining(pack, HeadSettings(epochs=bounds.MAX_EPOCHS), max_seconds=0)
    job = class_queue().submit(limited.steps(), visitor="one tab")
    with pytest.raises(BusyError, match="1 jobs waiting"):
        class_queue().submit(HeadTraining(pack, HeadSettings(epochs=1)).steps(), visitor="one tab")
    other = class_queue().submit(HeadTraining(pack, HeadSettings(epochs=1)).steps(), visitor="another tab")
    assert job.wait(120) and other.wait(120)
    result = job.result()
    assert len(result.history) == 1 and result.stopped.startswith("time limit")
    assert len(other.result().history) == 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (HeadSettings(views=VIEWS + 1), "views must be between 1 and 2"),
        (HeadSettings(epochs=bounds.MAX_EPOCHS + 1), "epochs must be between 1 and"),
        (HeadSettings(dense_units=100), "head size must be one of"),
        (HeadSettings(learning_rate=1.0), "learning rate must be between"),
    ],
)
def test_settings_outside_the_class_bounds_are_refused(pack, settings, message):
    with pytest.raises(ConfigError, match=message):
        HeadTraining(pack, settings)


def test_the_class_worker_trains_in_a_child_process_and_drops_a_training_closed_early(pack_dir, pack, trained):
    source = (str(pack_dir), pack.name)
    dropped = RemoteTraining(source, HeadSettings(epochs=5), max_views=pack.views).steps()
    assert next(dropped) == (1, 5)
    dropped.close()  # as the queue closes a job whose visitor left
    remote = RemoteTraining(source, trained[0].settings, max_views=pack.views)
    job = class_queue().submit(remote.steps(), visitor="a student")
    assert job.wait(180)
    result = job.result()
    assert [e.epoch for e in remote.history] == [1, 2, 3] and result.n_test == trained[1].n_test
    assert result.confusion_matrix == trained[1].confusion_matrix  # the same seeds give the same head
    with pytest.raises(ConfigError, match="views must be between 1 and 2"):
        RemoteTraining(source, HeadSettings(views=3), max_views=pack.views)


def test_a_backbone_whose_features_are_all_alike_is_refused(synthetic_dataset):
    with pytest.raises(DataError, match="gives every image the same features"):
        prepare_pack(synthetic_dataset, backbone="mobilenetv2", image_size=32, views=1, use_feature_cache=False)


def test_the_host_runs_beside_a_result_are_the_stores_runs_on_the_same_images(pack, trained, store):
    def run(fingerprint: str, accuracy: float, seed: int) -> int:
        config = {
            "train": {"seed": seed, "val_fraction": 0.15, "test_fraction": 0.15},
            "dataset": {"name": "dataset", "n_images": 48, "synthetic": True, "fingerprint": fingerprint},
        }
        run_id = store.create_run(backbone="resnet50", protocol=Protocol.holdout(), config=config, status="running")
        store.start_run(run_id, environment={})
        store.finish_run(run_id, status="completed", test_accuracy=accuracy)
        return run_id

    same, reseeded = run(pack.dataset.fingerprint, 0.8, 0), run(pack.dataset.fingerprint, 0.9, 1)
    run("another dataset", 0.99, 0)
    found = host_runs(store, trained[1])
    assert [(r.run_id, r.same_split) for r in found] == [(reseeded, False), (same, True)]


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the sha256 of its contents."""
    files = [path for path in root.rglob("*") if path.is_file()]
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


@pytest.fixture
def demo_app(tmp_path, monkeypatch, pack_dir):
    monkeypatch.setenv("BCD_DEMO_MODE", "1")
    monkeypatch.setenv("BCD_DATABASE_URL", f"sqlite:///{tmp_path / 'results.db'}")
    monkeypatch.setenv("BCD_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("BCD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BCD_CLASS_DIR", str(pack_dir))
    RunStore.open().close()  # the store exists before the page, as on a host
    return tmp_path


def _train_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/train.py").run()
    assert not at.exception, at.exception
    return at


def test_the_class_mode_panel_trains_a_head_and_writes_nothing(demo_app, pack_dir, pack):
    store_before = _tree(demo_app)["results.db"]
    at = _train_page()  # the app's start draws and scans the SYNTHETIC demo set into the cache, as it always does
    before = {"workspace": _tree(demo_app), "packs": _tree(pack_dir)}
    assert before["workspace"]["results.db"] == store_before
    assert "Class mode: train a model in seconds" in [s.value for s in at.subheader]
    assert not any("Training is switched off in demo mode" in i.value for i in at.info)
    assert at.selectbox(key="class_dataset").options == ["dataset (48 images, SYNTHETIC, not medical data)"]
    at.slider(key="class_epochs").set_value(2)
    at.slider(key="class_views").set_value(VIEWS)
    at.button(key="class_train").click().run()
    assert not at.exception, at.exception
    assert at.button(key="class_train").disabled  # one training per tab at a time
    assert at.session_state["class.live"].job.wait(120)
    at.run()  # the live panel collects the result and reruns the page
    assert not at.exception, at.exception
    [(number, result)] = at.session_state["class.results"]
    assert number == 1 and len(result.history) == 2 and result.settings.views == VIEWS
    assert [m.label for m in at.metric] == ["Test accuracy"] and at.metric[0].value == f"{result.test_accuracy:.1%}"
    assert any("Protocol: holdout on the pack's split" in c.value for c in at.caption)
    charts = {c.proto.id.rpartition("-")[2] for c in at.get("plotly_chart")}
    assert {"class_matrix", "class_curves"} <= charts
    [table] = [d.value for d in at.dataframe if "who" in d.value.columns]
    assert table["who"].tolist() == ["you: training 1"]
    assert not at.button(key="class_train").disabled
    assert {"workspace": _tree(demo_app), "packs": _tree(pack_dir)} == before


def test_without_a_pack_class_mode_offers_the_synthetic_set_and_computes_nothing_until_asked(demo_app, monkeypatch):
    monkeypatch.setenv("BCD_CLASS_DIR", str(demo_app / "no-packs"))
    at = _train_page()
    assert at.selectbox(key="class_dataset").options == ["SYNTHETIC demo set"]
    assert at.slider(key="class_views").max == 4
    assert not (demo_app / "no-packs").exists()
