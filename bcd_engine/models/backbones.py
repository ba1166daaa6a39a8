"""The backbone registry: one table of data, one generic builder.

Each entry names the Keras application (or bcd's own architecture), its preprocessing mode, its native
and minimum input size, the figures Keras documents for it (parameters and depth of the full ImageNet
model), the last convolutional layer (for Grad-CAM), its published ImageNet weights file, a one-line
description and the training defaults that are its own (input size, layers unfrozen in phase 2, epochs,
patience, head size: :meth:`BackboneSpec.training_defaults`). ``scratch_cnn`` is the thesis' baseline, one
more row: a small CNN of bcd's own, trained from random initialisation end to end (it has no ImageNet
weights, so nothing is cached through it frozen).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bcd_engine.errors import ConfigError

SCRATCH = "scratch_cnn"
POOLINGS = ("avg", "max")  # global pooling of the backbone's last feature map
# keras.applications preprocessing modes as x = (rgb[..., channels] / divisor - mean) / std, with a description.
PREPROCESSING_MODES: dict[str, tuple[list[int], float, list[float], list[float], str]] = {
    "caffe": (
        [2, 1, 0],
        1.0,
        [103.939, 116.779, 123.68],
        [1.0, 1.0, 1.0],
        "RGB to BGR, then the ImageNet channel means subtracted (no scaling)",
    ),
    "tf": ([0, 1, 2], 127.5, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], "scaled to [-1, 1]"),
    "torch": (
        [0, 1, 2],
        255.0,
        [0.485, 0.456, 0.406],
        [0.229, 0.224, 0.225],
        "scaled to [0, 1], then normalised with the ImageNet channel means and standard deviations",
    ),
    "passthrough": (
        [0, 1, 2],
        1.0,
        [0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0],
        "unchanged 0..255 values (the network rescales inside)",
    ),
    "unit": ([0, 1, 2], 255.0, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], "scaled to [0, 1]"),
}


@dataclass(frozen=True)
class BackboneSpec:
    """What bcd knows about one backbone."""

    name: str
    module: str  # keras.applications submodule with the builder and preprocess_input; "" for bcd's own
    builder: str  # builder function in that module (or in bcd's own architectures)
    preprocessing: str  # a key of PREPROCESSING_MODES
    native_size: int
    min_size: int
    params_millions: float  # full ImageNet model, as documented by Keras
    depth: int  # as documented by Keras
    year: int
    paper: str
    last_conv_layer: str
    weights_file: str  # Keras' file name for the no-top ImageNet weights; "" when there are none
    description: str
    fine_tune_layers: int  # default K for phase 2 (top layers unfrozen)
    # Phase-1 length and head a run of it gets unless told otherwise: the transfer-learning recipe by default.
    epochs: int = 40
    patience: int = 6  # early-stopping patience on validation loss
    dense_units: int = 256
    # Billions of multiply-adds per image at the native size, as the papers report them ("FLOPs"): what the
    # time estimate scales a rate measured with another backbone by (bcd_engine.training.estimate).
    gflops: float = 1.0

    def training_defaults(self) -> dict[str, int]:
        """The :class:`~bcd_engine.models.config.TrainConfig` values this row decides for a new run."""
        return {
            "image_size": self.native_size,
            "fine_tune_layers": self.fine_tune_layers,
            "epochs": self.epochs,
            "patience": self.patience,
            "dense_units": self.dense_units,
        }

    @property
    def pretrained(self) -> bool:
        """Whether ImageNet weights exist for it (transfer learning); False for a network trained from scratch."""
        return bool(self.weights_file)

    def preprocess(self) -> Callable:
        """The backbone's own ``preprocess_input`` (expects float RGB in 0..255)."""
        if not self.module:
            return _rescale_unit
        import keras

        return getattr(keras.applications, self.module).preprocess_input

    def check_image_size(self, image_size: int) -> None:
        """ConfigError when ``image_size`` is below the backbone's minimum input size."""
        if image_size < self.min_size:
            raise ConfigError(f"image size {image_size} is below {self.name}'s minimum of {self.min_size} px")


