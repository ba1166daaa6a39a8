"""k-fold cross-validation: folds cover the data once, groups never cross, one stored run per fold."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from bcd_engine.errors import ConfigError
from bcd_engine.models.config import AugmentConfig, TrainConfig
from bcd_engine.protocols import crossval
from bcd_engine.protocols.crossval import cross_validate, fold_splits
from bcd_engine.store import Protocol
from bcd_engine.training.run import train

pytestmark = pytest.mark.every_backend  # CI runs this file on JAX too (README: Keras backends)


def test_fold_splits_are_disjoint_cover_the_data_and_keep_groups_together():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    groups = np.arange(120) // 2  # pairs of near-duplicates
    rng.shuffle(groups)
    splits = fold_splits(labels, groups, folds=5, val_fraction=0.15, seed=0)
    tests = np.concatenate([s.test for s in splits])
    assert sorted(tests.tolist()) == list(range(120))
    for split in splits:
        parts = [set(split.train), set(split.val), set(split.test)]
        assert sum(map(len, parts)) == 120 and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        subset_of_group = {}
        for name, idx in (("train", split.train), ("val", split.val), ("test", split.test)):
            for g in groups[idx]:
                assert subset_of_group.setdefault(g, name) == name


def test_cross_validate_stores_one_run_per_fold(workspace, synthetic_dataset):
    store = workspace
    config = TrainConfig(
        backbone="mobilenetv2",
        weights=None,
        image_size=32,
        epochs=1,
        batch_size=8,
        dense_units=8,
        augment=AugmentConfig(factor=1),
    )
    result = cross_validate(config, synthetic_dataset, folds=2, store=store)
    assert result.protocol == "2-fold CV (group-aware, stratified)"
    assert [f.fold for f in result.folds] == [1, 2]
    assert sum(f.n_test for f in result.folds) == 48
    accuracies = [f.accuracy for f in result.folds]
    assert result.mean["accuracy"] == pytest.approx(np.mean(accuracies))
    assert result.std["accuracy"] == pytest.approx(np.std(accuracies, ddof=1))  # sample std over folds
    runs = sorted(store.list_runs(), key=lambda r: r.id)
    assert [r.protocol for r in runs] == [Protocol.kfold(1, folds=2), Protocol.kfold(2, folds=2)]
    assert [r.protocol.label for r in runs] == [f"2-fold CV (group-aware, stratified), fold {k}/2" for k in (1, 2)]
    assert [r.id for r in runs] == [f.run_id for f in result.folds]


def test_folds_train_on_the_scan_their_splits_were_made_from(workspace, synthetic_dataset, tmp_path, monkeypatch):
    data = shutil.copytree(synthetic_dataset, tmp_path / "data")
    first_image = sorted((data / "Benign").iterdir())[0]
    scan_dataset = crossval.scan_dataset

    def scan_then_a_file_arrives(root, **kwargs):
        scan = scan_dataset(root, **kwargs)
        shutil.copy(first_image, data / "Benign" / "0-arrived-during-cv.png")  # sorts first: would shift indices
        return scan

    monkeypatch.setattr(crossval, "scan_dataset", scan_then_a_file_arrives)
    config = TrainConfig(
        backbone="scratch_cnn",
        weights=None,
        image_size=32,
        epochs=1,
        batch_size=8,
        dense_units=8,
        augment=AugmentConfig(factor=1),
    )
    result = cross_validate(config, data, folds=2, store=workspace)
    scanned = sorted(str(p.resolve()) for p in data.glob("*/*") if "arrived" not in p.name)
    for row in result.folds:
        split = workspace.get_split(row.run_id)
        assert sorted(s["path"] for s in split) == scanned


def test_training_refuses_a_scan_of_another_folder(workspace, synthetic_dataset, tmp_path):
    other = shutil.copytree(synthetic_dataset, tmp_path / "other")
    with pytest.raises(ConfigError, match="the scan given is of"):
        train(
            TrainConfig(backbone="scratch_cnn", image_size=32),
            synthetic_dataset,
            store=workspace,
            scan=crossval.scan_dataset(other),
        )


def test_a_folder_given_under_home_is_stored_expanded(workspace, synthetic_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    data = shutil.copytree(synthetic_dataset, tmp_path / "data")
    config = TrainConfig(
        backbone="scratch_cnn",
        weights=None,
        image_size=32,
        epochs=1,
        batch_size=8,
        dense_units=8,
        augment=AugmentConfig(factor=1),
    )
    result = train(config, "~/data", store=workspace, scan=crossval.scan_dataset("~/data"))
    assert workspace.get_run(result.run_id).config["data_dir"] == str(data.resolve())


def test_cross_validate_needs_two_folds(workspace, synthetic_dataset):
    with pytest.raises(ConfigError, match="folds must be >= 2, got 1"):
        cross_validate(TrainConfig(backbone="scratch_cnn", image_size=32), synthetic_dataset, folds=1, store=workspace)
    assert workspace.list_runs() == []
