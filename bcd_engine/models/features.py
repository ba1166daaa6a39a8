"""Frozen-backbone features and their cache.

Phase 1 of fine-tuning trains only the head, so the frozen backbone's output for each training view
never changes: bcd computes it once and trains the head on the cached vectors. Entries are keyed by
the image's md5 and the view number, inside a cache file keyed by everything that changes the
vectors (backbone, weights, image size, pooling, augmentation, seed, colour mode, Keras version,
backend and precision). A new split of the same images reuses the entries; a changed image has a new md5 and is
recomputed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bcd_engine import settings
from bcd_engine.files import atomic_path, file_sha256
from bcd_engine.models.backbones import BackboneSpec, build_backbone, pooling_layer
from bcd_engine.models.backend import forward_function
from bcd_engine.models.backend import name as backend_name
from bcd_engine.models.batches import view_batches
from bcd_engine.models.config import AugmentConfig, TrainConfig
from bcd_engine.progress import progress_bar

CACHE_FORMAT = 2  # 2: augmentations by Keras ops, the Keras backend and the precision in the key


def weights_identity(weights: str | None, *, seed: int) -> str:
    """A short identity of the weights: 'imagenet', 'random-seed-S' or the sha256 of the weights file."""
    if weights is None:
        return f"random-seed-{seed}"
    if weights == "imagenet":
        return "imagenet"
    return "sha256:" + file_sha256(weights)


def build_feature_extractor(spec: BackboneSpec, config: TrainConfig):
    """The frozen backbone followed by global pooling: image batch -> one vector per image."""
    import keras

    backbone = build_backbone(spec, image_size=config.image_size, weights=config.weights)
    backbone.trainable = False
    inputs = keras.Input((config.image_size, config.image_size, 3))
    features = backbone(inputs, training=False)
    return keras.Model(inputs, pooling_layer(config.pooling)(features), name="feature_extractor"), backbone


class FeatureCache:
    """A file of feature vectors keyed by (image md5, view) for one extraction setting."""

    def __init__(self, key_parts: dict, *, root: Path | None = None):
        self.key_parts = key_parts
        self.key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
        self.path = Path(root or settings.cache_dir() / "features") / f"{self.key}.npz"
        self._entries: dict[str, np.ndarray] = {}
        self.hits = 0
        self.misses = 0
        if self.path.is_file():
            try:
                with np.load(self.path) as data:
                    self._entries = dict(zip(data["keys"].tolist(), data["features"]))
            except (OSError, ValueError, KeyError):
                self._entries = {}  # a damaged cache file is rebuilt

    @classmethod
    def for_config(cls, config: TrainConfig, *, root: Path | None = None) -> FeatureCache:
        import keras

        parts = {
            "format": CACHE_FORMAT,
            "backbone": config.backbone,
            "weights": weights_identity(config.weights, seed=config.seed),
            "image_size": config.image_size,
            "pooling": config.pooling,
            "augment": asdict(config.augment),
            "seed": config.seed,
            "keras": keras.__version__,
            "backend": backend_name(),
            "precision": keras.mixed_precision.global_policy().name,  # a GPU's bfloat16 features are not a CPU's
        }
        if config.colour != "rgb":  # only when set, so caches made before the option existed stay valid
            parts["colour"] = config.colour
        return cls(parts, root=root)

    def get(self, entry_key: str) -> np.ndarray | None:
        return self._entries.get(entry_key)

    def put(self, entry_key: str, vector: np.ndarray) -> None:
        self._entries[entry_key] = vector

    def save(self) -> None:
        """Write the cache atomically; a failed write (a full disk) only warns, leaving no partial file."""
        keys = np.array(list(self._entries), dtype=str)
        features = np.stack(list(self._entries.values())) if self._entries else np.zeros((0, 0), np.float32)
        try:
            with atomic_path(self.path) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, keys=keys, features=features)
        except OSError as exc:  # the cache only saves time: a full disk costs the next run, not this one
            warnings.warn(f"could not write the feature cache {self.path}: {exc}", RuntimeWarning, stacklevel=2)


def extract_features(
    extractor,
    images: np.ndarray,
    indices: np.ndarray,
    image_keys: list[str],
    views: np.ndarray,
    *,
    preprocess: Callable,
    augment: AugmentConfig,
    seed: int,
    cache: FeatureCache | None = None,
    batch_size: int = 32,
    progress: bool = False,
    description: str = "features",
    on_batch: Callable[[], None] | None = None,
) -> np.ndarray:
    """Feature vectors for ``images[indices[j]]`` seen as ``views[j]`` (0 = untouched), using and filling ``cache``.

    ``image_keys[j]`` is that image's md5 digest (they seed the augmentation and key the cache).
    ``on_batch`` is called after every batch (cancellation checks raise from there).
    """
    entry_keys = [f"{key}:{view}" for key, view in zip(image_keys, views)]
    found = [cache.get(k) if cache is not None else None for k in entry_keys]
    missing = np.array([i for i, f in enumerate(found) if f is None], dtype=np.int64)
    if cache is not None:
        cache.hits += len(entry_keys) - len(missing)
        cache.misses += len(missing)
    if len(missing):
        forward = forward_function(extractor, preprocess)
        batches = view_batches(
            images,
            np.asarray(indices, dtype=np.int64)[missing],
            np.asarray(views)[missing],
            [image_keys[i] for i in missing],
            augment=augment,
            seed=seed,
            batch_size=batch_size,
        )
        outputs = []
        with progress_bar(len(missing), description, enabled=progress) as bar:
            for batch in batches:
                outputs.append(np.asarray(forward(batch), dtype=np.float32))
                bar.update(len(outputs[-1]))
                if on_batch is not None:
                    on_batch()
        computed = np.concatenate(outputs)
        for row, index in enumerate(missing):
            found[index] = computed[row]
            if cache is not None:
                cache.put(entry_keys[index], computed[row])
        if cache is not None:
            cache.save()
    return np.stack(found).astype(np.float32)
