"""The CLI as a user scripts it: one JSON document on stdout, one-line errors with exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from bcd_engine import cli
from bcd_engine.data.colour import COLOUR_MODES
from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.splits import DEFAULT_FRACTION
from bcd_engine.data.synthetic import make_synthetic_dataset
from bcd_engine.errors import RerunError, RunNotFoundError, WriteError
from bcd_engine.export.bundle import FORMATS
from bcd_engine.models.backbones import BACKBONES
from bcd_engine.models.config import OPTIMIZERS, POOLINGS, TrainConfig
from bcd_engine.protocols.baselines import MODELS
from bcd_engine.store import Protocol, RunStore
from bcd_engine.training.queue import queue_again, queue_run
from bcd_engine.training.run import train
from bcd_engine.training.worker import run_worker

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Finished:
    """What one CLI command left behind: its exit code and what it wrote on stdout and stderr."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def bcd(tmp_path, monkeypatch, capfd):
    """``bcd(*args)`` runs ``python -m bcd_engine ARGS`` in this process (``cli.main``, its output captured at the
    file descriptors) on a store, artifacts and cache under ``tmp_path``; what it left, as a child process would."""
    monkeypatch.setenv("BCD_DATABASE_URL", f"sqlite:///{tmp_path / 'results.db'}")
    monkeypatch.setenv("BCD_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("BCD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", cli.QUIET_TF_LOG_LEVEL)  # the CLI's own level; restored afterwards

    def run(*args) -> Finished:
        capfd.readouterr()  # what came before is not this command's
        try:
            code = cli.main([str(arg) for arg in args])
        except SystemExit as exit_:  # argparse's refusal ends the process with this code
            code = exit_.code
        out, err = capfd.readouterr()
        return Finished(code, out, err)

    return run


def bcd_process(*args) -> Finished:
    """``python -m bcd_engine ARGS`` as a child process with this process's environment (the store ``bcd`` set)
    and the CLI's own log level: for what only a fresh process shows (exit codes, TensorFlow's start-up lines)."""
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run(
        [sys.executable, "-m", "bcd_engine", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return Finished(proc.returncode, proc.stdout, proc.stderr)


def assert_one_line_error(proc: Finished, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]  # progress bars may come before it
    assert last.startswith("bcd: error:") and proc.stderr.count("bcd: error:") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert fragment in last


def test_scan_json_is_one_document(synthetic_dataset, bcd):
    proc = bcd_process("scan", "--data", synthetic_dataset, "--json")  # a real process's stdout
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["n_images"] == sum(doc["classes"].values()) > 0
    assert set(doc) >= {"n_images", "classes", "unreadable", "duplicate_groups", "near_duplicate_groups"}


def test_scan_reports_unreadable_files_and_still_succeeds(synthetic_dataset, tmp_path, bcd):
    data = tmp_path / "data"
    shutil.copytree(synthetic_dataset, data)
    broken = data / sorted(p.name for p in data.iterdir() if p.is_dir())[0] / "broken.jpg"
    broken.write_text("<html>not an image</html>")
    doc = json.loads(bcd("scan", "--data", data, "--json").stdout)
    assert [u["path"] for u in doc["unreadable"]] == [str(broken)]


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: d, "is empty"),
        (lambda d: _one_class(d), "at least two classes"),
    ],
)
def test_scan_bad_folders(tmp_path, bcd, make, fragment):
    assert_one_line_error(bcd("scan", "--data", make(tmp_path)), fragment)


def _one_class(folder: Path) -> Path:
    from PIL import Image

    (folder / "Benign").mkdir()
    Image.new("RGB", (16, 16), "red").save(folder / "Benign" / "a.png")
    return folder


