"""Head recipes on a stored run's frozen features: which head settings make fewer errors, chosen without its test.

Takes a completed hold-out run of a pretrained backbone (phase 1 only) and its feature cache, then trains the head
of each recipe (the run's own settings with a few fields changed) as ``train`` does (``fit_head_on_features``) on:

- **inner 5-fold CV** of the run's development images (its training and validation images; group-aware folds,
  seed 1): fold k is tested, fold k+1 stops early, the other three train, with the run's training views;
- the run's own **hold-out split**, tested on its test images: printed beside, never used to choose.

Views missing from the cache (a validation image's augmented views) are extracted into it first. Each recipe is
``field=value`` pairs joined by ``,`` (recipes joined by ``;``), for example ``label_smoothing=0.1,dense_units=512``;
``views=N`` sets the number of training views (the augmentation factor); ``-`` is the run's own settings. A recipe
that changes what is extracted (``image_size``, ``views``) is scored on its own features, extracted into the cache
with the run's seed; only the head's seed changes with ``--seeds``.

    python benchmarks/bench_head_recipes.py --run 1 [--recipes="-;image_size=256,views=3"] \\
        [--seeds 0,1] [--json]

The store, artifacts and cache are the usual ``BCD_DATABASE_URL``, ``BCD_ARTIFACTS_DIR`` and ``BCD_CACHE_DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _machine import machine_info

from bcd_engine.data.images import load_images
from bcd_engine.data.regions import prepare_for_model
from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.splits import group_kfold, split_from_assignments
from bcd_engine.models.backbones import get_backbone
from bcd_engine.models.config import TrainConfig
from bcd_engine.models.features import FeatureCache, build_feature_extractor, extract_features
from bcd_engine.models.head import class_weight_dict, fit_head_on_features
from bcd_engine.store import RunStore

INNER_FOLDS = 5
INNER_SEED = 1  # not the run's split seed (0 by default), so the inner folds are not cut along its own lines
DEFAULT_RECIPES = "label_smoothing=0;label_smoothing=0.05;label_smoothing=0.1;label_smoothing=0.2"


def parse_recipe(text: str) -> dict:
    """``field=value,...`` as TrainConfig overrides (values read as JSON where they parse, else as text);
    ``views`` is read as the augmentation factor."""
    if text.strip() in ("", "-"):
        return {}
    overrides = {}
    for pair in text.split(","):
        field, _, value = pair.partition("=")
        try:
            overrides[field.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[field.strip()] = value.strip()
    return overrides


def recipe_config(config: TrainConfig, overrides: dict) -> TrainConfig:
    """``config`` with ``overrides`` (from :func:`parse_recipe`) applied."""
    overrides = dict(overrides)
    if "views" in overrides:
        overrides["augment"] = dataclasses.replace(config.augment, factor=int(overrides.pop("views")))
    return dataclasses.replace(config, **overrides)


def cached_views(cache: FeatureCache, config: TrainConfig, scan, rows: np.ndarray, views: int) -> np.ndarray:
    """Features (len(rows), views, d) of views 0..views-1 of ``scan``'s images ``rows``, extracting what ``cache``
    (``config``'s) lacks into it."""
    md5s = [scan.images[i].md5 for i in rows]
    missing = [(j, v) for j, key in enumerate(md5s) for v in range(views) if cache.get(f"{key}:{v}") is None]
    if missing:
        print(f"extracting {len(missing)} views the cache lacks", file=sys.stderr)
        spec = get_backbone(config.backbone)
        extractor, _ = build_feature_extractor(spec, config)
        images_needed = sorted({j for j, _ in missing})
        images = prepare_for_model(
            load_images([scan.paths[rows[j]] for j in images_needed], image_size=config.image_size), config
        )
        position = {j: k for k, j in enumerate(images_needed)}
        extract_features(
            extractor,
            images,
            np.array([position[j] for j, _ in missing]),
            [md5s[j] for j, _ in missing],
            np.array([v for _, v in missing]),
            preprocess=spec.preprocess(),
            augment=config.augment,
            seed=config.seed,
            cache=cache,
            batch_size=config.batch_size,
            progress=True,
        )
    return np.stack([[cache.get(f"{key}:{v}") for v in range(views)] for key in md5s]).astype(np.float32)


def head_errors(config: TrainConfig, x: np.ndarray, y: np.ndarray, train, val, test_x, test_y) -> int:
    """Errors on ``test_x`` (one vector per image) of the head ``train`` would fit: trained on every view of the
    rows ``train`` of ``x``, stopped early on view 0 of its rows ``val``."""
    import keras

    keras.utils.set_random_seed(config.seed)  # as train() seeds the process before it builds the head
    views, n_classes = x.shape[1], int(y.max()) + 1
    head = fit_head_on_features(
        x[train].reshape(-1, x.shape[-1]),
        np.repeat(y[train], views),
        x[val, 0],
        y[val],
        n_classes=n_classes,
        config=config,
        class_weight=class_weight_dict(y[train], n_classes) if config.class_weights else None,
    )
    predicted = head.predict(test_x, batch_size=256, verbose=0).argmax(axis=1)
    return int((predicted != test_y).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=int, required=True, help="a completed hold-out run of a pretrained backbone")
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help="';'-separated field=value lists (see above)")
    parser.add_argument("--seeds", default="0", help="head seeds, ','-separated (the run's seed plus each)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()

    store = RunStore.open()
    record = store.get_run(args.run)
    config = TrainConfig.from_dict(record.config["train"])
    if config.tta_views != 1 or config.fine_tune_epochs:
        sys.exit("the run must test one view and have no phase 2 (the head alone decides its answers)")
    scan = scan_dataset(record.config["data_dir"])
    split = split_from_assignments(scan, store.get_split(args.run))
    labels = np.asarray(scan.labels)
    dev = np.sort(np.concatenate([split.train, split.val]))
    y_dev, y_test = labels[dev], labels[split.test]
    features = {}  # extraction setting -> (development views, test view 0)

    def features_of(extraction: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
        cache = FeatureCache.for_config(extraction)  # read once per recipe, shared by both lookups
        setting = (cache.key, extraction.augment.factor)
        if setting not in features:
            features[setting] = (
                cached_views(cache, extraction, scan, dev, extraction.augment.factor),
                cached_views(cache, extraction, scan, split.test, 1)[:, 0],  # tested on view 0 only
            )
        return features[setting]

    inner = group_kfold(y_dev, np.asarray(scan.groups)[dev], folds=INNER_FOLDS, seed=INNER_SEED)
    # The hold-out split's training and validation images in the rows of x_dev.
    holdout_train, holdout_val = np.searchsorted(dev, split.train), np.searchsorted(dev, split.val)

    results = []
    for text in args.recipes.split(";"):
        extraction = recipe_config(config, parse_recipe(text))
        x_dev, x_test = features_of(extraction)
        for seed in [int(s) for s in args.seeds.split(",")]:
            recipe = dataclasses.replace(extraction, seed=config.seed + seed)
            started = time.perf_counter()
            folds = []
            for k, (_, tested) in enumerate(inner):
                stopping = inner[(k + 1) % INNER_FOLDS][1]
                training = np.setdiff1d(np.arange(len(dev)), np.concatenate([tested, stopping]))
                folds.append(head_errors(recipe, x_dev, y_dev, training, stopping, x_dev[tested, 0], y_dev[tested]))
            holdout = head_errors(recipe, x_dev, y_dev, holdout_train, holdout_val, x_test, y_test)
            row = {
                "recipe": text,
                "seed": recipe.seed,
                "image_size": recipe.image_size,
                "training_views": recipe.augment.factor,
                "inner_cv_errors": folds,
                "inner_cv_total": sum(folds),
                "inner_cv_accuracy": round(1 - sum(folds) / len(dev), 5),
                "holdout_test_errors": holdout,
                "holdout_test_accuracy": round(1 - holdout / len(split.test), 5),
                "seconds": round(time.perf_counter() - started, 1),
            }
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    document = {
        "benchmark": "head recipes on a run's cached frozen features: inner CV of its development images, and its test",
        "run": args.run,
        "backbone": config.backbone,
        "mask_regions": config.mask_regions,
        "training_views": config.augment.factor,
        "n_development": len(dev),
        "n_test": len(split.test),
        "inner_folds": INNER_FOLDS,
        "machine": machine_info()["summary"],
        "results": results,
    }
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        for row in results:
            print(
                f"{row['recipe']:>40} seed {row['seed']}: inner CV {row['inner_cv_total']} errors of {len(dev)} "
                f"{row['inner_cv_errors']}, hold-out test {row['holdout_test_errors']} of {len(split.test)}"
            )


if __name__ == "__main__":
    main()
