"""Leave-one-dataset-out: one held-out dataset per round, never in its training folder, evaluated once."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from helpers import workspace_store
from PIL import Image

from bcd_engine.data.synthetic import make_synthetic_dataset
from bcd_engine.errors import ConfigError, DataError
from bcd_engine.models.config import AugmentConfig, TrainConfig
from bcd_engine.protocols.lodo import (
    _link_folder,
    held_out_evaluation_name,
    leave_one_dataset_out,
    load_dataset_label_map,
)
from bcd_engine.store import Protocol

CONFIG = TrainConfig(
    backbone="scratch_cnn", image_size=32, epochs=1, batch_size=8, dense_units=8, augment=AugmentConfig(factor=1)
)
LABEL_MAP = {
    "alpha": {"Benign": "benign", "Early": "malignant", "Pre": "malignant", "Pro": "malignant"},
    "beta": {"normal": "benign", "blast_a": "malignant", "blast_b": "malignant", "blast_c": "malignant"},
    "gamma": {"lymphocyte": "benign"},
}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def images(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*") if p.is_file())


def folders_in(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Two 4-class datasets with different class names and a benign-only one.

    Beta holds a copy of a gamma image; alpha holds a mirrored re-save (other bytes) of another gamma image.
    """
    root = tmp_path_factory.mktemp("lodo-data")
    alpha = make_synthetic_dataset(root / "alpha", n_per_class=5, image_size=32, seed=1)
    beta = make_synthetic_dataset(
        root / "beta", n_per_class=5, image_size=32, seed=2, class_names=("normal", "blast_a", "blast_b", "blast_c")
    )
    gamma = make_synthetic_dataset(
        root / "gamma", n_per_class=6, image_size=32, seed=3, class_names=("lymphocyte", "unused")
    )
    shutil.rmtree(gamma / "unused")
    shutil.copy(images(gamma)[0], beta / "normal" / "copied-from-gamma.png")
    with Image.open(images(gamma)[1]) as img:
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(alpha / "Benign" / "mirrored-from-gamma.png")
    return {"alpha": alpha, "beta": beta, "gamma": gamma}