def test_folder_without_a_readable_image(tmp_path, bcd):
    for name in ("A", "B"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jpg").write_bytes(b"")
    assert_one_line_error(bcd("scan", "--data", tmp_path), "could be read")


@pytest.mark.parametrize("args, fragment", [(["fly"], "invalid choice"), (["runs", "--colour"], "unrecognized")])
def test_unknown_command_or_option(bcd, args, fragment):
    assert_one_line_error(bcd(*args), fragment)
    assert_one_line_error(bcd_process(*args), fragment)  # argparse's exit code is the process's


def test_unreachable_database(bcd, monkeypatch):
    monkeypatch.setenv("BCD_DATABASE_URL", "postgresql://bcd:secret@127.0.0.1:1/nowhere")
    proc = bcd("runs", "--json")
    assert_one_line_error(proc, "127.0.0.1:1")
    assert "secret" not in proc.stderr


def test_train_evaluate_predict_end_to_end(synthetic_dataset, tmp_path, bcd):
    proc = bcd_process(
        "train",
        "--data",
        synthetic_dataset,
        "--backbone",
        "mobilenetv2",
        "--weights",
        "none",
        "--image-size",
        32,
        "--epochs",
        2,
        "--batch-size",
        8,
        "--augment",
        2,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    for noise in ("oneDNN", "cuInit", "absl::InitializeLog", "cuda drivers", "shuffle"):  # TensorFlow's and Keras'
        assert noise not in proc.stderr, proc.stderr
    trained = json.loads(proc.stdout)
    assert trained["status"] == "completed" and 0 <= trained["test_accuracy"] <= 1
    for key in ("run_id", "backbone", "protocol", "n_train", "n_val", "n_test", "macro_auc", "seconds"):
        assert key in trained
    run_id = trained["run_id"]

    evaluated = json.loads(bcd("evaluate", "--run", run_id, "--data", synthetic_dataset, "--json").stdout)
    assert evaluated["n_images"] == trained["n_train"] + trained["n_val"] + trained["n_test"]
    assert sum(map(sum, evaluated["confusion_matrix"])) == evaluated["n_images"]
    assert 0 <= evaluated["ood_flagged"] <= evaluated["n_images"]
    calibrated = json.loads(bcd("calibrate", "--run", run_id, "--json").stdout)
    assert calibrated["temperature"] >= 1 and calibrated["images"]["test"] == trained["n_test"]
    assert calibrated["ood_pass_rate"] == 0.99 and 0 <= calibrated["ood_flagged"] <= trained["n_test"]

    images = sorted(Path(synthetic_dataset).glob("*/*.png"))[:2]
    junk = tmp_path / "junk.jpg"
    junk.write_text("not an image")
    proc = bcd("predict", "--run", run_id, *images, junk, "--json")
    assert proc.returncode == 0, proc.stderr
    predictions = json.loads(proc.stdout)
    assert [p["path"] for p in predictions] == [str(p) for p in [*images, junk]]
    for p in predictions[:2]:  # the result contract: the raw output, the gate's verdict, calibrated probabilities
        assert isinstance(p["in_domain"], bool) and p["ood_score"] >= 0 and p["ood_threshold"] > 0
        assert (p["reading"] == "out_of_domain") == (not p["in_domain"])
        # out of domain, the output is no answer: kept apart (issue 25), the answer's fields null
        output = p if p["in_domain"] else p.pop("model_output_ignored")
        assert p["in_domain"] or p["predicted_class"] is p["calibrated_probabilities"] is None
        assert abs(sum(output["probabilities"].values()) - 1) < 1e-4
        assert abs(sum(output["calibrated_probabilities"].values()) - 1) < 1e-4
    assert "error" in predictions[2] and "predicted_class" not in predictions[2]
    assert bcd("predict", "--run", run_id, junk).returncode == 1

    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("inside.png", images[0].read_bytes())
        zf.writestr("readme.txt", "not an image")
    table = tmp_path / "results.csv"
    proc = bcd("predict", "--run", run_id, "--tta", "--csv", table, images[0].parent, archive, "--json")
    assert proc.returncode == 0, proc.stderr
    batch = json.loads(proc.stdout)
    n_folder = len(list(images[0].parent.glob("*.png")))
    assert len(batch) == n_folder + 2 and batch[n_folder]["path"] == f"{archive}/inside.png"
    assert all(0 <= r["uncertainty"]["disagreement"] <= 1 and r["reading"] for r in batch[: n_folder + 1])
    assert "not a supported image" in batch[-1]["error"]
    assert len(table.read_text().splitlines()) == len(batch) + 1

    overlay = tmp_path / "cam.png"
    proc = bcd("explain", "--run", run_id, images[0], "--out", overlay, "--json")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(overlay).size == (32, 32)

    for fmt, model_file in (("keras", "model.keras"), ("tflite", "model.tflite")):
        proc = bcd("export", "--run", run_id, "--format", fmt, "--out", tmp_path / fmt, "--json")
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / fmt / model_file).is_file()
        assert "Not a medical device" in (tmp_path / fmt / "MODEL_CARD.md").read_text()
    proc = bcd("export", "--run", run_id, "--out", tmp_path / "audited", "--audit-data", synthetic_dataset)
    assert proc.returncode == 0, proc.stderr  # the audit tests on the run's own test split
    assert f"tested on {trained['n_test']} images" in (tmp_path / "audited" / "MODEL_CARD.md").read_text()
    assert_one_line_error(bcd("export", "--run", run_id, "--out", tmp_path / "keras"), "already exist")

    leakage = json.loads(bcd("audit", "--run", run_id, "--json").stdout)
    assert_one_line_error(bcd("audit", "--run", run_id, "--test-fraction", 0.3), "stored split")
    assert leakage["ok"] and leakage["runs"][0]["run_id"] == run_id
    assert leakage["runs"][0]["counts"]["crossing_exact"] == 0 and leakage["runs"][0]["warnings"]

    runs = json.loads(bcd("runs", "--json").stdout)["runs"]
    assert [r["id"] for r in runs] == [run_id] and runs[0]["status"] == "completed"
    assert runs[0]["seconds"] == trained["seconds"] > 0  # what train reported is what the store keeps

    other = tmp_path / "other"
    for name in ("Cats", "Dogs"):
        shutil.copytree(next(Path(synthetic_dataset).iterdir()), other / name)
    assert_one_line_error(bcd("evaluate", "--run", run_id, "--data", other), "differ")
    assert_one_line_error(bcd("predict", "--run", 999, images[0]), "999")


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--backbone", "alexnet"], "unknown backbone"),
        (["--backbone", "inceptionv3", "--image-size", "64"], "minimum"),
        (["--backbone", "resnet50", "--weights", "/nope/w.weights.h5"], "weights file not found"),
    ],
)
def test_train_bad_input_writes_nothing(synthetic_dataset, bcd, extra, fragment):
    assert_one_line_error(bcd("train", "--data", synthetic_dataset, *extra), fragment)
    assert json.loads(bcd("runs", "--json").stdout)["runs"] == []