def _rescale_unit(x):
    return x / 255.0


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "xception",
            "xception",
            "Xception",
            "tf",
            299,
            71,
            22.9,
            81,
            2017,
            "Chollet, Xception: Deep Learning with Depthwise Separable Convolutions (CVPR 2017)",
            "block14_sepconv2_act",
            "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "Inception modules replaced by depthwise-separable convolutions.",
            30,
            gflops=8.4,
        ),
        BackboneSpec(
            "vgg16",
            "vgg16",
            "VGG16",
            "caffe",
            224,
            32,
            138.4,
            16,
            2014,
            "Simonyan & Zisserman, Very Deep Convolutional Networks (ICLR 2015)",
            "block5_conv3",
            "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "Plain stack of 3x3 convolutions; the thesis' best model (94%).",
            4,
            gflops=15.5,
        ),
        BackboneSpec(
            "vgg19",
            "vgg19",
            "VGG19",
            "caffe",
            224,
            32,
            143.7,
            19,
            2014,
            "Simonyan & Zisserman, Very Deep Convolutional Networks (ICLR 2015)",
            "block5_conv4",
            "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "VGG16 with three more convolution layers.",
            5,
            gflops=19.6,
        ),
        BackboneSpec(
            "resnet50",
            "resnet50",
            "ResNet50",
            "caffe",
            224,
            32,
            25.6,
            107,
            2015,
            "He et al., Deep Residual Learning for Image Recognition (CVPR 2016)",
            "conv5_block3_out",
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "50-layer residual network with bottleneck blocks.",
            33,
            gflops=4.1,
        ),
        BackboneSpec(
            "resnet101",
            "resnet",
            "ResNet101",
            "caffe",
            224,
            32,
            44.7,
            209,
            2015,
            "He et al., Deep Residual Learning for Image Recognition (CVPR 2016)",
            "conv5_block3_out",
            "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "Deeper ResNet: 101 layers.",
            33,
            gflops=7.8,
        ),
        BackboneSpec(
            "inceptionv3",
            "inception_v3",
            "InceptionV3",
            "tf",
            299,
            75,
            23.9,
            189,
            2015,
            "Szegedy et al., Rethinking the Inception Architecture (CVPR 2016)",
            "mixed10",
            "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "Parallel convolution branches of several sizes, factorised kernels.",
            31,
            gflops=5.7,
        ),
        BackboneSpec(
            "mobilenetv2",
            "mobilenet_v2",
            "MobileNetV2",
            "tf",
            224,
            32,
            3.5,
            105,
            2018,
            "Sandler et al., MobileNetV2: Inverted Residuals and Linear Bottlenecks (CVPR 2018)",
            "out_relu",
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
            "Light network of inverted residual blocks, made for phones.",
            20,
            gflops=0.3,
        ),
        BackboneSpec(
            "densenet121",
            "densenet",
            "DenseNet121",
            "torch",
            224,
            32,
            8.1,
            242,
            2017,
            "Huang et al., Densely Connected Convolutional Networks (CVPR 2017)",
            "relu",
            "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "Each layer receives the feature maps of all earlier layers in its block.",
            30,
            gflops=2.9,
        ),
        BackboneSpec(
            "efficientnetb0",
            "efficientnet",
            "EfficientNetB0",
            "passthrough",
            224,
            32,
            5.3,
            132,
            2019,
            "Tan & Le, EfficientNet: Rethinking Model Scaling (ICML 2019)",
            "top_activation",
            "efficientnetb0_notop.h5",
            "Compound-scaled mobile blocks with squeeze-and-excitation.",
            20,
            gflops=0.39,
        ),
        BackboneSpec(
            SCRATCH,
            "",
            "scratch_cnn",
            "unit",
            128,
            32,
            0.4,
            8,
            2026,
            "bcd baseline: a small CNN trained from scratch (the thesis' baseline model)",
            "scratch_conv4_out",
            "",
            "Four conv blocks trained from random initialisation; no transfer learning.",
            0,
            epochs=60,
            patience=10,
            dense_units=128,
            gflops=0.24,
        ),
    )
}


def get_backbone(name: str) -> BackboneSpec:
    """Look a backbone up by name (case-insensitive); unknown names raise ConfigError listing the known ones."""
    spec = BACKBONES.get(name.lower().replace("-", ""))
    if spec is None:
        raise ConfigError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    return spec


