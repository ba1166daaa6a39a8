"""The engine on two Keras backends: a model trained on TensorFlow or JAX loads and answers the same on the other.

Each side runs in its own process (a process holds one Keras backend): training through the CLI, then
one script that loads the run and prints its single-view and test-time-augmented probabilities, pooled
features and Grad-CAM heatmap. CI installs JAX (CPU); elsewhere these tests skip when it is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax", reason="JAX is not installed (pip install 'jax[cpu]'; CI installs it)")

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("tensorflow", "jax")

ANSWERS = """
import json, sys
import numpy as np
from bcd_engine.data.images import load_images
from bcd_engine.inference.explain import explain_image
from bcd_engine.inference.loading import load_run_model
from bcd_engine.store import RunStore

store = RunStore()

def answers(run_id, paths):
    loaded = load_run_model(run_id, store=store)
    images = load_images(paths, image_size=loaded.config.image_size)
    probabilities, features = loaded.forward_with_features(images)
    return {
        "probabilities": probabilities.tolist(),
        "features": features.tolist(),
        "tta": loaded.predict_arrays(images).tolist(),
        "heatmap": explain_image(loaded, images[0]).heatmap.tolist(),
        "environment": store.get_run(run_id).environment,
    }

run_ids = [int(run_id) for run_id in sys.argv[1].split(",")]
print(json.dumps({run_id: answers(run_id, sys.argv[2:]) for run_id in run_ids}))
"""


def _run(
    backend: str, args: list[str], workspace: Path, *, check: bool = True, devices: int = 1
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "BCD_DATABASE_URL": f"sqlite:///{workspace / 'results.db'}",
        "BCD_ARTIFACTS_DIR": str(workspace / "artifacts"),
        "BCD_CACHE_DIR": str(workspace / "cache"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 or not check, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("backends")


@pytest.fixture(scope="module")
def answers(synthetic_dataset, workspace):
    """{(trained on, answered on): the answers} for a fine-tuned MobileNetV2 trained on each backend."""
    images = [str(path) for path in sorted(synthetic_dataset.glob("*/*.png"))[::6]]
    found, run_ids = {}, {}
    for trained_on in BACKENDS:
        result = json.loads(
            _run(
                trained_on,
                [
                    "-m",
                    "bcd_engine",
                    "train",
                    "--data",
                    str(synthetic_dataset),
                    "--backbone",
                    "mobilenetv2",
                    "--weights",
                    "none",
                    "--image-size",
                    "32",
                    "--epochs",
                    "2",
                    "--fine-tune-epochs",
                    "1",
                    "--fine-tune-layers",
                    "10",
                    "--augment",
                    "2",
                    "--tta-views",
                    "3",
                    "--batch-size",
                    "8",
                    "--json",
                ],
                workspace,
            ).stdout
        )
        assert result["status"] == "completed"
        run_ids[trained_on] = str(result["run_id"])
    for answered_on in BACKENDS:  # one process a backend answers for both runs
        by_run = json.loads(_run(answered_on, ["-c", ANSWERS, ",".join(run_ids.values()), *images], workspace).stdout)
        for trained_on, run_id in run_ids.items():
            found[trained_on, answered_on] = by_run[run_id]
    return found


@pytest.mark.parametrize("trained_on", BACKENDS)
def test_a_model_answers_the_same_on_both_backends(answers, trained_on):
    here, there = (answers[trained_on, backend] for backend in BACKENDS)
    for key, tolerance in (("probabilities", 1e-4), ("tta", 1e-4), ("features", 1e-3), ("heatmap", 2e-3)):
        np.testing.assert_allclose(np.array(here[key]), np.array(there[key]), atol=tolerance, err_msg=key)
    assert np.ptp(np.array(here["probabilities"])) > 0  # not a constant answer


@pytest.mark.parametrize("trained_on", BACKENDS)
def test_the_run_records_the_backend_it_trained_on(answers, trained_on):
    environment = answers[trained_on, trained_on]["environment"]
    assert environment["backend"] == trained_on and environment[trained_on] and environment["keras"]


def test_tensorflow_lite_export_on_jax_says_to_use_the_tensorflow_backend(answers, workspace, tmp_path):
    out = _run(
        "jax",
        ["-m", "bcd_engine", "export", "--run", "1", "--format", "tflite", "--out", str(tmp_path / "x")],
        workspace,
        check=False,
    )
    assert out.returncode != 0 and "KERAS_BACKEND=tensorflow" in out.stderr and not (tmp_path / "x").exists()


TWO_DEVICES = """
import numpy as np, keras
from bcd_engine.models import backend
from bcd_engine.models.backbones import get_backbone
from bcd_engine.models.batches import training_batches
from bcd_engine.models.config import TrainConfig
from bcd_engine.models.features import build_feature_extractor, extract_features

spec = get_backbone("mobilenetv2")
config = TrainConfig(backbone="mobilenetv2", weights=None, image_size=32, batch_size=8)
images = np.random.default_rng(0).integers(0, 255, (21, 32, 32, 3), dtype=np.uint8)
keys, views = [f"{i:032x}" for i in range(21)], np.arange(21) % 2

def features():
    keras.utils.set_random_seed(0)
    extractor, _ = build_feature_extractor(spec, config)
    return extract_features(extractor, images, np.arange(21), keys, views, preprocess=spec.preprocess(),
                            augment=config.augment, seed=0, batch_size=8)

single = features()
keras.distribution.set_distribution(keras.distribution.DataParallel())
split = features()
devices = len(backend._sharded_over_devices(images[:5])[0].sharding.device_set)
model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D(),
                          keras.layers.Dense(4, activation="softmax")])
model.compile("adam", "categorical_crossentropy")
batches = training_batches(images, keras.utils.to_categorical(np.arange(21) % 4, 4), preprocess=spec.preprocess(),
                           augment=config.augment, seed=0, batch_size=8, multiple_of=2)
history = model.fit(batches, epochs=2, verbose=0).history
print(devices, float(np.abs(single - split).max()), len(history["loss"]), np.isfinite(history["loss"]).all())
"""


def test_jax_splits_batches_over_two_devices(tmp_path):
    """Two CPU devices stand in for two GPUs under Keras' DataParallel distribution: 21 images in batches of 8
    (the last one odd) give the single device's vectors, and fitting fills odd batches with weightless copies."""
    out = _run("jax", ["-c", TWO_DEVICES], tmp_path, devices=2)
    devices, max_diff, epochs, finite = out.stdout.split()
    assert devices == "2" and float(max_diff) < 1e-5 and epochs == "2" and finite == "True"