def test_cv_json_reports_folds_mean_and_std(synthetic_dataset, bcd):
    proc = bcd(
        "cv",
        "--data",
        synthetic_dataset,
        "--backbone",
        "scratch_cnn",
        "--image-size",
        32,
        "--epochs",
        1,
        "--folds",
        2,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["protocol"].startswith("2-fold CV") and len(doc["folds"]) == 2
    assert set(doc["folds"][0]) >= {"fold", "n_train", "n_test", "accuracy", "macro_auc"}
    assert set(doc["mean"]) == set(doc["std"]) == {"accuracy", "macro_auc"}


def test_baseline_json_hold_out_and_k_fold(synthetic_dataset, bcd):
    holdout = json.loads(bcd("baseline", "--data", synthetic_dataset, "--image-size", 32, "--json").stdout)
    assert holdout["protocol"].startswith("holdout") and 0 <= holdout["test_accuracy"] <= 1
    assert holdout["confidence_intervals"]["accuracy"]["low"] <= holdout["test_accuracy"]
    folds = json.loads(
        bcd(
            "baseline", "--data", synthetic_dataset, "--image-size", 32, "--folds", 2, "--model", "logreg", "--json"
        ).stdout
    )
    assert folds["protocol"].startswith("2-fold CV") and len(folds["folds"]) == 2
    larger = json.loads(
        bcd(
            "baseline",
            "--data",
            synthetic_dataset,
            "--image-size",
            32,
            "--model",
            "logreg",
            "--test-fraction",
            0.3,
            "--json",
        ).stdout
    )
    assert larger["n_test"] > holdout["n_test"] and larger["n_train"] + larger["n_test"] == 48
    assert_one_line_error(
        bcd("baseline", "--data", synthetic_dataset, "--folds", 2, "--test-fraction", 0.3),
        "with --folds each fold is the test set",
    )


def test_lodo_json_has_one_round_per_held_out_dataset(synthetic_dataset, tmp_path, bcd):
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
    proc = bcd(
        "lodo",
        "--data",
        f"all={synthetic_dataset}",
        "--data",
        f"other={other}",
        "--label-map",
        label_map,
        "--backbone",
        "scratch_cnn",
        "--image-size",
        32,
        "--epochs",
        1,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["shared_labels"] == ["benign", "malignant"]
    assert [r["held_out"] for r in doc["rounds"]] == ["all", "other"]
    assert [r["n_held_out"] for r in doc["rounds"]] == [48, 16]
    assert_one_line_error(
        bcd("lodo", "--data", f"all={synthetic_dataset}", "--data", str(other), "--backbone", "scratch_cnn"), "NAME=DIR"
    )


def test_audit_json_has_leakage_and_shortcuts(synthetic_dataset, bcd):
    proc = bcd("audit", "--data", synthetic_dataset, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["leakage"]["ok"] is True
    assert any("patient" in w for w in doc["leakage"]["warnings"])
    for key in ("colour_only_accuracy", "corner_only_accuracy", "chance_accuracy"):
        assert 0 <= doc["shortcuts"][key] <= 1
    larger = json.loads(bcd("audit", "--data", synthetic_dataset, "--test-fraction", 0.3, "--json").stdout)
    assert larger["shortcuts"]["n_test"] > doc["shortcuts"]["n_test"]


# TrainConfig fields that are deliberately no command-line option (see the field's comment).
NOT_ON_THE_COMMAND_LINE = {"dense_activation"}


def options_of(command: str) -> dict[str, argparse.Action]:
    """The named options of one command, by destination."""
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {a.dest: a for a in commands.choices[command]._actions if a.option_strings}


@pytest.mark.parametrize("command", ["train", "cv", "lodo"])
def test_every_train_config_field_is_an_option(command):
    options = options_of(command)
    for field in dataclasses.fields(TrainConfig):
        if field.name in NOT_ON_THE_COMMAND_LINE:
            assert field.name not in options
            continue
        option = options[field.name]
        assert option.option_strings == ["--" + field.name.replace("_", "-")]
        assert option.default is None  # TrainConfig.for_backbone fills the backbone's defaults
        assert option.required == (field.name == "backbone")
        assert option.help, f"--{field.name} has no help"
    assert options["class_weights"].nargs == 0 and options["class_weights"].const is True  # a switch
    assert options["augment"].type is int  # the augmentation factor


def test_choices_are_the_engine_constants():
    train = options_of("train")
    assert tuple(train["optimizer"].choices) == OPTIMIZERS
    assert tuple(train["pooling"].choices) == POOLINGS
    assert tuple(train["colour"].choices) == COLOUR_MODES
    assert tuple(options_of("export")["format"].choices) == (*FORMATS, cli.BUNDLE)
    assert tuple(options_of("baseline")["model"].choices) == MODELS
    for command in ("train", "baseline", "audit"):
        assert f"default {DEFAULT_FRACTION}" in options_of(command)["test_fraction"].help


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], {}),
        (
            [
                "--weights",
                "none",
                "--epochs",
                "3",
                "--fine-tune-epochs",
                "2",
                "--fine-tune-layers",
                "5",
                "--image-size",
                "64",
                "--batch-size",
                "4",
                "--learning-rate",
                "0.01",
                "--fine-tune-learning-rate",
                "0.0001",
                "--optimizer",
                "sgd",
                "--label-smoothing",
                "0.1",
                "--class-weights",
                "--dense-units",
                "0",
                "--dropout",
                "0.5",
                "--pooling",
                "max",
                "--patience",
                "3",
                "--augment",
                "5",
                "--tta-views",
                "4",
                "--colour",
                "grayscale",
                "--val-fraction",
                "0.2",
                "--test-fraction",
                "0.25",
                "--seed",
                "7",
            ],
            dict(
                weights="none",
                epochs=3,
                fine_tune_epochs=2,
                fine_tune_layers=5,
                image_size=64,
                batch_size=4,
                learning_rate=0.01,
                fine_tune_learning_rate=0.0001,
                optimizer="sgd",
                label_smoothing=0.1,
                class_weights=True,
                dense_units=0,
                dropout=0.5,
                pooling="max",
                patience=3,
                augment=5,
                tta_views=4,
                colour="grayscale",
                val_fraction=0.2,
                test_fraction=0.25,
                seed=7,
            ),
        ),
    ],
)
@pytest.mark.parametrize("backbone", ["mobilenetv2", "scratch_cnn"])
def test_a_parsed_train_command_builds_the_config_for_backbone_builds(backbone, argv, expected):
    args = cli.build_parser().parse_args(["train", "--data", "d", "--backbone", backbone, *argv])
    config = cli._config_from_args(args)
    assert config == TrainConfig.for_backbone(backbone, **expected)
    if argv:
        assert config.augment.factor == 5 and config.class_weights and config.colour == "grayscale"


