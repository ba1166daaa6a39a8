"""Grad-CAM (Selvaraju et al., ICCV 2017): where in an image a run's model looks for a class.

The engine computes the heatmap as an array; drawing it is the caller's job (``overlay`` blends it
onto the image for the CLI and the pages). The target layer is the backbone's last convolutional
layer from the registry, inside the nested backbone model that :func:`bcd_engine.models.head.assemble_model` builds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from bcd_engine.errors import ConfigError
from bcd_engine.models.backbones import get_backbone
from bcd_engine.models.backend import cached_for, forward_function, value_and_gradient

if TYPE_CHECKING:
    from bcd_engine.inference.loading import LoadedModel

DEFAULT_OPACITY = 0.45  # of the heatmap over the image in an overlay
BORDER_BAND = 0.12  # the image's border: the outer 12% of its width and height on every side
LABEL_CORNER = 0.25  # the bottom-right quarter of the width and height, where microscopes put a scale-bar label
MOSTLY = 0.5  # a region holding at least this share of the heat gets a note


@dataclass(frozen=True)
class GradCam:
    """A Grad-CAM result: ``heatmap`` float32 (h, w) in [0, 1] at the image's size, for ``class_index``.

    The heatmap is all zeros when no location raises the class score.
    """

    heatmap: np.ndarray
    class_index: int
    probabilities: np.ndarray  # the model's class probabilities for the image (no test-time augmentation)


def grad_cam(model, image: np.ndarray, *, preprocess, backbone: str, class_index: int | None = None) -> GradCam:
    """Grad-CAM of ``image`` (uint8 (h, w, 3) at the model's input size) for ``class_index`` (default: predicted);
    ``backbone`` is the registry name of the model's backbone (whose last convolution layer is used).

    The class score is the pre-softmax logit when the model ends in a softmax Dense layer, so a
    confident prediction does not saturate the gradients. The forward pass is compiled once per model.
    """
    image = np.asarray(image)
    expected = tuple(model.input_shape[1:3])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or image.shape[:2] != expected:
        raise ConfigError(f"expected a uint8 RGB image of shape {(*expected, 3)}, got {image.dtype} {image.shape}")
    n_classes = int(model.output_shape[-1])
    if class_index is not None and not 0 <= class_index < n_classes:
        raise ConfigError(f"class index must be in 0..{n_classes - 1}, got {class_index}")
    compute = _cam_function(model, preprocess, get_backbone(backbone).last_conv_layer)
    heatmap, probabilities, chosen = compute(image[None], class_index)
    peak = float(np.max(heatmap))
    heatmap = heatmap / peak if peak > 0 else np.zeros_like(heatmap)
    return GradCam(np.clip(heatmap, 0, 1).astype(np.float32), int(chosen), np.asarray(probabilities, np.float32))


def _cam_function(model, preprocess, conv_name: str):
    """(image (1, h, w, 3) uint8, class index or None for the predicted one) -> (heatmap, probabilities, class index),
    made once per (model, preprocess, conv layer) and kept while the model lives (:func:`cached_for`)."""
    return cached_for(
        model, ("grad-cam", preprocess, conv_name), lambda: _make_cam_function(model, preprocess, conv_name)
    )


def _make_cam_function(model, preprocess, conv_name: str):
    """The Grad-CAM function of :func:`_cam_function`, holding the model's layers but not the model itself.

    The forward pass to the convolutional layer is compiled (:func:`forward_function`); the gradient of the
    class score through the few layers after it is taken by the backend's own mechanism.
    """
    from keras import ops

    to_conv, after = _split_at_conv(model, conv_name)
    forward = forward_function(to_conv, preprocess)
    size = tuple(model.input_shape[1:3])

    def compute(image, class_index):
        conv = np.asarray(forward(image), dtype=np.float32)
        probabilities = _apply_tail(after, ops.convert_to_tensor(conv))[1]
        probabilities = ops.convert_to_numpy(probabilities)[0].astype(np.float32)
        chosen = int(np.argmax(probabilities)) if class_index is None else int(class_index)
        _, grads = value_and_gradient(lambda x: _apply_tail(after, x)[0][0, chosen], conv)
        cam = np.maximum(np.sum(conv[0] * np.mean(grads[0], axis=(0, 1)), axis=-1), 0)
        heatmap = ops.convert_to_numpy(ops.image.resize(cam[None, ..., None], size, interpolation="bilinear"))
        return heatmap[0, ..., 0], probabilities, chosen

    return compute


def _split_at_conv(model, conv_name: str):
    """(backbone input -> conv activations, the layers after the conv layer in call order).

    Keras 3 cannot reach a nested model's inner layer from the outer model's inputs, so the backbone
    is re-entered as a model ending at the conv layer; after it come the backbone's remaining layers (a
    chain in every registered backbone: none, or one pooling layer) and the layers after the backbone.
    """
    import keras

    for position, layer in enumerate(model.layers):
        if isinstance(layer, keras.Model) and any(inner.name == conv_name for inner in layer.layers):
            names = [inner.name for inner in layer.layers]
            to_conv = keras.Model(layer.inputs, layer.get_layer(conv_name).output)
            return to_conv, layer.layers[names.index(conv_name) + 1 :] + model.layers[position + 1 :]
    raise ConfigError(f"model {model.name!r} has no nested backbone with layer {conv_name!r}")


def _apply_tail(layers, x):
    """Logits and probabilities from the backbone's output through the (chained) layers after it."""
    import keras

    flat = [inner for layer in layers for inner in (_chain(layer) if isinstance(layer, keras.Model) else [layer])]
    for layer in flat[:-1]:
        x = layer(x, training=False)
    last = flat[-1]
    if isinstance(last, keras.layers.Dense) and getattr(last.activation, "__name__", "") == "softmax":
        logits = keras.ops.matmul(keras.ops.cast(x, "float32"), keras.ops.cast(last.kernel, "float32"))
        if last.use_bias:
            logits = logits + keras.ops.cast(last.bias, "float32")
        return logits, keras.ops.softmax(logits)
    out = last(x, training=False)
    return out, out


