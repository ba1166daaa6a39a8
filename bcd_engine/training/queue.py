"""Putting runs in the queue for a worker (the Train page and the demo model)."""
from __future__ import annotations

import os

from bcd_engine.models.config import TrainConfig
from bcd_engine.store import Protocol, RunStore


def queue_run(store: RunStore, config: TrainConfig, data_dir: str | os.PathLike) -> int:
    """Scan ``data_dir`` (``DataError`` when unusable), put one run in the queue (status queued); its id.

    Scanning first turns an unusable folder into a clear error before anything is queued.
    """
    from bcd_engine.data.scan import scan_dataset

    scan = scan_dataset(data_dir)
    return store.create_run(backbone=config.backbone, protocol=Protocol.holdout(),
                            config={"train": config.to_dict(), "data_dir": scan.root,
                                    "class_names": list(scan.class_names)})


def demo_config() -> TrainConfig:
    """A tiny scratch-CNN configuration that trains on the demo set on a CPU in about a minute."""
    return TrainConfig.for_backbone("scratch_cnn", image_size=64, epochs=15, patience=8, batch_size=16,
                                    dense_units=64)


def queue_demo_run(store: RunStore, demo_root: str | os.PathLike) -> int:
    """Queue the demo model on the SYNTHETIC demo set at ``demo_root`` (``synthetic.ensure_demo_dataset()``)."""
    return queue_run(store, demo_config(), demo_root)
