"""Training configuration: one frozen, validated dataclass stored with every run."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from bcd_engine.data.colour import COLOUR_MODES
from bcd_engine.data.splits import DEFAULT_FRACTION
from bcd_engine.errors import ConfigError
from bcd_engine.models.backbones import SCRATCH, get_backbone, resolve_weights

OPTIMIZERS = ("adam", "sgd", "rmsprop")


POOLINGS = ("avg", "max")


MAX_AUGMENT = 20


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation. A smear has no "up": flips and 90-degree turns are always safe."""

    factor: int = 1  # views per training image (1 = the image itself only)
    flips: bool = True
    rot90: bool = True
    rotation_degrees: float = 15.0
    scale: float = 0.1  # zoom in or out by up to this fraction
    brightness: float = 0.1  # additive, on a 0..1 scale
    contrast: float = 0.1  # multiplicative: 1 +- contrast
    hue: float = 0.02  # hue shift as a fraction of the colour circle

    def __post_init__(self):
        if not 1 <= self.factor <= MAX_AUGMENT:
            raise ConfigError(f"augmentation factor must be between 1 and {MAX_AUGMENT}, got {self.factor}")
        for name in ("rotation_degrees", "scale", "brightness", "contrast", "hue"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augmentation {name} must be >= 0, got {getattr(self, name)}")
        if self.scale >= 0.5 or self.hue > 0.5 or self.contrast >= 1:
            raise ConfigError("augmentation scale must be < 0.5, contrast < 1 and hue <= 0.5")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. ``TrainConfig.for_backbone`` fills per-backbone defaults."""

    backbone: str
    weights: str | None = None
    image_size: int = 224
    batch_size: int = 32
    epochs: int = 40  # phase 1: head on the frozen backbone (or the whole scratch CNN)
    fine_tune_epochs: int = 0  # phase 2: top layers unfrozen; 0 skips it
    fine_tune_layers: int = 0
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-5
    optimizer: str = "adam"
    label_smoothing: float = 0.0
    class_weights: bool = False
    dense_units: int = 256  # 0: softmax directly on the pooled features
    dense_activation: str = "relu"
    dropout: float = 0.3
    pooling: str = "avg"
    patience: int = 6  # early stopping on validation loss, best weights restored
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tta_views: int = 1  # test-time augmentation: predictions averaged over this many views (1 = off)
    colour: str = "rgb"  # "grayscale" trains and predicts on grayscale images (stain colour is no shortcut)
    val_fraction: float = DEFAULT_FRACTION
    test_fraction: float = DEFAULT_FRACTION
    seed: int = 0

    def __post_init__(self):
        spec = get_backbone(self.backbone)
        object.__setattr__(self, "backbone", spec.name)
        object.__setattr__(self, "weights", resolve_weights(spec, self.weights))
        if isinstance(self.augment, dict):
            object.__setattr__(self, "augment", AugmentConfig(**self.augment))
        if self.image_size < spec.min_size:
            raise ConfigError(
                f"image size {self.image_size} is below {spec.name}'s minimum of {spec.min_size} px"
            )
        checks = [
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.fine_tune_epochs >= 0, f"fine-tune epochs must be >= 0, got {self.fine_tune_epochs}"),
            (self.fine_tune_layers >= 0, f"fine-tune layers must be >= 0, got {self.fine_tune_layers}"),
            (self.learning_rate > 0 and self.fine_tune_learning_rate > 0, "learning rates must be > 0"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.dense_units >= 0, f"dense units must be >= 0, got {self.dense_units}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}, got {self.pooling!r}"),
            (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (1 <= self.tta_views <= MAX_AUGMENT, f"TTA views must be between 1 and {MAX_AUGMENT}, got {self.tta_views}"),
            (self.colour in COLOUR_MODES, f"colour must be one of {COLOUR_MODES}, got {self.colour!r}"),
            (0 < self.val_fraction < 1, f"validation fraction must be in (0, 1), got {self.val_fraction}"),
            (0 < self.test_fraction < 1, f"test fraction must be in (0, 1), got {self.test_fraction}"),
            (self.val_fraction + self.test_fraction < 0.9, "validation + test fractions must be < 0.9"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def is_scratch(self) -> bool:
        return self.backbone == SCRATCH

    @classmethod
    def for_backbone(cls, backbone: str, **overrides) -> "TrainConfig":
        """A config with the backbone's sensible defaults; ``None`` overrides are ignored.

        With pretrained weights the recipe is: augmentation x8 (flips, 90-degree turns and mild
        jitter) cached through the frozen backbone, a dense head, and predictions averaged over 8
        augmented views (test-time augmentation). A scratch CNN trains end to end on smaller images
        for longer.
        """
        spec = get_backbone(backbone)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        defaults: dict = {"image_size": spec.native_size}
        pretrained = overrides.get("weights") not in (None, "none", "None")
        if spec.name == SCRATCH:
            defaults.update(epochs=60, patience=10, learning_rate=1e-3, dense_units=128)
        elif pretrained:
            defaults.update(augment=AugmentConfig(factor=8), tta_views=8)
        else:
            defaults.update(augment=AugmentConfig(factor=4))
        aug = overrides.pop("augment", None)
        if isinstance(aug, int):
            aug = dataclasses.replace(defaults.get("augment", AugmentConfig()), factor=aug)
        if aug is not None:
            defaults["augment"] = aug
        defaults.update(overrides)
        return cls(backbone=spec.name, **defaults)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        return cls(**data)
