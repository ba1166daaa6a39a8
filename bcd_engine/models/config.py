"""Training configuration: one frozen, validated dataclass stored with every run."""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any

from bcd_engine.data.colour import COLOUR_MODES
from bcd_engine.data.regions import AUTO_REGIONS, NO_REGIONS, check_mask_setting
from bcd_engine.data.splits import DEFAULT_FRACTION, check_fractions
from bcd_engine.errors import ConfigError
from bcd_engine.models.backbones import POOLINGS, BackboneSpec, get_backbone, require_weights_file, resolve_weights

OPTIMIZERS = ("adam", "sgd", "rmsprop")
MAX_AUGMENT = 20
MAX_IMAGE_SIZE = 1024  # pixels a side; larger inputs would not fit a batch in memory, and no backbone needs them
# The weights recipe of a pretrained backbone: augmented views per training image, test-time views and the label
# smoothing of the head's loss when it starts from pretrained weights (ImageNet or a file), and augmented views when
# it starts from random weights. Until issue 27 pretrained weights took 8 and 8 views: about 12 minutes for ResNet50
# on the ALL dataset on a 2-core CPU, most of it pushing views through the frozen backbone, for the accuracy that 4
# and 1 reach (BENCHMARKS.md, 2d). Label smoothing 0.1 about halved the head's errors under cross-validation of
# ResNet50's cached ALL features (27.3 -> 14.3 of 2,767, mean of three seeds) at no cost in time (BENCHMARKS.md, 14c).
PRETRAINED_VIEWS = 4
PRETRAINED_TTA_VIEWS = 1
PRETRAINED_LABEL_SMOOTHING = 0.1
RANDOM_START_VIEWS = 4
_BACKBONE_DEFAULT_HELP = "default: the backbone's, as `backbones --json` lists it"
_AUGMENT_DEFAULT_HELP = (
    f"{PRETRAINED_VIEWS} from pretrained weights, {RANDOM_START_VIEWS} from random ones, 1 for the scratch CNN"
)
_TTA_DEFAULT_HELP = f"{PRETRAINED_TTA_VIEWS} from pretrained weights, else 1"
_SMOOTHING_DEFAULT_HELP = f"{PRETRAINED_LABEL_SMOOTHING} from pretrained weights, else 0"


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