class _Stop(Exception):
    """Raised by a stand-in engine function once it has checked its call."""


@pytest.fixture
def opened_stores(monkeypatch) -> list:
    """The stores the command opens (stand-ins for ``RunStore.open()``)."""
    opened = []

    class Store:
        @classmethod
        def open(cls):
            opened.append(cls())
            return opened[-1]

    monkeypatch.setattr(cli, "RunStore", Store)
    return opened


@pytest.mark.parametrize(
    "argv, function",
    [
        (["train", "--data", "d", "--backbone", "mobilenetv2"], "train"),
        (["cv", "--data", "d", "--backbone", "mobilenetv2"], "cross_validate"),
        (["lodo", "--data", "a=x", "--data", "b=y", "--backbone", "mobilenetv2"], "leave_one_dataset_out"),
        (["evaluate", "--run", "1", "--data", "d"], "evaluate_run_on_folder"),
        (["robustness", "--run", "1"], "colour_robustness_of_run"),
        (["explain", "--run", "1", "--out", "x.png", "image.png"], "load_run_model"),
        (["export", "--run", "1", "--out", "dir"], "export_run"),
        (["audit", "--run", "1"], "run_leakage_audit"),
        (["worker", "--once"], "run_worker"),
    ],
)
def test_a_command_opens_the_store_once_and_passes_it(monkeypatch, opened_stores, argv, function):
    def engine(*args, store, **kwargs):
        assert store is opened_stores[-1]
        raise _Stop

    monkeypatch.setattr(cli, function, engine)
    with pytest.raises(_Stop):
        cli._run(cli.build_parser().parse_args(argv))
    assert len(opened_stores) == 1


