"""Typed results print the JSON the dict results printed: ``--json`` is byte for byte what it was.

Each test runs the command in-process on a fixed input (the engine's heavy parts replaced by fixed answers) and
compares its stdout with the document the dict-returning code emitted, built here by hand in that code's key order.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bcd_engine import cli
from bcd_engine.data.classes import ALL_CLASSES
from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.splits import holdout_split
from bcd_engine.data.synthetic import make_synthetic_dataset
from bcd_engine.errors import ConfigError
from bcd_engine.inference import calibrate
from bcd_engine.inference.diagnosis import OUT_OF_DOMAIN_ADVICE
from bcd_engine.inference.results import NO_ANSWER_IN_WORDS, Diagnosis, Reading
from bcd_engine.protocols import audit, crossval, lodo

CLASSES = ["Benign", "Early", "Pre", "Pro"]


@pytest.fixture
def run_cli(monkeypatch, isolated_cache, capfd):
    """``python -m bcd_engine ARGS --json`` in this process: (exit code, stdout). No store is opened."""
    monkeypatch.setattr(cli, "_import_tensorflow", lambda: None)  # nothing here runs a model
    monkeypatch.setattr(cli.RunStore, "open", classmethod(lambda cls, *args: SimpleNamespace()))

    def run(*args) -> tuple[int, str]:
        capfd.readouterr()
        code = cli.main([*map(str, args), "--json"])
        return code, capfd.readouterr().out

    return run


def printed(document) -> str:
    """What ``--json`` printed for ``document``."""
    return json.dumps(document, indent=2) + "\n"


class ChanceModel:
    """A run's model at chance (1/4 for each class, whatever the image) whose gate scores every image ``score``."""

    class_names, config, synthetic = CLASSES, SimpleNamespace(image_size=32), False

    def __init__(self, run_id: int, score: float):
        self.run_id = run_id
        gate = SimpleNamespace(threshold=10.0, score=lambda features: np.full(len(features), score))
        self.trust = SimpleNamespace(gate=gate, calibrate=lambda probabilities: probabilities)

    def forward_with_features(self, images):
        return np.full((len(images), 4), 0.25), np.zeros((len(images), 8))


def test_predict_json_is_what_the_dict_results_printed(run_cli, monkeypatch, tmp_path):
    from PIL import Image

    image, junk = tmp_path / "smear.png", tmp_path / "junk.png"
    Image.new("RGB", (40, 40), "purple").save(image)
    junk.write_bytes(b"\x00" * 64)
    quarter = dict.fromkeys(CLASSES, 0.25)
    models = {1: ChanceModel(1, 1.0), 2: ChanceModel(2, 50.0)}
    monkeypatch.setattr(
        cli.Diagnoser, "for_runs", classmethod(lambda cls, run_ids, *, store: cls([models[i] for i in run_ids]))
    )

    assert run_cli("predict", "--run", 1, image, junk) == (
        0,
        printed(
            [
                {
                    "predicted_class": "Benign",
                    "in_words": "Looks like hematogones — benign",
                    "class_meaning": ALL_CLASSES[0].meaning,
                    "probabilities": quarter,
                    "calibrated_probabilities": quarter,
                    "uncertainty": {"confidence": 0.25, "margin": 0.0, "disagreement": 0.0, "spread": 0.0, "views": 1},
                    "in_domain": True,
                    "ood_score": 1.0,
                    "ood_threshold": 10.0,
                    "reading": "unsure",
                    "advice": "The model is unsure: it leans towards Benign (25%) but other classes are close. "
                    "Do not rely on this result; ask a specialist.",
                    "path": str(image),
                },
                {"error": "not a recognised image format", "path": str(junk)},
            ]
        ),
    )
    # An ensemble names the run whose gate refused the image; out of domain, the advice says why there is no answer.
    # Changed on purpose (issue 25): out of domain, no class, meaning, probability or uncertainty is given (null);
    # the model's output is kept apart under "model_output_ignored".
    assert run_cli("predict", "--run", 1, "--run", 2, image) == (
        0,
        printed(
            [
                {
                    "predicted_class": None,
                    "in_words": NO_ANSWER_IN_WORDS,
                    "class_meaning": None,
                    "probabilities": None,
                    "calibrated_probabilities": None,
                    "uncertainty": None,
                    "in_domain": False,
                    "ood_score": 50.0,
                    "ood_threshold": 10.0,
                    "ood_run": 2,
                    "reading": "out_of_domain",
                    "advice": OUT_OF_DOMAIN_ADVICE,
                    "model_output_ignored": {
                        "predicted_class": "Benign",
                        "probabilities": quarter,
                        "calibrated_probabilities": quarter,
                        "uncertainty": {
                            "confidence": 0.25,
                            "margin": 0.0,
                            "disagreement": 0.0,
                            "spread": 0.0,
                            "views": 2,
                        },
                    },
                    "path": str(image),
                },
            ]
        ),
    )


