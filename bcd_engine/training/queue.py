"""Putting runs in the queue for a worker (the Train page and the demo model)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from bcd_engine.errors import ConfigError, RerunError
from bcd_engine.models.backbones import BACKBONES, require_weights_file, weights_files
from bcd_engine.models.config import TrainConfig
from bcd_engine.store import FINAL_STATUSES, Protocol, RunStore

if TYPE_CHECKING:
    from bcd_engine.data.scan import ScanResult


def _squashed(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def local_imagenet_weights(backbone: str, folder: str | os.PathLike) -> Path | None:
    """The no-top ImageNet weights file of ``backbone`` in ``folder`` (the weights folder), or None.

    A file matches by Keras' own name for it (the registry's ``weights_file``) or by a name that starts with the
    backbone's and says no-top (``resnet50_imagenet_notop.weights.h5``); a backbone without ImageNet weights has none.
    """
    spec = BACKBONES.get(backbone)
    if spec is None or not spec.pretrained:
        return None
    files = weights_files(folder)
    exact = [path for path in files if path.name == spec.weights_file]
    loose = [path for path in files if _squashed(path.name).startswith(spec.name) and "notop" in _squashed(path.name)]
    return next(iter(exact + loose), None)


def register_dataset(store: RunStore, scan: ScanResult) -> int:
    """Register the scanned folder as a dataset of ``store`` (the Train page then offers it); its id."""
    from bcd_engine.data.synthetic import is_synthetic

    return store.register_dataset(
        name=Path(scan.root).name,
        data_dir=scan.root,
        n_images=scan.n_images,
        class_counts=scan.class_counts,
        synthetic=is_synthetic(scan.root),
    )


def queue_run(store: RunStore, config: TrainConfig, data_dir: str | os.PathLike) -> int:
    """Scan ``data_dir`` (``DataError`` when unusable), put one run in the queue (status queued); its id.

    Scanning first turns an unusable folder into a clear error before anything is queued; the folder is
    registered as the run's dataset.
    """
    from bcd_engine.data.scan import scan_dataset

    require_weights_file(config.weights)
    scan = scan_dataset(data_dir)
    dataset_id = register_dataset(store, scan)
    return store.create_run(
        backbone=config.backbone,
        protocol=Protocol.holdout(),
        dataset_id=dataset_id,
        config={"train": config.to_dict(), "data_dir": scan.root, "class_names": list(scan.class_names)},
    )


def queue_again(store: RunStore, run_id: int, *, weights: str | os.PathLike | None = None) -> int:
    """Queue a new run with the stored train config and data folder of finished run ``run_id``; its id.

    ``weights`` replaces the stored weights option (a copy of a weights file that has moved, or 'imagenet').
    A run trained from a weights file that is gone is refused with ``RerunError`` saying how to point it at a copy.

    Any finished run (completed, failed, cancelled or interrupted) of the hold-out protocol can run again.
    Refused with ``RerunError``: a run still queued or running, a k-fold or LODO round (the queue trains
    hold-out runs; its split belongs to the whole ``cv`` or ``lodo`` run, which is what to run again) and a
    stored config this version cannot read. An unknown run raises ``RunNotFoundError``, a data folder that
    is gone or unusable ``DataError``, as :func:`queue_run` does.
    """
    run = store.get_run(run_id)
    if run.status not in FINAL_STATUSES:
        raise RerunError(f"run {run_id} is {run.status}; only a finished run can be queued again")
    if run.protocol.kind != "holdout":
        raise RerunError(
            f"run {run_id} is one round of {run.protocol.label}; the queue trains hold-out runs only, "
            "so run the whole protocol again (the cv or lodo command)"
        )
    try:
        config, data_dir = TrainConfig.from_dict(run.config["train"]), run.config["data_dir"]
    except (KeyError, TypeError) as exc:
        raise RerunError(
            f"the stored config of run {run_id} cannot be read by this version of bcd ({type(exc).__name__}: {exc})"
        ) from exc
    if weights is not None:
        config = dataclasses.replace(config, weights=str(weights))
    else:
        try:
            require_weights_file(config.weights)
        except ConfigError as exc:
            raise RerunError(
                f"run {run_id} was trained from the weights file {config.weights}, which is gone; "
                f"point the new run at a copy with `rerun --run {run_id} --weights PATH` "
                "(or choose other weights)"
            ) from exc
    return queue_run(store, config, data_dir)


def demo_config() -> TrainConfig:
    """A tiny scratch-CNN configuration that trains on the demo set on a CPU in about a minute."""
    return TrainConfig.for_backbone("scratch_cnn", image_size=64, epochs=15, patience=8, batch_size=16, dense_units=64)


def queue_demo_run(store: RunStore, data_dir: str | os.PathLike) -> int:
    """Queue the demo model on the SYNTHETIC demo set at ``data_dir`` (``synthetic.ensure_demo_dataset()``)."""
    return queue_run(store, demo_config(), data_dir)
