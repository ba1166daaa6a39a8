"""Tests of bcd_engine.comparison (the Compare page's data) on a run store filled through the RunStore API."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import CLASSES, completed_run, fill_store, scored_evaluation

from bcd_engine.data.scan import scan_dataset
from bcd_engine.reports import comparison
from bcd_engine.reports import runs as run_tables
from bcd_engine.store import Protocol, RunStore, latest_evaluation
from ui import charts

# The labels the Compare page has always shown for fill_store's runs.
HOLDOUT = "holdout (group-aware, stratified)"
CV = "3-fold CV (group-aware, stratified)"
LODO = "leave-one-dataset-out, held out Segmented"


@pytest.fixture
def filled(store: RunStore, synthetic_dataset: Path) -> tuple[RunStore, dict]:
    return store, fill_store(store, synthetic_dataset)


def _everything(db: RunStore) -> tuple[list, dict]:
    runs = db.list_runs()
    return runs, comparison.evaluations_by_run(db, [r.id for r in runs if r.status == "completed"])


def test_format_interval():
    assert comparison.format_interval(0.9961, 0.99, 1.0) == "0.996 (0.990–1.000)"
    assert comparison.format_interval(0.5) == "0.500 (no CI)"
    assert comparison.format_interval(None, 0.1, 0.2) == "n/a"
    assert comparison.format_interval(float("nan")) == "n/a"


def test_runs_table_and_intervals_carry_the_stored_confidence_intervals(filled):
    db, ids = filled
    runs, evaluations = _everything(db)
    test = latest_evaluation(evaluations[ids["holdout"]])
    ci = test.metrics["confidence_intervals"]["accuracy"]
    expected = f"{test.metrics['accuracy']:.3f} ({ci['low']:.3f}–{ci['high']:.3f})"

    table = comparison.runs_table(run_tables.runs_frame(db), evaluations).set_index("id")
    assert list(table.columns[:5]) == ["backbone", "dataset", "status", "accuracy (95% CI)", "macro AUC (95% CI)"]
    assert table.loc[ids["holdout"], "dataset"].endswith("images, SYNTHETIC)")  # the fixture's set, as registered
    assert table.loc[ids["holdout"], "accuracy (95% CI)"] == expected
    assert table.loc[ids["failed"], "accuracy (95% CI)"] == "n/a"

    frame = comparison.intervals_frame(runs, evaluations).set_index("run")
    assert ids["failed"] not in frame.index and len(frame) == 5
    row = frame.loc[ids["holdout"]]
    assert (row["accuracy_low"], row["accuracy"], row["accuracy_high"]) == (
        ci["low"],
        test.metrics["accuracy"],
        ci["high"],
    )
    assert row["protocol"] == HOLDOUT and HOLDOUT in row["label"] and row["n"] == 12
    assert frame.loc[ids["lodo"], "protocol"] == LODO + comparison.IN_DOMAIN_NOTE  # not the held-out figure
    bars = charts.error_bar(frame, "accuracy")
    assert bars["array"][0] == pytest.approx(ci["high"] - test.metrics["accuracy"])
    assert min(bars["array"] + bars["arrayminus"]) >= 0

    run = db.get_run(ids["holdout"])
    assert comparison.run_label_with_protocol(run, test) == f"run {run.id}: resnet50 · {HOLDOUT} · accuracy {expected}"
    assert expected in charts.figure_title(run, test) and "macro AUC" in charts.figure_title(run, test)
    assert set(comparison.reference_frame()["95% CI"]) == {"not reported"}


def test_cv_runs_are_grouped_summarised_and_pooled(filled):
    db, ids = filled
    runs, evaluations = _everything(db)
    (group,) = comparison.cv_groups(runs)
    assert [r.id for r in group.runs] == ids["cv"]
    assert (group.protocol.label, group.backbone, group.folds) == (CV, "mobilenetv2", 3)
    assert group.label == f"mobilenetv2 · {CV} · runs {ids['cv'][0]}–{ids['cv'][-1]}"

    folds = comparison.cv_folds_frame([group], evaluations)
    assert list(folds["fold"]) == ["1/3", "2/3", "3/3"] and list(folds["n"]) == [16, 16, 16]
    accuracies = [db.get_run(i).test_accuracy for i in ids["cv"]]
    assert list(folds["accuracy"]) == pytest.approx(accuracies)
    assert all("–" in text for text in folds["accuracy (95% CI)"])

    (row,) = comparison.cv_summary_frame([group], evaluations).to_dict("records")
    assert row["folds"] == "3 of 3 completed" and row["n"] == 48
    assert row["accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert row["accuracy_std"] == pytest.approx(np.std(accuracies, ddof=1))
    assert row["accuracy (mean ± std)"] == f"{np.mean(accuracies):.3f} ± {np.std(accuracies, ddof=1):.3f}"

    names, counts = comparison.pooled_confusion(group, evaluations)
    tests = [latest_evaluation(evaluations[i]) for i in ids["cv"]]
    assert names == CLASSES
    assert counts == np.sum([t.confusion_matrix for t in tests], axis=0).tolist()
    assert np.sum(counts) == 48 and np.sum(counts, axis=1).tolist() == [12, 12, 12, 12]
    pooled, low, high = comparison.pooled_accuracy(counts)
    assert pooled == pytest.approx(np.trace(counts) / 48) and low <= pooled <= high
    assert row["pooled accuracy (95% CI)"] == comparison.format_interval(pooled, low, high)


def test_cv_groups_split_restarts_interleaving_and_other_configs(store):
    def run(protocol, backbone="resnet50", config=None):
        return store.create_run(backbone=backbone, protocol=protocol, config=config or {"data_dir": "/d"})

    def fold(k, folds=3):
        return Protocol.kfold(k, folds=folds)

    first = [run(fold(1)), run(fold(2))]  # stopped after two folds
    other = run(fold(1, 2), backbone="vgg16")
    second = [run(fold(1)), run(fold(2))]
    other_2 = run(fold(2, 2), backbone="vgg16")
    second.append(run(fold(3)))
    different = run(fold(1), config={"data_dir": "/elsewhere"})
    run(Protocol.holdout())
    run(Protocol.kfold(folds=3))  # a cross-validation as a whole is no fold run
    run(Protocol.lodo("Segmented"))
    groups = comparison.cv_groups(store.list_runs())
    assert [[r.id for r in g.runs] for g in groups] == [first, [other, other_2], second, [different]]
    assert [g.folds for g in groups] == [3, 2, 3, 3]
    assert [g.protocol.label for g in groups] == [CV, "2-fold CV (group-aware, stratified)", CV, CV]
    summary = comparison.cv_summary_frame(groups, {})
    assert list(summary["folds"]) == ["0 of 3 completed", "0 of 2 completed", "0 of 3 completed", "0 of 3 completed"]
    assert set(summary["accuracy (mean ± std)"]) == {"n/a"} and set(summary["pooled accuracy (95% CI)"]) == {"n/a"}
    assert comparison.pooled_confusion(groups[0], {}) is None


def test_pooled_accuracy_is_a_binomial_bootstrap():
    assert comparison.pooled_accuracy([[5, 0], [0, 5]]) == (1.0, 1.0, 1.0)
    accuracy, low, high = comparison.pooled_accuracy([[90, 10], [10, 90]])
    assert accuracy == 0.9 and 0.84 <= low < 0.9 < high <= 0.95
    assert comparison.pooled_accuracy([[90, 10], [10, 90]]) == (accuracy, low, high)  # seeded


def test_lodo_rows_have_in_domain_and_held_out_accuracy_with_intervals(filled):
    db, ids = filled
    runs, evaluations = _everything(db)
    (row,) = comparison.lodo_frame(runs, evaluations).to_dict("records")
    test = latest_evaluation(evaluations[ids["lodo"]])
    held = latest_evaluation(evaluations[ids["lodo"]], "held-out Segmented")
    assert (row["held_out"], row["backbone"], row["run"]) == ("Segmented", "resnet50", ids["lodo"])
    assert (row["in_domain"], row["n_in_domain"]) == (test.metrics["accuracy"], 12)
    assert (row["held_out_accuracy"], row["n_held_out"]) == (held.metrics["accuracy"], 24)
    assert row["drop"] == pytest.approx(test.metrics["accuracy"] - held.metrics["accuracy"])
    assert row["held-out accuracy (95% CI)"] == comparison.format_interval(*comparison.interval(held, "accuracy"))
    assert row["in_domain_low"] <= row["in_domain"] <= row["in_domain_high"]


def test_lodo_run_without_its_held_out_evaluation_says_n_a(store, synthetic_dataset):
    paths = sorted(str(p) for p in synthetic_dataset.glob("*/*.png"))
    run_id = completed_run(
        store,
        "vgg16",
        Protocol.lodo("Other"),
        str(synthetic_dataset),
        [scored_evaluation("test", paths[::6], str(synthetic_dataset), right=0.8, seed=3)],
    )
    (row,) = comparison.lodo_frame(store.list_runs(), comparison.evaluations_by_run(store, [run_id])).to_dict("records")
    assert row["held_out"] == "Other" and row["held-out accuracy (95% CI)"] == "n/a"
    assert row["n_held_out"] is None and np.isnan(row["drop"])


def test_reliability_frame_holds_the_stored_non_empty_bins(filled):
    db, ids = filled
    test = latest_evaluation(db.get_evaluations(ids["holdout"]))
    bins = comparison.reliability_frame(test)
    stored = test.metrics["reliability"]
    assert bins["count"].sum() == 12 and (bins["count"] > 0).all()
    assert len(bins) == sum(1 for c in stored["count"] if c)
    assert bins["width"].tolist() == pytest.approx([1 / 15] * len(bins))
    assert ((bins["low"] < bins["confidence"]) & (bins["confidence"] <= bins["high"])).all()
    weighted_gap = (bins["count"] * (bins["accuracy"] - bins["confidence"]).abs()).sum() / 12
    assert weighted_gap == pytest.approx(test.metrics["ece"])
    assert comparison.reliability_frame(dataclasses.replace(test, metrics={"accuracy": 0.9})).empty


def test_shortcut_audit_is_cached_by_dataset_content(synthetic_dataset_copy, isolated_cache, tmp_path):
    scan = scan_dataset(synthetic_dataset_copy)
    assert comparison.cached_audit(scan) is None
    audit = comparison.run_audit(scan)
    path = isolated_cache / "audits" / f"{comparison.audit_key(scan)}.json"
    assert path.is_file() and comparison.cached_audit(scan) == json.loads(path.read_text()) == audit
    assert audit["root"] == scan.root and {"leakage", "shortcuts"} <= audit.keys()
    shortcuts = audit["shortcuts"]
    assert 0 <= shortcuts["chance_accuracy"] <= shortcuts["colour_only_accuracy"] <= 1
    assert comparison.audit_explanation(audit).startswith(
        f"Colour statistics alone reach {shortcuts['colour_only_accuracy']:.1%}: a model's accuracy close to this "
        "may come from colour, not cell shape."
    )
    refs = comparison.audit_references({scan.root: audit})
    assert list(refs["reference"]) == ["colour only", "corner only", "chance"]
    assert set(refs["dataset"]) == {"dataset"}

    moved = scan_dataset(shutil.copytree(synthetic_dataset_copy, tmp_path / "elsewhere"))
    assert comparison.audit_key(moved) == comparison.audit_key(scan)  # same content: same audit
    first = next((synthetic_dataset_copy / "Benign").glob("*.png"))
    first.rename(synthetic_dataset_copy / "Early" / first.name)  # one image relabelled: different content
    assert comparison.cached_audit(scan_dataset(synthetic_dataset_copy)) is None
    path.write_text("{not json")
    assert comparison.cached_audit(scan) is None


def test_dataset_roots_are_distinct_and_sorted(filled, synthetic_dataset):
    db, _ = filled
    assert comparison.dataset_roots(db.list_runs()) == [str(synthetic_dataset.resolve())]


def _with_train(db: RunStore, run_id: int, **train) -> None:
    """Give a stored run a fuller train config (as training stores it)."""
    config = db.get_run(run_id).config
    db.update_run_config(run_id, {**config, "train": {**config["train"], **train}})


def test_settings_diff_shows_only_the_settings_that_differ(filled, tmp_path):
    db, ids = filled
    first, second, third = ids["cv"]
    common = {"learning_rate": 0.001, "epochs": 10, "augment": {"factor": 8, "flips": True}, "dense_units": 256}
    _with_train(db, first, **common)
    _with_train(db, second, **{**common, "learning_rate": 0.0003, "augment": {"factor": 1, "flips": True}})
    _with_train(db, third, **{**common, "weights": str(tmp_path / "resnet50_imagenet_notop.weights.h5")})
    runs = [db.get_run(i) for i in (first, second, third)]

    diff = comparison.settings_diff(runs).set_index("setting")
    assert list(diff.columns) == [f"run {first}", f"run {second}", f"run {third}"]
    assert list(diff.index) == ["protocol", "starting weights", "learning rate", "training views per image"]
    assert list(diff.loc["learning rate"]) == ["0.001", "0.0003", "0.001"]
    assert list(diff.loc["training views per image"]) == ["8", "1", "8"]
    assert list(diff.loc["starting weights"]) == ["imagenet", "imagenet", "file resnet50_imagenet_notop.weights.h5"]
    assert comparison.settings_diff(runs[:1]).empty  # one run differs from nothing
    assert comparison.settings_diff([runs[0], runs[0]]).empty


def test_runs_on_different_datasets_are_grouped_and_said_not_comparable(store, synthetic_dataset, tmp_path):
    other = shutil.copytree(synthetic_dataset, tmp_path / "Segmented")
    paths = sorted(str(p) for p in Path(other).glob("*/*.png"))
    here = fill_store(store, synthetic_dataset)
    there = completed_run(
        store,
        "resnet50",
        Protocol.holdout(),
        str(other),
        [scored_evaluation("test", paths[::4], str(other), right=0.7, seed=3)],
    )
    runs = [store.get_run(i) for i in (here["holdout"], there, here["cv"][0])]
    groups = comparison.runs_by_dataset(runs)
    assert [[run.id for run in group] for group in groups.values()] == [[here["holdout"], here["cv"][0]], [there]]
    note = comparison.not_comparable_note(groups)
    assert "2 different datasets" in note and f"Segmented: run {there}" in note and "not comparable" in note
    assert comparison.not_comparable_note(comparison.runs_by_dataset(runs[:1])) is None


def test_calibration_note_says_what_the_temperature_did_and_the_rule(filled):
    db, ids = filled
    test = latest_evaluation(db.get_evaluations(ids["holdout"]))
    worse = dataclasses.replace(
        test, metrics={**test.metrics, "ece": 0.043, "ece_calibrated": 0.080, "temperature": 1.32}
    )
    note = comparison.calibration_note(worse, tta_views=8)
    assert note.startswith("ECE 0.043 → 0.080 on the test images with temperature 1.32 (softened answers).")
    assert "keeps it only when it lowers both their log-loss and their ECE" in note
    assert "worse calibrated here" in note and "average 8 test-time views" in note
    better = dataclasses.replace(
        test, metrics={**test.metrics, "ece": 0.09, "ece_calibrated": 0.03, "temperature": 0.8}
    )
    assert "sharpened" in comparison.calibration_note(better, tta_views=1)
    assert "worse" not in comparison.calibration_note(better, tta_views=1)
    kept = dataclasses.replace(test, metrics={**test.metrics, "ece": 0.05, "ece_calibrated": 0.05, "temperature": 1.0})
    assert comparison.calibration_note(kept).startswith("ECE 0.050, temperature left at 1")