def test_predict_opens_the_store_once_and_passes_it(monkeypatch, opened_stores):
    class Diagnoser:
        @classmethod
        def for_runs(cls, run_ids, *, store):
            assert run_ids == [1, 2] and store is opened_stores[-1]
            raise _Stop

    monkeypatch.setattr(cli, "Diagnoser", Diagnoser)
    monkeypatch.setattr(cli, "sources_from_paths", lambda paths: [])
    with pytest.raises(_Stop):
        cli._run(cli.build_parser().parse_args(["predict", "--run", "1", "--run", "2", "image.png"]))
    assert len(opened_stores) == 1


@pytest.mark.parametrize("argv", [["scan", "--data", "d"], ["baseline", "--data", "d"], ["audit", "--data", "d"]])
def test_a_command_without_runs_opens_no_store(monkeypatch, opened_stores, argv):
    def engine(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(cli, "scan_dataset", engine)
    monkeypatch.setattr(cli, "audit_dataset", engine)
    with pytest.raises(_Stop):
        cli._run(cli.build_parser().parse_args(argv))
    assert opened_stores == []


def test_backbones_lists_the_registry_without_a_store(opened_stores):
    payload, text, code = cli._run(cli.build_parser().parse_args(["backbones"]))
    assert code == 0 and [row["name"] for row in payload["backbones"]] == list(BACKBONES)
    assert len(text.splitlines()) == len(BACKBONES) and opened_stores == []


def test_every_command_has_its_own_handler():
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    handlers = [sub.get_default("handler") for sub in commands.choices.values()]
    assert all(callable(handler) for handler in handlers) and len(set(handlers)) == len(handlers)


def test_a_file_that_cannot_be_written_is_a_write_error(tmp_path):
    with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'missing' / 'x.csv'}: No such file"):
        cli._write(str(tmp_path / "missing" / "x.csv"), b"data")


