"""A class pack: a dataset's frozen-backbone features, cached once by the host, for class mode to train heads on.

``python -m bcd_engine prepare-class`` scans a dataset, makes the same group-aware hold-out split that Train
makes with the same seed (duplicate groups on one side), and extracts each image's features through the frozen
backbone: the untouched image (view 0) for every image, and ``views - 1`` augmented views more for each
training image. A pack is one folder under :func:`bcd_engine.settings.class_packs_dir`: ``pack.json`` (dataset,
classes, backbone and weights identity, image size, views, split sizes) and ``features.npz`` (labels, duplicate
groups, split indices and the feature vectors, in float16). It holds no image and no server path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bcd_engine import settings
from bcd_engine.data.images import load_images
from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.splits import Split, holdout_split
from bcd_engine.data.synthetic import ensure_demo_dataset, is_synthetic
from bcd_engine.errors import ConfigError, DataError, WriteError
from bcd_engine.models.backbones import get_backbone
from bcd_engine.models.config import MAX_AUGMENT, TrainConfig
from bcd_engine.models.features import FeatureCache, build_feature_extractor, extract_features, weights_identity

PACK_FORMAT = 1
METADATA = "pack.json"
FEATURES = "features.npz"
DEFAULT_VIEWS = 4  # augmented views cached per training image (1 = the image itself only)
DEFAULT_BACKBONE = (
    "vgg16"  # from random weights too its features tell the SYNTHETIC classes apart (MobileNetV2's are 0)
)
SYNTHETIC_IMAGE_SIZE = 32  # px, for the SYNTHETIC demo set unless asked otherwise (the backbone's minimum if larger)


@dataclass(frozen=True)
class PackDataset:
    """The dataset a pack was made from: its folder's name, image count, whether it is SYNTHETIC, and the scan's
    fingerprint (the same images and labels under any folder), which finds the store's runs on it."""

    name: str
    n_images: int
    synthetic: bool
    fingerprint: str


@dataclass(frozen=True, eq=False)
class ClassPack:
    """Cached features of one dataset through one frozen backbone, with labels and the hold-out split.

    ``features`` holds view 0 (the untouched image) of every image; ``train_views`` the augmented views 1 ..
    ``views - 1`` of each training image, in the order of ``split.train``.
    """

    name: str
    dataset: PackDataset
    class_names: tuple[str, ...]
    backbone: str
    weights: str  # 'imagenet', 'random-seed-S' or 'sha256:...' (bcd_engine.models.features.weights_identity)
    image_size: int
    views: int
    seed: int
    labels: np.ndarray
    groups: np.ndarray
    split: Split
    features: np.ndarray  # (n_images, n_features)
    train_views: np.ndarray  # (len(split.train), views - 1, n_features)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    @property
    def weights_label(self) -> str:
        """The starting weights in a word or two: 'ImageNet', 'random' or 'file sha256:1a2b3c4d'."""
        if self.weights == "imagenet":
            return "ImageNet"
        return f"file sha256:{self.weights[7:15]}" if self.weights.startswith("sha256:") else "random"

    @property
    def label(self) -> str:
        """'resnet50, ImageNet weights, 224 px, 4 views': how a student picks it."""
        return f"{self.backbone}, {self.weights_label} weights, {self.image_size} px, {self.views} views"

    @property
    def protocol(self) -> str:
        """How a head trained on the pack is scored, in words."""
        return (
            f"holdout on the pack's split: {len(self.split.train)} training, {len(self.split.val)} validation and "
            f"{len(self.split.test)} test images, duplicate groups on one side; a head on frozen {self.backbone} "
            "features (the backbone is not trained)"
        )

    def training_data(self, views: int) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of the training images, ``views`` views each (view 0 and ``views - 1`` augmented)."""
        if not 1 <= views <= self.views:
            raise ConfigError(f"this pack holds 1 to {self.views} views per training image, not {views}")
        parts = [self.features[self.split.train][:, None, :], self.train_views[:, : views - 1, :]]
        x = np.concatenate(parts, axis=1).reshape(-1, self.n_features)
        return x.astype(np.float32), np.repeat(self.labels[self.split.train], views)

    def subset(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of the 'val' or 'test' images, view 0."""
        indices = getattr(self.split, name)
        return self.features[indices].astype(np.float32), self.labels[indices]

    def to_dict(self) -> dict:
        """The pack's description (``pack.json``): everything but the arrays."""
        return {
            "format": PACK_FORMAT,
            "name": self.name,
            "dataset": {
                "name": self.dataset.name,
                "n_images": self.dataset.n_images,
                "synthetic": self.dataset.synthetic,
                "fingerprint": self.dataset.fingerprint,
            },
            "class_names": list(self.class_names),
            "backbone": self.backbone,
            "weights": self.weights,
            "image_size": self.image_size,
            "views": self.views,
            "seed": self.seed,
            "n_features": self.n_features,
            "split": {
                "train": len(self.split.train),
                "val": len(self.split.val),
                "test": len(self.split.test),
                "val_fraction": self.split.val_fraction,
                "test_fraction": self.split.test_fraction,
            },
        }


