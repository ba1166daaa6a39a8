"""The pieces issue 11 made single and side-effect free: the backbone rows, builders that touch no global
state, the precision policy around training only, atomic writes and process checks."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from bcd_engine.errors import ConfigError
from bcd_engine.files import atomic_path, atomic_write_text
from bcd_engine.models.backbones import (
    BACKBONES,
    PREPROCESSING_MODES,
    SCRATCH,
    build_backbone,
    get_backbone,
    pooling_layer,
    resolve_weights,
)
from bcd_engine.models.config import TrainConfig
from bcd_engine.models.device import compute_precision, precision_policy
from bcd_engine.models.head import build_head
from bcd_engine.processes import pid_alive
from bcd_engine.reports.explorer import dataset_choices


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_row_is_complete(name):
    spec = get_backbone(name)
    assert spec.preprocessing in PREPROCESSING_MODES
    assert spec.pretrained == bool(spec.weights_file) == (name != SCRATCH)
    with pytest.raises(ConfigError, match=f"below {name}'s minimum of {spec.min_size} px"):
        spec.check_image_size(spec.min_size - 1)
    spec.check_image_size(spec.min_size)


def test_the_scratch_cnn_is_one_more_row_built_by_its_own_builder():
    spec = get_backbone(SCRATCH)
    model = build_backbone(spec, image_size=32, weights=None)
    assert model.name == SCRATCH and model.get_layer(spec.last_conv_layer) is not None
    assert float(np.asarray(spec.preprocess()(np.full((1, 2), 255.0))).max()) == 1.0
    with pytest.raises(ConfigError, match="scratch_cnn has no ImageNet weights; use --weights none"):
        resolve_weights(spec, "imagenet")


def test_an_unknown_pooling_is_refused():
    assert pooling_layer("max").name == "pool"
    with pytest.raises(ConfigError, match="pooling must be one of"):
        pooling_layer("median")


def test_building_a_head_leaves_the_global_generators_alone():
    config = TrainConfig(backbone="mobilenetv2", image_size=32, dense_units=8, seed=0)

    def head_weights(seed: int) -> list[np.ndarray]:
        keras.utils.set_random_seed(seed)
        return build_head(16, 4, config).get_weights()

    # The caller's seeding decides the weights (build_head does not reseed with config.seed) ...
    assert not np.allclose(head_weights(1)[0], head_weights(2)[0])
    np.testing.assert_array_equal(head_weights(1)[0], head_weights(1)[0])
    # ... and numpy's global generator is not touched at all.
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    build_head(16, 4, config)
    assert np.random.random() == expected


def test_a_seeded_head_draws_its_weights_from_its_seed_alone():
    config = TrainConfig(backbone="mobilenetv2", image_size=32, dense_units=8, seed=0)

    def head_weights(global_seed: int, seed: int) -> list[np.ndarray]:
        keras.utils.set_random_seed(global_seed)
        return build_head(16, 4, config, seed=seed).get_weights()

    same = head_weights(1, 5), head_weights(2, 5)  # whatever the process-wide generators hold
    for first, second in zip(*same, strict=True):
        np.testing.assert_array_equal(first, second)
    assert not np.allclose(head_weights(1, 5)[0], head_weights(1, 6)[0])
    keras.utils.set_random_seed(3)
    expected = np.asarray(keras.random.uniform((3,)))
    keras.utils.set_random_seed(3)
    build_head(16, 4, config, seed=5)
    np.testing.assert_array_equal(np.asarray(keras.random.uniform((3,))), expected)  # Keras' generators untouched


def test_only_the_training_entry_point_seeds_the_process_wide_generators():
    engine = Path(__file__).resolve().parent.parent / "bcd_engine"
    seeding = sorted(
        str(path.relative_to(engine))
        for path in engine.rglob("*.py")
        if "set_random_seed(" in path.read_text() or "np.random.seed(" in path.read_text()
    )
    assert seeding == ["training/run.py"]


def test_a_models_compiled_functions_are_made_once_and_freed_with_it():
    import gc
    import weakref

    from bcd_engine.inference.explain import grad_cam
    from bcd_engine.models import backend

    def small_model():
        config = TrainConfig(backbone=SCRATCH, image_size=32, dense_units=8)
        backbone = build_backbone(get_backbone(SCRATCH), image_size=32, weights=None)
        from bcd_engine.models.head import assemble_model

        return assemble_model(backbone, build_head(backbone.output_shape[-1], 3, config, seed=0), config)

    preprocess, image = get_backbone(SCRATCH).preprocess(), np.zeros((32, 32, 3), np.uint8)
    model = small_model()
    forward = backend.forward_function(model, preprocess)
    assert backend.forward_function(model, preprocess).run is forward.run  # compiled once per (model, preprocess)
    made = []
    assert backend.cached_for(model, "probe", lambda: made.append(1) or "made") == "made"
    assert backend.cached_for(model, "probe", lambda: made.append(1) or "again") == "made" and made == [1]
    first = grad_cam(model, image, preprocess=preprocess, backbone=SCRATCH)
    np.testing.assert_allclose(grad_cam(model, image, preprocess=preprocess, backbone=SCRATCH).heatmap, first.heatmap)
    freed = weakref.ref(model)
    del model, forward
    gc.collect()
    assert freed() is None  # the cache, its forward passes and Grad-CAM functions hold the model weakly only
    alone = backend.forward_function(small_model(), preprocess)  # a caller may keep only the function
    gc.collect()
    assert alone(image[None]).shape == (1, 3)


def test_the_precision_policy_is_set_inside_the_block_only_and_restored_on_error():
    before = keras.mixed_precision.global_policy().name
    with compute_precision("mixed_float16"):
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
    assert keras.mixed_precision.global_policy().name == before
    with pytest.raises(RuntimeError, match="boom"), compute_precision("mixed_float16"):
        raise RuntimeError("boom")
    assert keras.mixed_precision.global_policy().name == before
    assert precision_policy({"mixed_precision": True}) == "mixed_float16"
    assert precision_policy({"mixed_precision": False}) == "float32"
    assert precision_policy({"mixed_precision": True, "precision": "mixed_bfloat16"}) == "mixed_bfloat16"


def test_an_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    target = tmp_path / "deep" / "index.json"
    atomic_write_text(target, "first")
    assert target.read_text() == "first"
    with pytest.raises(ValueError, match="half way"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise ValueError("half way")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["index.json"]  # no temp file left behind


def test_pid_alive_tells_a_live_process_from_a_finished_one():
    assert pid_alive(os.getpid())
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    assert not pid_alive(int(finished.stdout))
    assert not pid_alive(0) and not pid_alive(-1)


def test_listing_dataset_choices_writes_nothing(workspace, tmp_path):
    demo = tmp_path / "not-made"
    choices = dataset_choices(workspace, demo)
    assert choices[0].root == str(demo) and choices[0].synthetic
    assert not demo.exists()


MIRRORED_EXTRACTION = """
import numpy as np, tensorflow as tf, keras
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from bcd_engine.models.backbones import get_backbone
from bcd_engine.models.config import TrainConfig
from bcd_engine.models.features import build_feature_extractor, extract_features
config = TrainConfig.for_backbone("mobilenetv2", weights="none", image_size=32, batch_size=8)
spec = get_backbone("mobilenetv2")
images = np.random.default_rng(0).integers(0, 255, (21, 32, 32, 3), dtype=np.uint8)
args = dict(preprocess=spec.preprocess(), augment=config.augment, seed=0, batch_size=8)
def features(extractor):
    return extract_features(extractor, images, np.arange(21), [f"{i:032x}" for i in range(21)], np.zeros(21, int),
                            **args)