# What TensorFlow 2.21 writes to stderr at import and start-up on a CPU machine with CUDA libraries.
TF_STARTUP = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "I0000 00:00:1796176495.795531    3416 port.cc:153] oneDNN custom operations are on.\n",
    "W0000 00:00:1796176495.801695    3416 some_file.cc:31] a warning\n",
    "E0000 00:00:1796176500.230179    3416 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n",
]


@pytest.mark.parametrize("level, kept", [(0, TF_STARTUP), (1, TF_STARTUP[2:]), (2, TF_STARTUP[3:]), (3, [])])
def test_tensorflow_startup_lines_are_hidden_below_the_log_level(level, kept):
    lines = [*TF_STARTUP, "Traceback (most recent call last):\n", "Scanning images: 100%\n"]
    assert [line for line in lines if not cli._below_log_level(line, level)] == [*kept, *lines[-2:]]


class ChanceModel:
    """A stand-in for a run's model at chance (1/4 for each class, whatever the image) with an OOD gate."""

    run_id, class_names, config, synthetic = 1, ["Benign", "Early", "Pre", "Pro"], SimpleNamespace(image_size=32), False

    def __init__(self, ood_score: float):
        gate = SimpleNamespace(threshold=10.0, score=lambda features: np.full(len(features), ood_score))
        self.trust = SimpleNamespace(gate=gate, calibrate=lambda probabilities: probabilities)

    def forward_with_features(self, images):
        return np.full((len(images), 4), 0.25), np.zeros((len(images), 8))


@pytest.mark.parametrize(
    "ood_score, reading, line",
    [
        (1.0, "unsure", "Looks like hematogones — benign (Benign, calibrated probability 0.250; reading unsure)"),
        (50.0, "out_of_domain", "out of domain, no answer (score 50.0 > threshold 10.0)"),
    ],
)
def test_predict_text_gives_the_reading_the_json_gives(monkeypatch, opened_stores, tmp_path, ood_score, reading, line):
    image = tmp_path / "smear.png"
    Image.new("RGB", (40, 40), "purple").save(image)
    model = ChanceModel(ood_score)
    monkeypatch.setattr(cli.Diagnoser, "for_runs", classmethod(lambda cls, run_ids, *, store: cls([model])))
    payload, text, code = cli._run(cli.build_parser().parse_args(["predict", "--run", "1", str(image)]))
    assert code == 0 and payload[0]["reading"] == reading
    assert text == f"{image}: {line}"