def prepare_pack(
    data_dir: str | os.PathLike | None = None,
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | None = None,
    image_size: int | None = None,
    views: int = DEFAULT_VIEWS,
    seed: int = 0,
    use_feature_cache: bool = True,
    progress: bool = False,
) -> ClassPack:
    """Extract a class pack of ``data_dir`` (None: the SYNTHETIC demo set) through ``backbone``, in memory, at
    ``image_size`` (default: the backbone's native size; for the demo set :data:`SYNTHETIC_IMAGE_SIZE`).

    The split is :func:`~bcd_engine.data.splits.holdout_split` with Train's fractions and ``seed``, so runs
    trained on the same folder with that seed test on the same images. With ``use_feature_cache`` the vectors
    come from and go to the feature cache that Train uses (the same backbone, weights, size, views and seed
    share entries); without it nothing is written anywhere. ConfigError for a backbone that is trained end to
    end (it has no frozen features) or ``views`` out of range; DataError for an unusable folder.
    """
    if not 1 <= views <= MAX_AUGMENT:
        raise ConfigError(f"views must be between 1 and {MAX_AUGMENT}, got {views}")
    spec = get_backbone(backbone)
    if not spec.pretrained:
        raise ConfigError(f"{spec.name} is trained end to end and has no frozen features; pick another backbone")
    if data_dir is None and image_size is None:
        image_size = max(SYNTHETIC_IMAGE_SIZE, spec.min_size)
    config = TrainConfig.for_backbone(spec.name, weights=weights, image_size=image_size, augment=views, seed=seed)
    scan = scan_dataset(ensure_demo_dataset() if data_dir is None else data_dir, progress=progress)
    split = holdout_split(
        scan.labels, scan.groups, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=seed
    )
    images = load_images(scan.paths, image_size=config.image_size, progress=progress)
    md5s = [record.md5 for record in scan.images]
    extractor, _ = build_feature_extractor(spec, config)
    common = {
        "preprocess": spec.preprocess(),
        "augment": config.augment,
        "seed": seed,
        "cache": FeatureCache.for_config(config) if use_feature_cache else None,
        "batch_size": config.batch_size,
        "progress": progress,
    }
    everything = np.arange(scan.n_images)
    features = extract_features(
        extractor, images, everything, md5s, np.zeros(scan.n_images, int), description="features (view 0)", **common
    )
    features = features.astype(np.float16)  # as the pack keeps them
    if not np.ptp(features, axis=0).any():
        raise DataError(
            f"{spec.name} with {weights_identity(config.weights, seed=seed)} weights at {config.image_size} px gives "
            "every image the same features, so no head could learn from them; use ImageNet weights or another "
            f"backbone (e.g. {DEFAULT_BACKBONE})"
        )
    extra = views - 1
    rows = np.repeat(split.train, extra)
    augmented = (
        extract_features(
            extractor,
            images,
            rows,
            [md5s[i] for i in rows],
            np.tile(np.arange(1, views), len(split.train)),
            description="features (augmented views)",
            **common,
        )
        if extra
        else np.zeros((0, features.shape[1]), np.float32)
    )
    root = Path(scan.root)
    return ClassPack(
        name=pack_name(root.name, spec.name, weights_identity(config.weights, seed=seed), config.image_size),
        dataset=PackDataset(root.name, scan.n_images, is_synthetic(root), scan.fingerprint),
        class_names=tuple(scan.class_names),
        backbone=spec.name,
        weights=weights_identity(config.weights, seed=seed),
        image_size=config.image_size,
        views=views,
        seed=seed,
        labels=scan.labels,
        groups=scan.groups,
        split=split,
        features=features,
        train_views=augmented.reshape(len(split.train), extra, features.shape[1]).astype(np.float16),
    )


