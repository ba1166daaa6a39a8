"""Grad-CAM on tiny random-weight and synthetic-trained models: localisation, every backbone, save/load, overlay."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import skip_slow_backbone_off_tensorflow

from bcd_engine.errors import ConfigError
from bcd_engine.inference.explain import explain_source, grad_cam, jet, overlay
from bcd_engine.models.backbones import BACKBONES, build_backbone, get_backbone
from bcd_engine.models.config import AugmentConfig, TrainConfig

pytestmark = pytest.mark.every_backend  # CI runs this file on JAX too (README: Keras backends)

keras = pytest.importorskip("keras")

SIZE = 64  # the scratch CNN's last conv layer is then 8x8
SQUARE = 16


def bright_square_images(n: int, rng: np.random.Generator):
    """Dark noise; odd images also get a bright square at a random place. Returns images, labels, square corners."""
    images = rng.integers(0, 60, (n, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.arange(n) % 2
    corners = rng.integers(0, SIZE - SQUARE + 1, (n, 2))
    for image, label, (top, left) in zip(images, labels, corners, strict=True):
        if label:
            image[top : top + SQUARE, left : left + SQUARE] = rng.integers(200, 256, (SQUARE, SQUARE, 3))
    return images, labels, corners


def assembled(name: str, *, image_size: int, n_classes: int = 2, **overrides):
    from bcd_engine.models.head import assemble_model, build_head

    options = {"dense_units": 8, "dropout": 0.0, "augment": AugmentConfig(factor=1), **overrides}
    config = TrainConfig(backbone=name, image_size=image_size, **options)
    backbone = build_backbone(get_backbone(name), image_size=image_size, weights=None)
    return assemble_model(backbone, build_head(backbone.output_shape[-1], n_classes, config), config), config


@pytest.fixture(scope="module")
def square_model():
    """A scratch CNN trained to tell dark noise (0) from dark noise with a bright square (1)."""
    from bcd_engine.models.head import compile_model

    # Seeded: unseeded weights made a rare model whose "no square" logit also rose with the square (JAX CI, stop 30).
    keras.utils.set_random_seed(0)
    model, config = assembled("scratch_cnn", image_size=SIZE, dense_units=16, seed=0)
    images, labels, _ = bright_square_images(192, np.random.default_rng(0))
    compile_model(model, config, 2e-3)
    model.fit(images / 255.0, keras.utils.to_categorical(labels, 2), epochs=6, batch_size=16, verbose=0)
    return model


def test_grad_cam_peaks_on_the_region_that_decides_the_class(square_model):
    preprocess = get_backbone("scratch_cnn").preprocess()
    images, labels, corners = bright_square_images(40, np.random.default_rng(1))
    predicted = square_model.predict(images / 255.0, verbose=0).argmax(axis=1)
    assert (predicted == labels).mean() >= 0.9
    hits = {0: [], 1: []}
    for image, (top, left) in zip(images[labels == 1], corners[labels == 1], strict=True):
        for class_index in (0, 1):
            heatmap = grad_cam(
                square_model, image, preprocess=preprocess, backbone="scratch_cnn", class_index=class_index
            ).heatmap
            row, col = np.unravel_index(heatmap.argmax(), heatmap.shape)
            hits[class_index].append(top <= row < top + SQUARE and left <= col < left + SQUARE)
    assert np.mean(hits[1]) >= 0.8
    assert np.mean(hits[0]) <= 0.2  # the "no square" class looks elsewhere


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_heatmap_has_the_image_size_and_unit_range_for_every_backbone(name):
    # Off TensorFlow, what is the backend's own (the gradient through the layers after the last convolution) is
    # the same code for every backbone; the quick ones run it, the TensorFlow suite runs every backbone.
    skip_slow_backbone_off_tensorflow(name, "its Grad-CAM")
    size = max(64, get_backbone(name).min_size)
    model, _ = assembled(name, image_size=size, n_classes=3)
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    preprocess = get_backbone(name).preprocess()
    result = grad_cam(model, image, preprocess=preprocess, backbone=name, class_index=2)
    assert result.heatmap.shape == (size, size) and result.heatmap.dtype == np.float32
    assert np.isfinite(result.heatmap).all() and 0 <= result.heatmap.min() <= result.heatmap.max() <= 1
    assert result.class_index == 2
    # One eager call: a traced model.predict costs a deep backbone about 8 s on 2 cores.
    expected = keras.ops.convert_to_numpy(model(preprocess(image[None].astype("float32")), training=False))[0]
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)


def test_default_class_is_the_predicted_one_and_bad_input_is_rejected(square_model):
    preprocess = get_backbone("scratch_cnn").preprocess()
    image = bright_square_images(2, np.random.default_rng(2))[0][1]
    result = grad_cam(square_model, image, preprocess=preprocess, backbone="scratch_cnn")
    assert result.class_index == int(result.probabilities.argmax())
    with pytest.raises(ConfigError, match=r"class index must be in 0\.\.1"):
        grad_cam(square_model, image, preprocess=preprocess, backbone="scratch_cnn", class_index=2)
    with pytest.raises(ConfigError, match=r"shape \(64, 64, 3\)"):
        grad_cam(square_model, image[:32], preprocess=preprocess, backbone="scratch_cnn")
    with pytest.raises(ConfigError, match="no nested backbone with layer 'block5_conv3'"):
        grad_cam(square_model, image, preprocess=preprocess, backbone="vgg16")


@pytest.mark.parametrize("name", ["scratch_cnn", "efficientnetb0"])
def test_a_model_loaded_back_from_disk_gives_the_same_heatmap(name, square_model, tmp_path):
    skip_slow_backbone_off_tensorflow(name, "its Grad-CAM after a save and load")
    model = square_model if name == "scratch_cnn" else assembled(name, image_size=SIZE)[0]
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, compile=False, safe_mode=True)
    image = bright_square_images(2, np.random.default_rng(3))[0][1]
    common = {"preprocess": get_backbone(name).preprocess(), "backbone": name, "class_index": 1}
    before, after = grad_cam(model, image, **common), grad_cam(loaded, image, **common)
    np.testing.assert_allclose(after.heatmap, before.heatmap, atol=1e-5)
    np.testing.assert_allclose(after.probabilities, before.probabilities, atol=1e-6)


def test_a_stored_run_explains_an_image_file(square_model, tmp_path, monkeypatch):
    from PIL import Image

    from bcd_engine.files import file_sha256
    from bcd_engine.inference.loading import load_run_model
    from bcd_engine.store import Protocol, RunStore

    monkeypatch.setenv("BCD_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    store = RunStore.open(f"sqlite:///{tmp_path / 'results.db'}")
    config = TrainConfig(backbone="scratch_cnn", image_size=SIZE, mask_regions="none")  # resolved, as stored
    run_id = store.create_run(
        backbone="scratch_cnn",
        protocol=Protocol.holdout(),
        status="running",
        config={"train": config.to_dict(), "class_names": ["noise", "square"]},
    )
    model_file = tmp_path / "artifacts" / f"run-{run_id}" / "model.keras"
    model_file.parent.mkdir(parents=True)
    square_model.save(model_file)
    store.save_artifact(
        run_id,
        kind="model",
        path=f"run-{run_id}/model.keras",
        sha256=file_sha256(model_file),
        size_bytes=model_file.stat().st_size,
    )
    store.finish_run(run_id, status="completed")
    images, _, _ = bright_square_images(2, np.random.default_rng(4))
    image_file = tmp_path / "square.png"
    Image.fromarray(images[1]).save(image_file)

    image, result = explain_source(load_run_model(run_id, store=store), image_file.read_bytes())
    np.testing.assert_array_equal(image, images[1])
    direct = grad_cam(
        square_model, images[1], preprocess=get_backbone("scratch_cnn").preprocess(), backbone="scratch_cnn"
    )
    assert result.class_index == direct.class_index
    np.testing.assert_allclose(result.heatmap, direct.heatmap, atol=1e-5)


def test_overlay_blends_a_colour_map_and_opacity_zero_gives_the_image_back():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    heatmap = rng.uniform(0, 1, (20, 30)).astype(np.float32)
    blended = overlay(image, heatmap)
    assert blended.shape == image.shape and blended.dtype == np.uint8
    assert not np.array_equal(blended, image)
    np.testing.assert_array_equal(overlay(image, heatmap, opacity=0.0), image)
    np.testing.assert_array_equal(overlay(image, np.ones((20, 30)), opacity=1.0), np.full_like(image, [128, 0, 0]))
    assert overlay(image, heatmap[::2, ::3]).shape == image.shape  # a smaller heatmap is resized to the image
    with pytest.raises(ConfigError, match="opacity"):
        overlay(image, heatmap, opacity=1.5)


def test_jet_runs_from_dark_blue_through_green_to_dark_red():
    np.testing.assert_allclose(jet(np.array([0.0, 0.5, 1.0])), [[0, 0, 0.5], [0.5, 1, 0.5], [0.5, 0, 0]])