single, _ = build_feature_extractor(spec, config)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    mirrored, _ = build_feature_extractor(spec, config)
    mirrored.set_weights(single.get_weights())
    split = features(mirrored)
print(strategy.num_replicas_in_sync, float(np.abs(features(single) - split).max()))
"""


def test_feature_extraction_under_a_mirrored_strategy_splits_batches_and_keeps_their_order():
    """Two logical CPUs stand in for two GPUs: 21 images in batches of 8 (the last one uneven) come back
    in order, the same vectors as on one device."""
    out = subprocess.run(
        [sys.executable, "-c", MIRRORED_EXTRACTION],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    replicas, max_diff = out.stdout.split()
    assert replicas == "2" and float(max_diff) < 1e-5


def test_the_feature_cache_key_names_the_backend_and_the_precision(tmp_path):
    from bcd_engine.models.features import FeatureCache

    config = TrainConfig(backbone="mobilenetv2", weights=None, image_size=32)
    plain = FeatureCache.for_config(config, root=tmp_path)
    with compute_precision("mixed_float16"):
        mixed = FeatureCache.for_config(config, root=tmp_path)
    assert plain.key_parts["backend"] == keras.backend.backend() and plain.key_parts["precision"] == "float32"
    assert mixed.key != plain.key and FeatureCache.for_config(config, root=tmp_path).key == plain.key


def test_a_masked_feature_cache_is_keyed_by_how_regions_are_painted(tmp_path, monkeypatch):
    """Features of masked images painted by another rule are never read back (the rule changed once, after runs had
    cached features painted the old way); an unmasked run's cache does not depend on it."""
    from bcd_engine.models import features

    masked = TrainConfig(backbone="mobilenetv2", weights=None, image_size=32, mask_regions="0.75,0.75,1,1")
    unmasked = dataclasses.replace(masked, mask_regions="none")
    before = {c.mask_regions: features.FeatureCache.for_config(c, root=tmp_path) for c in (masked, unmasked)}
    assert before[masked.mask_regions].key_parts["mask_paint"] == features.PAINT_RULE
    monkeypatch.setattr(features, "PAINT_RULE", "another-rule")
    after = {c.mask_regions: features.FeatureCache.for_config(c, root=tmp_path) for c in (masked, unmasked)}
    assert after[masked.mask_regions].key != before[masked.mask_regions].key
    assert after["none"].key == before["none"].key and "mask_paint" not in after["none"].key_parts