@pytest.fixture
def cli_store(tmp_path, monkeypatch) -> RunStore:
    """The store the CLI opens when ``main`` runs in this process."""
    monkeypatch.setenv("BCD_DATABASE_URL", f"sqlite:///{tmp_path / 'results.db'}")
    monkeypatch.setenv("BCD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)  # main sets it; restored afterwards
    return RunStore.open()


def finished_run(store: RunStore, data_dir, status: str, protocol: Protocol = Protocol.holdout()) -> int:
    """A run on ``data_dir`` under ``protocol`` that ended ``status`` without training."""
    config = {
        "train": TrainConfig.for_backbone("scratch_cnn", image_size=32, epochs=1).to_dict(),
        "data_dir": str(data_dir),
    }
    run_id = store.create_run(backbone="scratch_cnn", protocol=protocol, config=config, status="running")
    store.finish_run(run_id, status=status)
    return run_id


def test_rerun_queues_a_copy_and_refuses_a_run_not_finished(cli_store, synthetic_dataset, capfd):
    failed = finished_run(cli_store, synthetic_dataset, "failed")
    assert cli.main(["rerun", "--run", str(failed), "--json"]) == 0
    again = json.loads(capfd.readouterr().out)
    assert again == {"run_id": again["run_id"], "status": "queued", "from_run": failed} and again["run_id"] != failed
    copy, original = cli_store.get_run(again["run_id"]), cli_store.get_run(failed)
    assert copy.status == "queued" and copy.protocol == Protocol.holdout()
    assert copy.config["train"] == original.config["train"] and copy.config["data_dir"] == original.config["data_dir"]

    assert cli.main(["rerun", "--run", str(copy.id)]) == cli.EXIT_BAD_INPUT
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err.strip().splitlines()[-1] == (
        f"bcd: error: run {copy.id} is queued; only a finished run can be queued again"
    )
    cli_store.start_run(copy.id, environment={})
    with pytest.raises(RerunError, match="is running"):
        queue_again(cli_store, copy.id)
    assert [r.id for r in cli_store.list_runs(status="queued")] == []


@pytest.mark.parametrize("status", ["completed", "cancelled", "interrupted"])
def test_any_finished_hold_out_run_can_run_again(cli_store, synthetic_dataset, status):
    again = queue_again(cli_store, finished_run(cli_store, synthetic_dataset, status))
    assert cli_store.get_run(again).status == "queued"


@pytest.mark.parametrize("protocol", [Protocol.kfold(1, folds=2), Protocol.lodo("pbc")])
def test_a_cv_or_lodo_round_is_not_queued_again(cli_store, synthetic_dataset, protocol):
    with pytest.raises(RerunError, match=r"one round of .*run the whole protocol again"):
        queue_again(cli_store, finished_run(cli_store, synthetic_dataset, "failed", protocol))


def test_rerun_refuses_an_unknown_run_and_an_unreadable_config(cli_store, synthetic_dataset):
    with pytest.raises(RunNotFoundError, match="999"):
        queue_again(cli_store, 999)
    old = cli_store.create_run(
        backbone="scratch_cnn",
        protocol=Protocol.holdout(),
        status="failed",
        config={"train": {"backbone": "scratch_cnn", "retired_setting": 1}, "data_dir": str(synthetic_dataset)},
    )
    with pytest.raises(RerunError, match=r"cannot be read by this version.*retired_setting"):
        queue_again(cli_store, old)


def test_runs_json_names_each_runs_dataset_however_it_was_started(
    cli_store, synthetic_dataset, tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("BCD_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    config = TrainConfig.for_backbone(
        "scratch_cnn", weights="none", image_size=32, epochs=1, batch_size=8, dense_units=8, augment=1, patience=1
    )
    trained = train(config, synthetic_dataset, store=cli_store).run_id
    queued = queue_run(cli_store, config, synthetic_dataset)
    assert run_worker(once=True, store=cli_store) == [{"run_id": queued, "status": "completed"}]
    again = queue_again(cli_store, trained)
    assert cli.main(["runs", "--json"]) == 0
    runs = {r["id"]: r for r in json.loads(capfd.readouterr().out)["runs"]}
    n_images = scan_dataset(synthetic_dataset).n_images
    expected = {"name": Path(synthetic_dataset).name, "n_images": n_images, "synthetic": True}
    assert {run_id: runs[run_id]["dataset"] for run_id in (trained, queued, again)} == dict.fromkeys(
        (trained, queued, again), expected
    )
    assert len({cli_store.get_run(run_id).dataset_id for run_id in (trained, queued, again)} - {None}) == 1
