"""bcd_engine: detect acute lymphoblastic leukemia in blood smear images by fine-tuning ImageNet CNNs.

Modules by concern: ``datasets`` (scan, load images), ``splits`` (group-aware splits), ``synthetic``
(demo data), ``backbones`` (registry), ``config`` (TrainConfig), ``augment``, ``features`` (frozen
feature cache), ``training``, ``evaluation`` (metrics), ``inference`` (predict, external evaluation),
``store`` (runs in SQLAlchemy), ``cli``. Importing the package does not import TensorFlow.
"""
from bcd_engine.errors import (
    BCDError,
    CancelledError,
    ConfigError,
    DataError,
    ImageLoadError,
    RunNotFoundError,
    StoreError,
)

__version__ = "0.1.0"

__all__ = [
    "BCDError",
    "CancelledError",
    "ConfigError",
    "DataError",
    "ImageLoadError",
    "RunNotFoundError",
    "StoreError",
    "__version__",
]
