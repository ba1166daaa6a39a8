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
import os
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bcd_engine import settings
from bcd_engine.data.regions import NO_REGIONS, PAINT_RULE
from bcd_engine.files import atomic_path, file_sha256
from bcd_engine.models.backbones import BackboneSpec, build_backbone, pooling_layer
from bcd_engine.models.backend import forward_function
from bcd_engine.models.backend import name as backend_name
from bcd_engine.models.batches import view_batches
from bcd_engine.models.config import AugmentConfig, TrainConfig
from bcd_engine.progress import Phase, Reporter

CACHE_FORMAT = 3  # 2: augmentations by Keras ops, the backend and precision in the key; 3: chunk files, no factor
SAVE_EVERY_S = 20.0  # computed vectors reach the disk at least this often during an extraction
COMPACT_AFTER = 8  # chunk files of one cache merged into its main file at the end of an extraction


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
    """Feature vectors keyed by (image md5, view) for one extraction setting, kept in chunk files.

    Vectors reach the disk as they are computed: :meth:`save` writes the ones added since the last save as a new
    chunk file (``<key>.chunk-*.npz``, written atomically, never changed), so a run that is cancelled or killed
    keeps every chunk saved so far and the next run resumes from there. Loading merges ``<key>.npz`` and every
    chunk; a damaged file is skipped (its vectors are computed again). :meth:`compact` merges the chunks into
    ``<key>.npz``.
    """

    def __init__(self, key_parts: dict, *, root: Path | None = None):
        self.key_parts = key_parts
        self.key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = Path(root or settings.cache_dir() / "features")
        self.path = self.folder / f"{self.key}.npz"
        self._entries: dict[str, np.ndarray] = {}
        self._unsaved: list[str] = []
        self.hits = 0
        self.misses = 0
        for file in self._files():
            self._entries.update(_read_entries(file))

    @classmethod
    def for_config(cls, config: TrainConfig, *, root: Path | None = None) -> FeatureCache:
        """The cache of ``config``'s extraction setting. The number of views is not part of it: view v of an
        image is the same whatever the factor, so a run with fewer (or more) views reuses the views it shares."""
        import keras

        augment = asdict(config.augment)
        del augment["factor"]
        parts = {
            "format": CACHE_FORMAT,
            "backbone": config.backbone,
            "weights": weights_identity(config.weights, seed=config.seed),
            "image_size": config.image_size,
            "pooling": config.pooling,
            "augment": augment,
            "seed": config.seed,
            "keras": keras.__version__,
            "backend": backend_name(),
            "precision": keras.mixed_precision.global_policy().name,  # a GPU's bfloat16 features are not a CPU's
        }
        if config.colour != "rgb":
            parts["colour"] = config.colour
        if config.mask_regions != NO_REGIONS:  # likewise: only when regions are masked, with how they are painted
            parts["mask_regions"] = config.mask_regions
            parts["mask_paint"] = PAINT_RULE
        return cls(parts, root=root)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, entry_key: str) -> np.ndarray | None:
        return self._entries.get(entry_key)

    def put(self, entry_key: str, vector: np.ndarray) -> None:
        if entry_key not in self._entries:
            self._unsaved.append(entry_key)
        self._entries[entry_key] = vector

    def chunk_files(self) -> list[Path]:
        """The chunk files on disk, oldest first."""
        return sorted(self.folder.glob(f"{self.key}.chunk-*.npz"))

    def save(self) -> None:
        """Write the vectors added since the last save as one new chunk file, atomically; a failed write (a full
        disk) only warns, leaves no partial file and keeps them for the next save."""
        if not self._unsaved:
            return
        name = f"{self.key}.chunk-{time.time_ns():020d}-{os.getpid()}.npz"
        if self._write(self.folder / name, {key: self._entries[key] for key in self._unsaved}):
            self._unsaved = []

    def compact(self) -> None:
        """Merge ``<key>.npz``, the chunk files and this cache's vectors into ``<key>.npz``; the chunks merged are
        removed (another process's chunk written meanwhile is kept)."""
        chunks = self.chunk_files()
        if not chunks and not self._unsaved:
            return
        merged: dict[str, np.ndarray] = {}
        for file in [self.path, *chunks]:
            merged.update(_read_entries(file))
        merged.update(self._entries)
        if self._write(self.path, merged):
            self._unsaved = []
            for chunk in chunks:
                chunk.unlink(missing_ok=True)

    def _files(self) -> list[Path]:
        return [self.path, *self.chunk_files()] if self.folder.is_dir() else []

    def _write(self, path: Path, entries: dict[str, np.ndarray]) -> bool:
        keys = np.array(list(entries), dtype=str)
        features = np.stack(list(entries.values())).astype(np.float32) if entries else np.zeros((0, 0), np.float32)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, keys=keys, features=features)
        except OSError as exc:  # the cache only saves time: a full disk costs the next run, not this one
            warnings.warn(f"could not write the feature cache {path}: {exc}", RuntimeWarning, stacklevel=3)
            return False
        return True


def _read_entries(file: Path) -> dict[str, np.ndarray]:
    """The vectors of one cache file; none for a missing or damaged file."""
    try:
        with np.load(file, allow_pickle=False) as data:
            keys, features = data["keys"].tolist(), data["features"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return {}
    return dict(zip(keys, features)) if len(keys) == len(features) else {}


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
    report: Reporter | None = None,
) -> np.ndarray:
    """Feature vectors for ``images[indices[j]]`` seen as ``views[j]`` (0 = untouched), using and filling ``cache``.

    ``image_keys[j]`` is that image's md5 digest (they seed the augmentation and key the cache).
    ``on_batch`` is called after every batch (cancellation checks raise from there); ``report`` gets the
    phase's progress (views computed of those not in the cache). The vectors computed are saved to the cache
    every :data:`SAVE_EVERY_S` seconds and when the extraction ends or is stopped, so a cancelled run keeps them.
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
        done, last_save = 0, time.monotonic()
        try:
            with Phase(description, len(missing), unit="view", bar=progress, report=report) as phase:
                for batch in batches:
                    computed = np.asarray(forward(batch), dtype=np.float32)
                    for row, index in enumerate(missing[done : done + len(computed)]):
                        found[index] = computed[row]
                        if cache is not None:
                            cache.put(entry_keys[index], computed[row])
                    done += len(computed)
                    phase.advance(len(computed))
                    if cache is not None and time.monotonic() - last_save >= SAVE_EVERY_S:
                        cache.save()
                        last_save = time.monotonic()
                    if on_batch is not None:
                        on_batch()
        finally:  # finished, cancelled or failed: what was computed is kept
            if cache is not None:
                cache.save()
                if len(cache.chunk_files()) >= COMPACT_AFTER:
                    cache.compact()
    return np.stack(found).astype(np.float32)
