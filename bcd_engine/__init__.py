"""bcd_engine: detect acute lymphoblastic leukemia in blood smear images by fine-tuning ImageNet CNNs.

Packages by concern, each importing only from those listed before it:

- leaves: ``errors``, ``settings``, ``progress``, ``files``, ``processes``
- ``data``: image decoding, folder scans, near-duplicates, splits, archives, colour, the synthetic demo set
- ``store``: runs, epochs, splits, evaluations and artifacts in SQLite or PostgreSQL
- ``evaluation``: metrics and their confidence intervals (NumPy and scikit-learn only)
- ``models``: the backbone registry, ``TrainConfig``, augmentation, head, feature cache, device
- ``inference``: loading a run's model, predicting, diagnosis, Grad-CAM
- ``training``: ``train``, its monitor (heartbeat, cancel, epochs) and the queue worker
- ``protocols``: how a number is obtained: k-fold, leave-one-dataset-out, audits, baselines, robustness
- ``reports`` and ``export``: tables for the dashboard; model files with a model card
- ``cli``: ``python -m bcd_engine``

The entry points a notebook needs are importable from here (loaded on first use, so importing the
package stays fast and never imports TensorFlow)::

    from bcd_engine import RunStore, TrainConfig, scan_dataset, train
    store = RunStore.open()
    result = train(TrainConfig.for_backbone("resnet50", weights="imagenet"), "data/Original", store=store)
"""

from __future__ import annotations

import importlib
from typing import Any

from bcd_engine.errors import (
    ArchiveError,
    BCDError,
    CancelledError,
    ConfigError,
    DataError,
    ImageLoadError,
    RecordError,
    RunNotFoundError,
    StoreError,
    WriteError,
)
from bcd_engine.version import __version__

_ENTRY_POINTS = {
    "scan_dataset": "bcd_engine.data.scan",
    "make_synthetic_dataset": "bcd_engine.data.synthetic",
    "RunStore": "bcd_engine.store",
    "Protocol": "bcd_engine.store",
    "TrainConfig": "bcd_engine.models.config",
    "AugmentConfig": "bcd_engine.models.config",
    "BACKBONES": "bcd_engine.models.backbones",
    "train": "bcd_engine.training.run",
    "load_run_model": "bcd_engine.inference.loading",
    "evaluate_run_on_folder": "bcd_engine.inference.evaluate",
    "Diagnoser": "bcd_engine.inference.diagnosis",
    "explain_source": "bcd_engine.inference.explain",
    "cross_validate": "bcd_engine.protocols.crossval",
    "leave_one_dataset_out": "bcd_engine.protocols.lodo",
    "audit_dataset": "bcd_engine.protocols.audit",
    "export_run": "bcd_engine.export.bundle",
}

__all__ = [
    "ArchiveError",
    "BCDError",
    "CancelledError",
    "ConfigError",
    "DataError",
    "ImageLoadError",
    "RecordError",
    "RunNotFoundError",
    "StoreError",
    "WriteError",
    "__version__",
    *_ENTRY_POINTS,
]


def __getattr__(name: str) -> Any:
    """Import an entry point's module on first use (PEP 562)."""
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module 'bcd_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