def test_a_diagnosis_reads_as_its_reading_says():
    refused = Diagnosis.unusable("a.png", "too large")
    assert not refused.usable and refused.reading is Reading.UNUSABLE and refused.answer is None
    assert refused.to_dict() == {"name": "a.png", "error": "too large"}
    out = Diagnosis(
        "b.png",
        Reading.OUT_OF_DOMAIN,
        advice="No answer.",
        predicted_class="Pro",
        probabilities={},
        calibrated_probabilities={},
        uncertainty={},
        in_domain=False,
        ood_score=9.0,
        ood_threshold=1.0,
    )
    # Changed on purpose (issue 25): the refused image's class is no longer in "predicted_class" (null), only under
    # "model_output_ignored".
    assert out.usable and out.answer is None and out.confidence is None and out.to_dict()["predicted_class"] is None
    assert out.to_dict()["model_output_ignored"]["predicted_class"] == "Pro"
    assert "ood_run" not in out.to_dict() and out.to_dict()["reading"] == "out_of_domain"


def test_cv_json_is_what_the_dict_result_printed(run_cli, monkeypatch, synthetic_dataset):
    figures = iter([(11, 30, 24, 0.75, 0.9), (12, 28, 24, 0.5, None)])

    def train(config, data_dir, *, store, split, scan, progress, protocol):
        run_id, n_train, n_test, accuracy, auc = next(figures)
        return SimpleNamespace(run_id=run_id, n_train=n_train, n_test=n_test, test_accuracy=accuracy, macro_auc=auc)

    monkeypatch.setattr(crossval, "train", train)
    assert run_cli("cv", "--data", synthetic_dataset, "--backbone", "scratch_cnn", "--folds", 2) == (
        0,
        printed(
            {
                "protocol": "2-fold CV (group-aware, stratified)",
                "folds": [
                    {"fold": 1, "run_id": 11, "n_train": 30, "n_test": 24, "accuracy": 0.75, "macro_auc": 0.9},
                    {"fold": 2, "run_id": 12, "n_train": 28, "n_test": 24, "accuracy": 0.5, "macro_auc": None},
                ],
                "mean": {"accuracy": 0.625, "macro_auc": None},
                "std": {"accuracy": statistics.stdev([0.75, 0.5]), "macro_auc": None},
            }
        ),
    )


def test_lodo_json_is_what_the_dict_result_printed(run_cli, monkeypatch, synthetic_dataset, tmp_path):
    other = make_synthetic_dataset(
        tmp_path / "other", n_per_class=8, image_size=32, seed=1, class_names=("normal", "blast")
    )
    label_map = tmp_path / "map.json"
    label_map.write_text(
        json.dumps(
            {
                "all": {"Benign": "benign", "Early": "malignant", "Pre": "malignant", "Pro": "malignant"},
                "other": {"normal": "benign", "blast": "malignant"},
            }
        )
    )

    def train(config, train_dir, *, store, progress, protocol):
        if Path(train_dir).name == "without-other":
            raise ConfigError("out of memory")
        return SimpleNamespace(
            run_id=7, status="completed", n_train=11, n_val=2, n_test=3, test_accuracy=2 / 3, macro_auc=0.5
        )

    evaluation = SimpleNamespace(
        class_names=["benign", "malignant"], accuracy=0.8125, macro_auc=0.75, confusion_matrix=[[3, 1], [0, 4]]
    )
    monkeypatch.setattr(lodo, "train", train)
    monkeypatch.setattr(lodo, "evaluate_run_on_folder", lambda *args, **kwargs: evaluation)
    workdir = Path(
        lodo._default_workdir(  # where the CLI's rounds build their folders (under the test's cache)
            {"all": scan_dataset(synthetic_dataset), "other": scan_dataset(other)},
            {
                "all": {"Benign": "benign", "Early": "malignant", "Pre": "malignant", "Pro": "malignant"},
                "other": {"normal": "benign", "blast": "malignant"},
            },
        )
    )
    labels = ["benign", "malignant"]
    assert run_cli(
        "lodo",
        "--data",
        f"all={synthetic_dataset}",
        "--data",
        f"other={other}",
        "--label-map",
        label_map,
        "--backbone",
        "scratch_cnn",
    ) == (
        0,
        printed(
            {
                "protocol": "leave-one-dataset-out",
                "shared_labels": labels,
                "workdir": str(workdir),
                "datasets": {
                    "all": {"root": str(synthetic_dataset), "n_images": 48, "labels": {"benign": 12, "malignant": 36}},
                    "other": {"root": str(other), "n_images": 16, "labels": {"benign": 8, "malignant": 8}},
                },
                "rounds": [
                    {
                        "held_out": "all",
                        "status": "completed",
                        "reason": None,
                        "run_id": 7,
                        "train_datasets": ["other"],
                        "train_labels": labels,
                        "excluded_duplicates": 0,
                        "n_train": 11,
                        "n_val": 2,
                        "n_test_in_domain": 3,
                        "in_domain_accuracy": 2 / 3,
                        "in_domain_macro_auc": 0.5,
                        "n_held_out": 48,
                        "held_out_labels": labels,
                        "held_out_accuracy": 0.8125,
                        "held_out_macro_auc": 0.75,
                        "confusion_matrix": {"labels": labels, "counts": [[3, 1], [0, 4]]},
                        "per_label_rate": {
                            "benign": {"benign": 0.75, "malignant": 0.25},
                            "malignant": {"benign": 0.0, "malignant": 1.0},
                        },
                    },
                    {
                        "held_out": "other",
                        "status": "failed",
                        "reason": "out of memory",
                        "run_id": None,
                        "train_datasets": ["all"],
                        "train_labels": labels,
                        "excluded_duplicates": 0,
                        "n_train": None,
                        "n_val": None,
                        "n_test_in_domain": None,
                        "in_domain_accuracy": None,
                        "in_domain_macro_auc": None,
                        "n_held_out": 16,
                        "held_out_labels": labels,
                        "held_out_accuracy": None,
                        "held_out_macro_auc": None,
                        "confusion_matrix": None,
                        "per_label_rate": None,
                    },
                ],
            }
        ),
    )