def resolve_weights(spec: BackboneSpec, weights: str | None) -> str | None:
    """Normalise a weights option without touching the disk: 'imagenet', None (random init) or an absolute
    path ending in ``.h5`` (a ``.weights.h5`` or ``.h5`` file; whether it exists is :func:`require_weights_file`'s
    to say, where the file is used)."""
    if weights is None or str(weights).lower() in ("none", ""):
        return None
    if str(weights).lower() == "imagenet":
        if not spec.pretrained:
            raise ConfigError(f"{spec.name} has no ImageNet weights; use --weights none")
        return "imagenet"
    path = os.path.abspath(Path(weights).expanduser())
    if not path.endswith(".h5"):
        raise ConfigError(f"weights file must be a Keras .weights.h5 or .h5 file: {path}")
    return path


def require_weights_file(weights: str | None) -> None:
    """ConfigError when ``weights`` names a file that is not there (checked where the file is about to be used:
    building a backbone to train, queueing a run; a finished run's model holds its weights and never needs it)."""
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise ConfigError(f"weights file not found: {weights}")


def weights_files(folder: str | os.PathLike) -> list[Path]:
    """The Keras weights files (``*.h5``) directly in ``folder``, by name; none when it does not exist."""
    folder = Path(folder).expanduser()
    return sorted(p for p in folder.glob("*.h5") if p.is_file()) if folder.is_dir() else []


def offline_advice(spec: BackboneSpec) -> str:
    """What to do when ImageNet weights cannot be downloaded, in plain words."""
    return (
        f"Without internet, get {spec.weights_file} on a machine that has it (Keras downloads it from "
        f"https://storage.googleapis.com/tensorflow/keras-applications/), copy it to this machine's weights "
        f"folder (BCD_WEIGHTS_DIR, default weights/ in the project) and choose it under Weights on the Train "
        f"page, or pass --weights PATH on the command line"
    )


def build_backbone(spec: BackboneSpec, *, image_size: int, weights: str | None):
    """Build the convolutional part (no top, no pooling) at ``image_size`` with the given weights."""
    import keras

    spec.check_image_size(image_size)
    input_shape = (image_size, image_size, 3)
    if not spec.module:
        return _OWN_ARCHITECTURES[spec.builder](input_shape)
    require_weights_file(weights)
    builder = getattr(keras.applications, spec.builder)
    try:
        return builder(include_top=False, weights=weights, input_shape=input_shape)
    except Exception as exc:  # Keras raises many types for a failed download or a bad file
        if weights == "imagenet":
            raise ConfigError(
                f"could not download the ImageNet weights for {spec.builder} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). {offline_advice(spec)}"
            ) from exc
        raise ConfigError(f"could not load weights {weights} into {spec.builder}: {exc}") from exc


def _scratch_cnn(input_shape):
    import keras
    from keras import layers

    inputs = keras.Input(input_shape)
    x = inputs
    for i, filters in enumerate((32, 64, 128, 256)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"scratch_conv{i + 1}")(x)
        # Few steps per epoch on small datasets: a faster-moving average than the 0.99 default.
        x = layers.BatchNormalization(momentum=0.9, name=f"scratch_bn{i + 1}")(x)
        x = layers.Activation("relu", name=f"scratch_conv{i + 1}_act" if i < 3 else "scratch_conv4_out")(x)
        x = layers.MaxPooling2D(name=f"scratch_pool{i + 1}")(x)
    return keras.Model(inputs, x, name=SCRATCH)


_OWN_ARCHITECTURES = {"scratch_cnn": _scratch_cnn}  # BackboneSpec.builder of rows with no Keras module


def pooling_layer(pooling: str):
    """The global pooling layer (float32 output) that turns the backbone's feature map into one vector."""
    import keras

    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    layer = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
    return layer(name="pool", dtype="float32")


def preprocessing_info(backbone: str) -> dict[str, Any]:
    """How to turn an RGB image (float 0..255) into the model's input for ``backbone``, as plain data."""
    spec = get_backbone(backbone)
    channels, divisor, mean, std, description = PREPROCESSING_MODES[spec.preprocessing]
    return {
        "backbone": spec.name,
        "mode": spec.preprocessing,
        "keras_function": f"keras.applications.{spec.module}.preprocess_input" if spec.module else None,
        "description": description,
        "formula": "x = (rgb[..., channels] / divisor - mean) / std",
        "channels": channels,
        "divisor": divisor,
        "mean": mean,
        "std": std,
    }
