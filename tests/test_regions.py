"""Regions a dataset must not teach: parsing, painting, the one entry that prepares images for a run's model,
and the region audit that finds a label in a corner."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from bcd_engine.data.regions import (
    Region,
    check_mask_setting,
    paint_regions,
    parse_regions,
    prepare_for_model,
    read_declared_regions,
    regions_text,
)
from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.shortcuts import RegionAudit, score_regions
from bcd_engine.data.splits import holdout_split
from bcd_engine.data.synthetic import make_synthetic_dataset
from bcd_engine.errors import ConfigError, DataError
from bcd_engine.models.config import TrainConfig
from bcd_engine.protocols.audit import shortcut_audit
from bcd_engine.training.masking import resolve_mask_regions

BOTTOM_RIGHT = "0.75,0.75,1,1"


@pytest.fixture(scope="module")
def marked_dataset(tmp_path_factory):
    """Three classes whose bottom-right corner carries a label that tells the class by itself (32 px)."""
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("marked") / "dataset",
        n_per_class=30,
        image_size=32,
        class_names=("Benign", "Early", "Pre"),
        corner_marker=True,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.75,0.75,1,1", "0.75,0.75,1,1"),
        ("168,188,224,224@224", "0.75,0.8393,1,1"),
        ("0,0,16,8@32x16", "0,0,0.5,0.5"),
        (" none ", "none"),
        ("0,0,0.1,0.1; 0.9,0.9,1,1", "0,0,0.1,0.1;0.9,0.9,1,1"),
    ],
)
def test_regions_parse_as_fractions_or_as_pixels_of_a_stated_size(text, expected):
    assert regions_text(parse_regions(text)) == expected
    assert check_mask_setting(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("168,188,224,224", "values above 1"),
        ("0.5,0.5,0.4,1", "x0 < x1"),
        ("1,2,3", "x0,y0,x1,y1"),
        ("a,b,c,d", "x0,y0,x1,y1"),
        ("", "none"),
    ],
)
def test_bad_regions_are_refused_with_what_was_expected(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_regions(text)


def test_auto_is_a_setting_but_not_a_region_list():
    assert check_mask_setting("AUTO") == "auto"
    with pytest.raises(ConfigError, match="resolved"):
        parse_regions("auto")


def test_a_region_covers_the_same_share_of_any_image_size():
    region = parse_regions(BOTTOM_RIGHT)[0]
    assert region.pixels(32, 32) == (slice(24, 32), slice(24, 32))
    assert region.pixels(224, 224) == (slice(168, 224), slice(168, 224))
    assert region.pixels(3, 3) == (slice(2, 3), slice(2, 3))  # at least one pixel


def test_painting_uses_each_images_median_colour_outside_the_regions_and_leaves_the_rest():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    painted = paint_regions(images, [Region(0.5, 0.5, 1, 1)])
    for image, out in zip(images, painted):
        outside = np.concatenate([image[:4].reshape(-1, 3), image[4:, :4].reshape(-1, 3)])
        median = np.median(outside, axis=0).round().astype(np.uint8)  # nothing of the covered pixels
        assert (out[4:, 4:] == median).all()
        assert (out[:4] == image[:4]).all() and (out[:, :4] == image[:, :4]).all()
    assert paint_regions(images, []) is images
    changed = images.copy()
    changed[:, 4:, 4:] = 0  # what a region covers does not change what it is painted with
    np.testing.assert_array_equal(paint_regions(changed, [Region(0.5, 0.5, 1, 1)]), painted)
    whole = paint_regions(images, [Region(0, 0, 1, 1)])
    assert (whole == np.median(images.reshape(5, -1, 3), axis=1).round().astype(np.uint8)[:, None, None]).all()


def test_prepare_for_model_masks_then_applies_the_colour_mode():
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    images[:, :, :, 0] = 200  # red everywhere
    images[:, 3, 3] = (0, 0, 255)  # a blue corner pixel
    seen = prepare_for_model(images, SimpleNamespace(colour="grayscale", mask_regions="0.75,0.75,1,1"))
    assert (seen == np.rint(200 * 0.299)).all()  # the corner painted red first, then all gray
    untouched = prepare_for_model(images, SimpleNamespace(colour="rgb", mask_regions="none"))
    assert untouched is images


def test_a_train_config_records_concrete_regions_and_old_configs_mask_nothing():
    config = TrainConfig(backbone="scratch_cnn", image_size=32, mask_regions="24,24,32,32@32")
    assert config.mask_regions == BOTTOM_RIGHT
    assert TrainConfig(backbone="scratch_cnn").mask_regions == "auto"
    stored = {k: v for k, v in config.to_dict().items() if k != "mask_regions"}  # saved before the option existed
    assert TrainConfig.from_dict(stored).mask_regions == "none"
    with pytest.raises(ConfigError, match="x0,y0,x1,y1"):
        TrainConfig(backbone="scratch_cnn", mask_regions="corner")


def test_the_dataset_audit_flags_the_corner_label_and_nothing_on_clean_images(marked_dataset, synthetic_dataset):
    marked = shortcut_audit(scan_dataset(marked_dataset), image_size=32)
    assert marked["regions"]["flagged"] == [BOTTOM_RIGHT]
    scores = {entry["region"]: entry["accuracy"] for entry in marked["regions"]["regions"]}
    assert scores["bottom-right corner"] >= 0.9 and scores["top-left corner"] < 0.7
    assert "bottom-right corner" in marked["interpretation"]
    clean = shortcut_audit(scan_dataset(synthetic_dataset), image_size=32)
    assert clean["regions"]["flagged"] == []


def test_a_region_audit_survives_its_json_form(marked_dataset):
    scan = scan_dataset(marked_dataset)
    split = holdout_split(scan.labels, scan.groups, seed=0)
    from bcd_engine.data.images import load_images

    audit = score_regions(load_images(scan.paths, image_size=32), scan.labels, split.train, split.val)
    again = RegionAudit.from_dict(json.loads(json.dumps(audit.to_dict())))
    assert again.to_dict() == audit.to_dict()
    assert [region.to_text() for region in again.flagged] == [BOTTOM_RIGHT]


def test_auto_resolves_to_the_flagged_corner_with_a_log_line(marked_dataset, tmp_path, caplog):
    scan = scan_dataset(marked_dataset)
    split = holdout_split(scan.labels, scan.groups, seed=0)
    config = TrainConfig(backbone="scratch_cnn", image_size=32)
    with caplog.at_level(logging.INFO, logger="bcd.training"):
        resolved, decision = resolve_mask_regions(config, scan, split, cache_dir=tmp_path)
    assert resolved.mask_regions == BOTTOM_RIGHT and decision.setting == "auto"
    assert "bottom-right corner" in decision.reason
    assert any("mask regions auto -> bottom-right corner (0.75,0.75,1,1)" in r.message for r in caplog.records)
    assert len(list(tmp_path.glob("*.json"))) == 1  # the region audit is kept for the next run on this split
    again, _ = resolve_mask_regions(config, scan, split, cache_dir=tmp_path)
    assert again == resolved
    given, kept = resolve_mask_regions(
        TrainConfig(backbone="scratch_cnn", mask_regions="none"), scan, split, cache_dir=tmp_path
    )
    assert given.mask_regions == "none" and kept.regions == ()


def test_a_dataset_declares_regions_in_its_regions_file(tmp_path):
    assert read_declared_regions(tmp_path) == ()
    (tmp_path / "regions.json").write_text(json.dumps({"regions": [{"name": "stamp", "box": "0,0,56,36@224"}]}))
    (stamp,) = read_declared_regions(tmp_path)
    assert stamp.name == "stamp" and stamp.to_text() == "0,0,0.25,0.1607"
    (tmp_path / "regions.json").write_text(json.dumps({"regions": [{"box": "0,0,2,2"}]}))
    with pytest.raises(DataError, match=r"regions\.json"):
        read_declared_regions(tmp_path)