def test_audit_json_is_what_the_dict_result_printed(run_cli, monkeypatch, synthetic_dataset):
    shortcuts = {
        "colour_only_accuracy": 0.9,
        "corner_only_accuracy": 0.8,
        "opposite_corner_accuracy": 0.7,
        "chance_accuracy": 0.25,
        "colour_shortcut": True,
        "corner_shortcut": True,
        "n_train": 36,
        "n_test": 12,
        "image_size": 64,
        "corner_fraction": 0.25,
        "seed": 3,
        "seconds": 1.5,
        "interpretation": "Colour alone tells the classes apart.",
    }
    monkeypatch.setattr(audit, "shortcut_audit", lambda scan, **options: shortcuts)
    scan = scan_dataset(synthetic_dataset)
    leakage = audit.leakage_audit(
        scan, holdout_split(scan.labels, scan.groups, seed=3, val_fraction=0.15, test_fraction=0.3)
    )
    assert run_cli(
        "audit", "--data", synthetic_dataset, "--seed", 3, "--val-fraction", 0.15, "--test-fraction", 0.3
    ) == (0, printed({"leakage": leakage, "shortcuts": shortcuts}))


def test_an_export_takes_the_typed_audit_or_its_dict():
    from bcd_engine.export.card import audit_parts

    shortcuts = {"colour_only_accuracy": 0.9, "corner_only_accuracy": 0.8, "chance_accuracy": 0.25}
    leakage = {"ok": False, "warnings": ["2 duplicate group(s) cross subsets"]}
    typed = audit.DatasetAudit(leakage=leakage, shortcuts=shortcuts)
    assert audit_parts(typed) == audit_parts(typed.to_dict()) == (shortcuts, leakage) and not typed.ok


def test_calibrate_json_is_what_the_dict_result_printed(run_cli, monkeypatch, tmp_path):
    rows = []
    for i, subset in enumerate(["train", "train", "val", "test", "test"]):
        (tmp_path / f"{i}.png").write_bytes(b"png")
        rows.append({"path": str(tmp_path / f"{i}.png"), "subset": subset, "class_name": "a"})
    evaluation = SimpleNamespace(id=5, metrics={"ece": 0.125})
    added = []
    store = SimpleNamespace(
        get_split=lambda run_id: rows,
        latest_evaluation=lambda run_id: evaluation,
        get_predictions=lambda evaluation_id: [SimpleNamespace(path=r["path"], probabilities=[0.5, 0.5]) for r in rows],
        add_evaluation_metrics=lambda evaluation_id, metrics: added.append(metrics),
    )
    monkeypatch.setattr(cli.RunStore, "open", classmethod(lambda cls, *args: store))
    loaded = SimpleNamespace(
        class_names=["a", "b"],
        model=None,
        preprocess=lambda: None,
        config=SimpleNamespace(image_size=32, colour="rgb", batch_size=8, tta_views=1),
    )
    monkeypatch.setattr(calibrate, "load_run_model", lambda run_id, *, store: loaded)
    monkeypatch.setattr(calibrate, "load_split_images", lambda paths, **options: np.zeros((len(paths), 1)))
    metrics = {
        "temperature": 1.5,
        "ece_calibrated": 0.0625,
        "ood_threshold": 42.0,
        "ood_pass_rate": 0.95,
        "ood_flagged": 1,
        "ood_flagged_share": 0.5,
    }  # fit_trust's figures, in its order
    monkeypatch.setattr(calibrate, "fit_trust", lambda *args, **kwargs: ("trust", dict(metrics)))
    monkeypatch.setattr(calibrate, "save_trust", lambda trust, run_id, *, store: None)
    assert run_cli("calibrate", "--run", 4) == (
        0,
        printed(
            {
                "run_id": 4,
                "ece": 0.125,
                "temperature": 1.5,
                "ece_calibrated": 0.0625,
                "ood_threshold": 42.0,
                "ood_pass_rate": 0.95,
                "ood_flagged": 1,
                "ood_flagged_share": 0.5,
                "images": {"train": 2, "val": 1, "test": 2},
            }
        ),
    )
    assert added == [metrics]