def setting(default: Any = MISSING, *, help: str, default_factory: Any = MISSING, **cli: Any) -> Any:
    """A :class:`TrainConfig` field with what the command line shows for it.

    ``help`` may name ``{default}``; ``cli`` holds argparse extras: ``choices``, ``type`` (when the
    flag's type is not the field's) or ``cli=False`` for a field that is no command-line option.
    """
    return field(default=default, default_factory=default_factory, metadata={"help": help, **cli})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. ``TrainConfig.for_backbone`` fills per-backbone defaults.

    A config is a record: building one (and :meth:`from_dict`, reading a stored one) checks its values but
    never the disk, so a finished run whose weights file is gone still loads. :meth:`for_backbone`, the
    constructor for a new request, also checks that a weights file it names exists.

    Each field is a ``train``, ``cv`` and ``lodo`` option of the CLI (``--fine-tune-epochs`` for
    ``fine_tune_epochs``) with the help and choices of its metadata, unless that says ``cli=False``
    (:func:`setting`).
    """

    backbone: str = setting(help="backbone name (see the backbones command)")
    weights: str | None = setting(None, help="imagenet, none or a path to a .weights.h5 file (default: none)")
    image_size: int = setting(224, help="input size in pixels (default: the backbone's native size)")
    batch_size: int = setting(32, help="images per training batch (default {default})")
    epochs: int = setting(
        40, help=f"phase-1 epochs (head on the frozen backbone, or the whole scratch CNN; {_BACKBONE_DEFAULT_HELP})"
    )
    fine_tune_epochs: int = setting(
        0, help="phase-2 epochs with the top layers unfrozen (default {default}: no phase 2)"
    )
    fine_tune_layers: int = setting(
        0, help=f"number of top backbone layers to unfreeze in phase 2 ({_BACKBONE_DEFAULT_HELP})"
    )
    learning_rate: float = setting(1e-3, help="phase-1 learning rate (default {default})")
    fine_tune_learning_rate: float = setting(1e-5, help="phase-2 learning rate (default {default})")
    optimizer: str = setting("adam", help="optimizer of both phases (default {default})", choices=OPTIMIZERS)
    label_smoothing: float = setting(
        0.0, help=f"label smoothing of the loss, in [0, 1) (default: {_SMOOTHING_DEFAULT_HELP})"
    )
    class_weights: bool = setting(False, help="weight classes by frequency")
    dense_units: int = setting(256, help=f"units of the head's dense layer (0: none; {_BACKBONE_DEFAULT_HELP})")
    # No CLI option: a name Keras does not know would only fail once the head is built.
    dense_activation: str = setting("relu", help="activation of the head's dense layer", cli=False)
    dropout: float = setting(0.3, help="dropout before the head's softmax, in [0, 1) (default {default})")
    pooling: str = setting("avg", help="pooling of the backbone's feature map (default {default})", choices=POOLINGS)
    patience: int = setting(
        6, help=f"early-stopping patience on validation loss (best weights restored; {_BACKBONE_DEFAULT_HELP})"
    )
    augment: AugmentConfig = setting(  # noqa: RUF009 (a field, its default made fresh per instance)
        default_factory=AugmentConfig,
        type=int,
        help=f"augmented views per training image, 1 to {MAX_AUGMENT} (default: {_AUGMENT_DEFAULT_HELP})",
    )
    tta_views: int = setting(
        1,
        help=f"test-time augmentation: average over this many views (1: off; default: {_TTA_DEFAULT_HELP})",
    )
    colour: str = setting(
        "rgb",
        choices=COLOUR_MODES,
        help="grayscale: train and predict on grayscale images, so stain colour is no shortcut (default {default})",
    )
    mask_regions: str = setting(
        AUTO_REGIONS,
        help="regions painted over in the image's median colour wherever the run sees an image (training, test, "
        "predict, Diagnose): auto (those the dataset audit flags or the dataset's regions.json declares; a run "
        "records what it masked), none, or boxes x0,y0,x1,y1 in fractions (pixels with @WxH), ';' between boxes "
        "(default {default})",
    )
    val_fraction: float = setting(DEFAULT_FRACTION, help="fraction of the images for validation (default {default})")
    test_fraction: float = setting(DEFAULT_FRACTION, help="fraction of the images for testing (default {default})")
    seed: int = setting(0, help="seed of the split, the initial weights and the augmentation (default {default})")

    def __post_init__(self):
        spec = get_backbone(self.backbone)
        object.__setattr__(self, "backbone", spec.name)
        object.__setattr__(self, "weights", resolve_weights(spec, self.weights))
        if isinstance(self.augment, dict):
            object.__setattr__(self, "augment", AugmentConfig(**self.augment))
        spec.check_image_size(self.image_size)
        check_fractions(self.val_fraction, self.test_fraction)  # the splitter's own rule, checked here up front
        object.__setattr__(self, "mask_regions", check_mask_setting(self.mask_regions))  # canonical text
        checks = [
            (
                self.image_size <= MAX_IMAGE_SIZE,
                f"image size must be at most {MAX_IMAGE_SIZE} px, got {self.image_size}",
            ),
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
            (
                1 <= self.tta_views <= MAX_AUGMENT,
                f"TTA views must be between 1 and {MAX_AUGMENT}, got {self.tta_views}",
            ),
            (self.colour in COLOUR_MODES, f"colour must be one of {COLOUR_MODES}, got {self.colour!r}"),
            (
                self.val_fraction > 0 and self.test_fraction > 0,  # early stopping and the evaluation need both
                f"a run needs validation and test images: val_fraction and test_fraction must be above 0, got "
                f"{self.val_fraction} and {self.test_fraction}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def for_backbone(cls, backbone: str, **overrides) -> TrainConfig:
        """A new run's config: the backbone's defaults under the ``overrides`` given.

        ``None`` overrides are ignored (an option left unset), so every default comes from here: the
        backbone's registry row (:meth:`BackboneSpec.training_defaults`: input size, layers unfrozen in
        phase 2, epochs, patience, head size), then :func:`weights_recipe` (augmentation and test-time
        views by where a pretrained backbone starts). ``augment`` may be the augmentation factor alone.
        Asking a pretrained backbone for phase-2 epochs with no layers to unfreeze, and a weights file that
        is not there, are refused with ConfigError.
        """
        spec = get_backbone(backbone)
        given = {name: value for name, value in overrides.items() if value is not None}
        defaults = {**spec.training_defaults(), **weights_recipe(spec, given.get("weights"))}
        if isinstance(given.get("augment"), int):
            given["augment"] = dataclasses.replace(defaults.get("augment", AugmentConfig()), factor=given["augment"])
        config = cls(backbone=spec.name, **{**defaults, **given})
        if spec.pretrained and config.fine_tune_epochs and not config.fine_tune_layers:
            raise ConfigError(
                f"{config.fine_tune_epochs} fine-tune epochs with 0 fine-tune layers would train "
                f"nothing in phase 2; unfreeze some ({spec.name}'s default: {spec.fine_tune_layers})"
            )
        require_weights_file(config.weights)
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return cls(**{"mask_regions": NO_REGIONS, **data})  # a config stored before the option masked nothing


def weights_recipe(spec: BackboneSpec, weights: str | None) -> dict[str, Any]:
    """Augmentation, test-time-augmentation and label-smoothing defaults by where ``spec`` starts from ``weights``.

    A pretrained backbone from pretrained weights (ImageNet or a file): augmentation x PRETRAINED_VIEWS (flips,
    90-degree turns and mild jitter) cached through the frozen backbone, predictions averaged over
    PRETRAINED_TTA_VIEWS views, the head's loss smoothed by PRETRAINED_LABEL_SMOOTHING; from random weights:
    augmentation x RANDOM_START_VIEWS. The scratch CNN trains end to end: none of them.
    """
    if not spec.pretrained:
        return {}
    if resolve_weights(spec, weights) is None:
        return {"augment": AugmentConfig(factor=RANDOM_START_VIEWS)}
    return {
        "augment": AugmentConfig(factor=PRETRAINED_VIEWS),
        "tta_views": PRETRAINED_TTA_VIEWS,
        "label_smoothing": PRETRAINED_LABEL_SMOOTHING,
    }