def pack_name(dataset: str, backbone: str, weights: str, image_size: int) -> str:
    """The pack's folder name: dataset, backbone, weights ('imagenet', 'random', 'file-1a2b3c4d') and size."""
    tag = (
        "imagenet" if weights == "imagenet" else f"file-{weights[7:15]}" if weights.startswith("sha256:") else "random"
    )
    return f"{dataset}-{backbone}-{tag}-{image_size}px"


def save_pack(pack: ClassPack, root: str | os.PathLike | None = None) -> Path:
    """Write ``pack`` as ``<root>/<pack.name>/`` (root: :func:`~bcd_engine.settings.class_packs_dir`), replacing a
    pack of that name whole; the folder. WriteError when it cannot be written."""
    folder = Path(root or settings.class_packs_dir()) / pack.name
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{pack.name}.", dir=folder.parent))
        try:
            (staging / METADATA).write_text(json.dumps(pack.to_dict(), indent=2))
            np.savez(
                staging / FEATURES,
                labels=pack.labels,
                groups=pack.groups,
                train=pack.split.train,
                val=pack.split.val,
                test=pack.split.test,
                features=pack.features,
                train_views=pack.train_views,
            )
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise WriteError(f"cannot write the class pack {folder}: {exc.strerror or exc}") from exc
    return folder


def load_pack(folder: str | os.PathLike) -> ClassPack:
    """The pack saved in ``folder`` (DataError when it is not a complete pack of this format)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / METADATA).read_text())
        if meta.get("format") != PACK_FORMAT:
            raise DataError(f"{folder.name}: pack format {meta.get('format')!r}, expected {PACK_FORMAT}")
        with np.load(folder / FEATURES) as arrays:
            data = {key: arrays[key] for key in arrays.files}
        split_meta = meta["split"]
        split = Split(
            train=data["train"],
            val=data["val"],
            test=data["test"],
            seed=meta["seed"],
            val_fraction=split_meta["val_fraction"],
            test_fraction=split_meta["test_fraction"],
        )
        return ClassPack(
            name=folder.name,
            dataset=PackDataset(**meta["dataset"]),
            class_names=tuple(meta["class_names"]),
            backbone=meta["backbone"],
            weights=meta["weights"],
            image_size=meta["image_size"],
            views=meta["views"],
            seed=meta["seed"],
            labels=data["labels"],
            groups=data["groups"],
            split=split,
            features=data["features"],
            train_views=data["train_views"],
        )
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{folder.name} is not a usable class pack: {exc}") from exc


def find_packs(root: str | os.PathLike | None = None) -> tuple[list[ClassPack], list[str]]:
    """(the usable packs under ``root`` (default :func:`~bcd_engine.settings.class_packs_dir`), by name; one line
    per folder that is not a usable pack)."""
    folder = Path(root or settings.class_packs_dir())
    packs, problems = [], []
    if not folder.is_dir():
        return packs, problems
    for candidate in sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")):
        try:
            packs.append(load_pack(candidate))
        except DataError as exc:
            problems.append(str(exc))
    return packs, problems


def packs_signature(root: str | os.PathLike | None = None) -> str:
    """Changes whenever a pack under ``root`` is added, removed or rewritten (for caching the loaded packs)."""
    folder = Path(root or settings.class_packs_dir())
    if not folder.is_dir():
        return ""
    stamps = []
    for meta in sorted(folder.glob(f"*/{METADATA}")):
        stat = meta.stat()
        stamps.append(f"{meta.parent.name}:{stat.st_mtime_ns}:{stat.st_size}")
    return "|".join(stamps)
