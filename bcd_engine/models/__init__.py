"""Models: what a network is made of and how it is configured (Keras is imported only when one is built).

``backbones`` (the registry: one row per network, scratch CNN included), ``config`` (``TrainConfig``),
``augment`` (deterministic views), ``batches`` (feeding images to a model), ``head`` (classifier and assembled
model), ``features`` (frozen-feature cache), ``device`` (GPU or CPU, mixed precision), ``backend`` (the few
things TensorFlow, JAX and PyTorch each do their own way).
"""

from bcd_engine.models.augment import augment_batch, preview_views, view_seeds
from bcd_engine.models.backbones import BACKBONES, SCRATCH, BackboneSpec, build_backbone, get_backbone
from bcd_engine.models.config import AugmentConfig, TrainConfig
from bcd_engine.models.device import compute_precision, configure_device, precision_policy
from bcd_engine.models.features import FeatureCache, build_feature_extractor, extract_features
from bcd_engine.models.head import assemble_model, build_head

__all__ = [
    "BACKBONES",
    "SCRATCH",
    "AugmentConfig",
    "BackboneSpec",
    "FeatureCache",
    "TrainConfig",
    "assemble_model",
    "augment_batch",
    "build_backbone",
    "build_feature_extractor",
    "build_head",
    "compute_precision",
    "configure_device",
    "extract_features",
    "get_backbone",
    "precision_policy",
    "preview_views",
    "view_seeds",
]