@pytest.fixture(scope="module")
def lodo(tmp_path_factory, datasets):
    """One LODO over the three datasets (three trainings), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("lodo-run")
    with pytest.MonkeyPatch.context() as mp:
        store = workspace_store(tmp, mp)
        result = leave_one_dataset_out(CONFIG, datasets, LABEL_MAP, store=store)
        yield result, store, tmp / "cache"


def test_each_dataset_is_held_out_in_exactly_one_round(lodo, datasets):
    result, store, cache = lodo
    json.dumps(result.to_dict())  # one JSON document
    assert result.protocol == "leave-one-dataset-out" and result.shared_labels == ["benign", "malignant"]
    assert Path(result.workdir).parent == cache / "lodo"
    assert result.datasets["gamma"].labels == {"benign": 6}
    assert [r.held_out for r in result.rounds] == ["alpha", "beta", "gamma"]
    for row in result.rounds:
        assert row.status == "completed" and row.reason is None
        assert row.train_datasets == [n for n in datasets if n != row.held_out]
        assert row.n_held_out == len(images(datasets[row.held_out]))
        assert 0 <= row.in_domain_accuracy <= 1 and 0 <= row.held_out_accuracy <= 1
        run = store.get_run(row.run_id)
        assert run.protocol == Protocol.lodo(row.held_out)
        assert run.protocol.label == f"leave-one-dataset-out, held out {row.held_out}"
    assert len(store.list_runs()) == 3


def test_held_out_images_are_evaluated_once_and_never_trained_on(lodo, datasets):
    result, store, _ = lodo
    evaluated = Counter()
    for row in result.rounds:
        held_out = datasets[row.held_out]
        (evaluation,) = [
            e
            for e in store.get_evaluations(row.run_id)
            if e.name == held_out_evaluation_name(row.held_out) == f"held-out {row.held_out}"
        ]
        paths = [p.path for p in store.get_predictions(evaluation.id)]
        assert sorted(paths) == [str(p.resolve()) for p in images(held_out)]
        evaluated.update(paths)
        held_out_md5s = {md5(p) for p in images(held_out)}
        train_folder = Path(result.workdir) / f"without-{row.held_out}"
        trained_on = [Path(s["path"]) for s in store.get_split(row.run_id)]
        assert {p.parent.parent for p in trained_on} == {train_folder.resolve()}
        assert not held_out_md5s & {md5(p) for p in images(train_folder)}
        assert {p.name.split("__")[0] for p in trained_on} == set(row.train_datasets)
    assert set(evaluated.values()) == {1}
    assert len(evaluated) == sum(len(images(d)) for d in datasets.values())
    # The copies of gamma images in alpha and beta are left out of training whenever either side is held out.
    assert [r.excluded_duplicates for r in result.rounds] == [1, 1, 2]


def test_a_single_class_dataset_is_a_held_out_set(lodo):
    result, _, _ = lodo
    gamma = result.rounds[2]
    assert gamma.held_out_labels == ["benign"] and gamma.held_out_macro_auc is None
    assert gamma.confusion_matrix["labels"] == ["benign", "malignant"]
    rates = gamma.per_label_rate
    assert list(rates) == ["benign"] and sum(rates["benign"].values()) == pytest.approx(1)
    assert gamma.held_out_accuracy == pytest.approx(rates["benign"]["benign"])


def test_rounds_without_two_training_labels_or_with_unseen_labels_are_skipped(workspace, datasets):
    label_map = {"alpha": LABEL_MAP["alpha"], "gamma": {"lymphocyte": "normal"}}
    subset = {"alpha": datasets["alpha"], "gamma": datasets["gamma"]}
    result = leave_one_dataset_out(CONFIG, subset, label_map, store=workspace)
    alpha, gamma = result.rounds
    assert alpha.status == gamma.status == "skipped" and alpha.run_id is None
    assert "only the shared label 'normal'" in alpha.reason
    assert "'normal'" in gamma.reason and "do not occur in the training datasets" in gamma.reason
    assert workspace.list_runs() == []
    assert leave_one_dataset_out(CONFIG, subset, label_map, store=workspace).workdir == result.workdir


@pytest.mark.parametrize(
    "label_map, error, message",
    [
        ({"delta": {"x": "benign"}}, ConfigError, "unknown dataset.*'delta'"),
        ({"gamma": {"Blast": "malignant"}}, DataError, "dataset 'gamma' names class.*'Blast'.*lymphocyte"),
        ({"gamma": ["benign"]}, ConfigError, "label map must be"),
        ([], ConfigError, "label map must be"),
        ({"gamma": {"lymphocyte": "benign"}, "alpha": {"Benign": "Benign"}}, ConfigError, "differ only in case"),
        ({"gamma": {"lymphocyte": "a/b"}}, ConfigError, "shared label 'a/b' cannot be used as a folder name"),
    ],
)
def test_label_map_errors(workspace, datasets, label_map, error, message):
    subset = {"alpha": datasets["alpha"], "gamma": datasets["gamma"]}
    with pytest.raises(error, match=message):
        leave_one_dataset_out(CONFIG, subset, label_map, store=workspace)


def test_dataset_errors(workspace, datasets, tmp_path):
    with pytest.raises(ConfigError, match="at least 2 datasets"):
        leave_one_dataset_out(CONFIG, {"alpha": datasets["alpha"]}, {}, store=workspace)
    with pytest.raises(ConfigError, match="'alpha' and 'again' are the same folder"):
        leave_one_dataset_out(CONFIG, {"alpha": datasets["alpha"], "again": datasets["alpha"]}, {}, store=workspace)
    with pytest.raises(ConfigError, match=r"dataset name '\.\./x'"):
        leave_one_dataset_out(CONFIG, {"alpha": datasets["alpha"], "../x": datasets["gamma"]}, {}, store=workspace)
    bad = tmp_path / "map.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot read label map"):
        load_dataset_label_map(bad)
    bad.write_text(json.dumps(LABEL_MAP))
    assert load_dataset_label_map(bad) == LABEL_MAP


def test_training_folder_falls_back_to_hard_links_then_copies(tmp_path, monkeypatch, datasets):
    source = images(datasets["gamma"])[0]

    def refuse(*args, **kwargs):
        raise OSError("not supported here")

    monkeypatch.setattr(Path, "symlink_to", refuse)
    folder = _link_folder(tmp_path / "hard", {Path("benign") / "g.png": str(source)})
    assert (folder / "benign" / "g.png").stat().st_ino == source.stat().st_ino
    monkeypatch.setattr("os.link", refuse)
    folder = _link_folder(tmp_path / "copy", {Path("benign") / "g.png": str(source)})
    copied = folder / "benign" / "g.png"
    assert md5(copied) == md5(source) and copied.stat().st_mtime_ns == source.stat().st_mtime_ns


def test_training_folder_is_reused_when_its_sources_are_the_same_and_rebuilt_when_not(tmp_path, datasets):
    first, second = images(datasets["gamma"])[:2]
    folder = _link_folder(tmp_path / "without-x", {Path("benign") / "a.png": str(first)})
    link = folder / "benign" / "a.png"
    made = link.lstat().st_ino
    assert _link_folder(tmp_path / "without-x", {Path("benign") / "a.png": str(first)}) == folder
    assert link.lstat().st_ino == made  # not rebuilt
    _link_folder(tmp_path / "without-x", {Path("benign") / "b.png": str(second)})
    assert [p.name for p in images(folder)] == ["b.png"]
    assert folders_in(tmp_path) == ["without-x"]  # no half-built or stale folder left


def test_concurrent_rounds_with_the_same_inputs_share_one_whole_folder(tmp_path, datasets):
    from concurrent.futures import ThreadPoolExecutor

    sources = {Path("benign") / p.name: str(p) for p in images(datasets["gamma"])}
    for attempt in range(20):  # a race shows only now and then: give it many chances
        parent = tmp_path / str(attempt)
        with ThreadPoolExecutor(8) as pool:
            folders = list(pool.map(lambda _, folder=parent / "without-x": _link_folder(folder, sources), range(8)))
        assert set(folders) == {parent / "without-x"}
        assert sorted(p.name for p in images(folders[0])) == sorted(p.name for p in sources)
        assert folders_in(parent) == ["without-x"]


def test_a_failed_build_leaves_nothing_behind_and_a_stuck_lock_is_a_clear_error(tmp_path, datasets, monkeypatch):
    from filelock import FileLock

    import bcd_engine.protocols.lodo as lodo_module

    def link_or_fail(source: Path, link: Path) -> None:
        if not source.exists():
            raise OSError("cannot link")
        link.symlink_to(source)

    sources = {Path("benign") / "a.png": str(images(datasets["gamma"])[0]), Path("benign") / "b.png": "/missing"}
    monkeypatch.setattr(lodo_module, "_link", link_or_fail)
    with pytest.raises(OSError, match="cannot link"):
        _link_folder(tmp_path / "without-x", sources)
    assert folders_in(tmp_path) == []  # no half-built folder left
    monkeypatch.setattr(lodo_module, "_BUILD_LOCK_SECONDS", 0.2)
    with FileLock(tmp_path / ".without-y.lock"), pytest.raises(DataError, match="another run has been building"):
        _link_folder(tmp_path / "without-y", sources)  # as if another process held the lock