def _chain(model) -> list:
    """A nested model's layers in call order, without its input layer."""
    import keras

    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def overlay(image: np.ndarray, heatmap: np.ndarray, *, opacity: float = DEFAULT_OPACITY) -> np.ndarray:
    """Blend a jet-coloured ``heatmap`` onto ``image`` (uint8 RGB); the heatmap is resized to the image if needed."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ConfigError(f"expected a uint8 RGB image (h, w, 3), got {image.dtype} {image.shape}")
    if not 0 <= opacity <= 1:
        raise ConfigError(f"opacity must be in [0, 1], got {opacity}")
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0, 1)
    if heat.shape != image.shape[:2]:
        from PIL import Image

        heat = np.asarray(Image.fromarray(heat, mode="F").resize(image.shape[1::-1], Image.Resampling.BILINEAR))
    colours = jet(heat) * 255.0
    return np.clip(np.rint((1 - opacity) * image + opacity * colours), 0, 255).astype(np.uint8)


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colormap: values in [0, 1] -> float RGB in [0, 1] (dark blue, cyan, yellow, dark red)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0, 1)[..., None]
    return np.clip(1.5 - np.abs(4 * v - np.array([3, 2, 1], dtype=np.float32)), 0, 1)


class Box(Protocol):
    """A box in fractions of an image's width (x) and height (y), origin top-left, with a name (a run's masked or
    flagged region, as :class:`bcd_engine.data.regions.Region` is)."""

    x0: float
    y0: float
    x1: float
    y1: float
    name: str


@dataclass(frozen=True)
class RegionHeat:
    """The share of a heatmap's heat in one region (``heat``) beside the share of the image it covers (``area``:
    what an even heatmap would put there)."""

    name: str
    heat: float
    area: float

    @property
    def mostly(self) -> bool:
        """Whether most of the heat lies there (and more than an even heatmap would put there)."""
        return self.heat >= MOSTLY and self.heat > self.area

    def to_dict(self) -> dict[str, float | str]:
        return {"name": self.name, "heat": self.heat, "area": self.area}


@dataclass(frozen=True)
class HeatShare:
    """Where a Grad-CAM's heat lies: on the image's border band, in the bottom-right label corner and in any
    regions asked about (a run's masked or flagged ones). All shares are 0 for an all-zero heatmap."""

    border: RegionHeat
    label_corner: RegionHeat
    regions: tuple[RegionHeat, ...] = ()

    @property
    def notes(self) -> list[str]:
        """A plain-words note for each region holding most of the heat (none when the heat lies inside)."""
        notes = []
        if self.border.mostly:
            notes.append(
                f"{self.border.heat:.0%} of the heat lies on the image's border (the outer {BORDER_BAND:.0%} on each "
                f"side, {self.border.area:.0%} of the image), not on the cell in the middle: the model may be "
                "reading the frame, a label or the slide's edge instead of the cell."
            )
        if self.label_corner.mostly:
            notes.append(
                f"{self.label_corner.heat:.0%} of the heat lies in the bottom-right corner "
                f"({self.label_corner.area:.0%} of the image), where microscope images often carry a scale-bar "
                "label: the model may have learnt the label rather than the cell."
            )
        notes += [
            f"{region.heat:.0%} of the heat lies on {region.name} ({region.area:.0%} of the image), a region the "
            "model should not learn from."
            for region in self.regions
            if region.mostly
        ]
        return notes

    def to_dict(self) -> dict:
        return {
            "border": self.border.to_dict(),
            "label_corner": self.label_corner.to_dict(),
            "regions": [region.to_dict() for region in self.regions],
        }


def heat_share(heatmap: np.ndarray, *, regions: Sequence[Box] = ()) -> HeatShare:
    """Where the heat of ``heatmap`` (h, w), values >= 0, lies: its share on the border band (:data:`BORDER_BAND`),
    in the bottom-right corner (:data:`LABEL_CORNER`) and in each of ``regions``.

    >>> heat = np.zeros((100, 100)); heat[:5] = 1  # a hot top edge
    >>> heat_share(heat).border.heat
    1.0
    """
    heat = np.clip(np.asarray(heatmap, dtype=np.float64), 0, None)
    if heat.ndim != 2 or not heat.size:
        raise ConfigError(f"expected a 2-D heatmap, got shape {heat.shape}")
    height, width = heat.shape
    total = float(heat.sum())
    border = np.ones_like(heat, dtype=bool)
    band_y, band_x = round(height * BORDER_BAND), round(width * BORDER_BAND)
    border[band_y : height - band_y, band_x : width - band_x] = False
    corner = np.zeros_like(border)
    corner[height - round(height * LABEL_CORNER) :, width - round(width * LABEL_CORNER) :] = True

    def share(name: str, mask: np.ndarray) -> RegionHeat:
        return RegionHeat(name, float(heat[mask].sum()) / total if total > 0 else 0.0, float(mask.mean()))

    def box_mask(box: Box) -> np.ndarray:
        mask = np.zeros_like(border)
        rows = slice(
            int(np.floor(box.y0 * height)), max(int(np.floor(box.y0 * height)) + 1, int(np.ceil(box.y1 * height)))
        )
        cols = slice(
            int(np.floor(box.x0 * width)), max(int(np.floor(box.x0 * width)) + 1, int(np.ceil(box.x1 * width)))
        )
        mask[rows, cols] = True
        return mask

    return HeatShare(
        share("the border", border),
        share("the bottom-right corner", corner),
        tuple(share(box.name or "a masked region", box_mask(box)) for box in regions),
    )


def explain_image(loaded: LoadedModel, image: np.ndarray, *, class_index: int | None = None) -> GradCam:
    """Grad-CAM of a loaded run for a uint8 image at its input size, seen as the run sees it (colour mode, masks)."""
    from bcd_engine.data.regions import prepare_for_model

    seen = prepare_for_model(np.asarray(image)[None], loaded.config)[0]
    return grad_cam(
        loaded.model, seen, preprocess=loaded.preprocess(), backbone=loaded.config.backbone, class_index=class_index
    )


def explain_source(
    loaded: LoadedModel, image_path_or_bytes: str | os.PathLike[str] | bytes, *, class_index: int | None = None
) -> tuple[np.ndarray, GradCam]:
    """An image file (or its bytes) at the run's input size, and its Grad-CAM; the image is returned unchanged RGB."""
    from bcd_engine.data.images import load_image

    image = load_image(image_path_or_bytes, image_size=loaded.config.image_size)
    return image, explain_image(loaded, image, class_index=class_index)
