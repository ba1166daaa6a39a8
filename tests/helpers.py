"""Plain helpers that several test modules share (fixtures are in ``conftest.py``)."""

from __future__ import annotations

import functools
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.synthetic import is_synthetic
from bcd_engine.evaluation import confidence
from bcd_engine.evaluation import metrics as evaluation
from bcd_engine.store import Protocol, RunStore

PROJECT_ROOT = Path(__file__).resolve().parent.parent
APP = str(PROJECT_ROOT / "app.py")  # the dashboard, as AppTest.from_file takes it
CLASSES = ["Benign", "Early", "Pre", "Pro"]
# Backbones whose first compiled step takes seconds on every Keras backend; the others compile op by op for
# minutes on JAX's 2 CPU cores, so the JAX lane leaves them to the TensorFlow suite.
QUICK_ON_EVERY_BACKEND = ("mobilenetv2", "resnet50", "scratch_cnn", "vgg16")


def skip_slow_backbone_off_tensorflow(name: str, what: str) -> None:
    """Skip ``what`` for backbone ``name`` on a backend other than TensorFlow unless it is quick there."""
    import keras

    if keras.backend.backend() != "tensorflow" and name not in QUICK_ON_EVERY_BACKEND:
        pytest.skip(
            f"{name}'s first step compiles op by op for minutes on another backend's 2 CPU cores; "
            f"the TensorFlow suite runs {what}"
        )


def subprocess_env() -> dict[str, str]:
    """Environment for child Python processes that import ``bcd_engine`` from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    return env


def unprivileged(command: list[str]) -> list[str]:
    """``command`` to run without root's powers: as root (CI's usual user) every capability is dropped,
    so file permissions bind it as they bind any user; otherwise unchanged."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot drop root's powers to test read-only folders")
    return [setpriv, "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", *command]


@contextmanager
def read_only_tree(root: Path) -> Iterator[Path]:
    """``root`` and everything under it made read-only (write bits removed) for the block, then restored."""
    modes = {path: path.stat().st_mode for path in [root, *root.rglob("*")]}
    for path, mode in modes.items():
        path.chmod(stat.S_IMODE(mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield root
    finally:
        for path, mode in modes.items():
            path.chmod(stat.S_IMODE(mode))


def workspace_store(root: Path, patch: pytest.MonkeyPatch) -> RunStore:
    """A new SQLite run store under ``root``, with the artifacts and cache folders there too, all three set on
    ``patch`` (so the CLI and pages called meanwhile use them, never the checkout's ``results.db``).

    For module-scoped fixtures (``with pytest.MonkeyPatch.context() as patch``); tests use ``workspace``.
    """
    url = f"sqlite:///{root / 'results.db'}"
    patch.setenv("BCD_DATABASE_URL", url)
    patch.setenv("BCD_ARTIFACTS_DIR", str(root / "artifacts"))
    patch.setenv("BCD_CACHE_DIR", str(root / "cache"))
    return RunStore.open(url)


def scored_evaluation(name: str, paths: list[str], data_dir: str, *, right: float, seed: int) -> dict:
    """save_evaluation() arguments for ``paths`` (class = parent folder): about ``right`` of them classified right.

    Metrics come from evaluation.evaluate_probabilities, with 100 bootstrap resamples instead of 1000 to stay fast.
    """
    rng = np.random.default_rng(seed)
    labels = np.array([CLASSES.index(Path(p).parent.name) for p in paths])
    prob = rng.dirichlet(np.full(len(CLASSES), 0.7), size=len(paths))
    for i, label in enumerate(labels):
        top = label if rng.random() < right else (label + 1) % len(CLASSES)
        prob[i, top] += 1.5
    prob /= prob.sum(axis=1, keepdims=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "bootstrap_cis", functools.partial(confidence.bootstrap_cis, n_resamples=100))
        ev = evaluation.evaluate_probabilities(labels, prob, class_names=CLASSES)
    predictions = [
        {"path": p, "true_class": CLASSES[t], "predicted_class": CLASSES[k], "probabilities": q.tolist()}
        for p, t, k, q in zip(paths, labels, ev.predicted, prob, strict=True)
    ]
    return {
        "name": name,
        "data_dir": data_dir,
        "metrics": ev.metrics,
        "class_names": CLASSES,
        "confusion_matrix": ev.confusion_matrix,
        "roc": ev.roc,
        "predictions": predictions,
    }


def register_folder(db: RunStore, root: str) -> int:
    """Register the dataset folder ``root`` as training and queueing do; its id."""
    scan = scan_dataset(root)
    return db.register_dataset(
        name=Path(root).name,
        data_dir=root,
        n_images=scan.n_images,
        class_counts=scan.class_counts,
        synthetic=is_synthetic(root),
    )


def completed_run(db: RunStore, backbone: str, protocol: Protocol, root: str, evaluations: list[dict]) -> int:
    """A completed run with three epochs and ``evaluations`` (the first is its test evaluation); its id."""
    config = {
        "train": {"backbone": backbone, "image_size": 64, "weights": "imagenet"},
        "data_dir": root,
        "class_names": CLASSES,
    }
    run_id = db.create_run(
        backbone=backbone, protocol=protocol, config=config, status="running", dataset_id=register_folder(db, root)
    )
    db.start_run(run_id, environment={"tensorflow": "test"})
    for epoch in range(1, 4):
        db.log_epoch(
            run_id,
            phase=1,
            epoch=epoch,
            train_loss=1 / epoch,
            train_accuracy=0.6 + epoch / 10,
            val_loss=1.2 / epoch,
            val_accuracy=0.55 + epoch / 10,
        )
    for kwargs in evaluations:
        db.save_evaluation(run_id, **kwargs)
    test = evaluations[0]["metrics"]
    db.finish_run(run_id, status="completed", test_accuracy=test["accuracy"], macro_auc=test["macro_auc"])
    return run_id


def fill_store(db: RunStore, root: str | Path) -> dict:
    """Realistic runs on the dataset folder ``root`` (classes Benign/Early/Pre/Pro, 48 images).

    A hold-out run, a failed run, a 3-fold cross-validation (16 test images per fold, every image
    once) and a leave-one-dataset-out run with a "held-out Segmented" evaluation. Returns their ids.
    """
    root = str(Path(root).resolve())
    paths = sorted(str(p) for p in Path(root).glob("*/*.png"))
    ids = {
        "holdout": completed_run(
            db, "resnet50", Protocol.holdout(), root, [scored_evaluation("test", paths[::4], root, right=0.75, seed=1)]
        )
    }
    ids["failed"] = db.create_run(
        backbone="vgg16", protocol=Protocol.holdout(), config={"data_dir": root}, dataset_id=register_folder(db, root)
    )
    db.finish_run(ids["failed"], status="failed", error="out of memory")
    ids["cv"] = [
        completed_run(
            db,
            "mobilenetv2",
            Protocol.kfold(k, folds=3),
            root,
            [scored_evaluation("test", paths[k - 1 :: 3], root, right=0.6 + k / 10, seed=10 + k)],
        )
        for k in (1, 2, 3)
    ]
    ids["lodo"] = completed_run(
        db,
        "resnet50",
        Protocol.lodo("Segmented"),
        root,
        [
            scored_evaluation("test", paths[1::4], root, right=0.9, seed=20),
            scored_evaluation("held-out Segmented", paths[::2], "/data/Segmented", right=0.5, seed=21),
        ],
    )
    return ids
