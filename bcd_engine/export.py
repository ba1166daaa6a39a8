"""Exporting a run's model for use outside bcd: ``.keras`` or TensorFlow Lite, with labels and a model card.

:func:`export_run` writes three files into a folder: the model (``model.keras`` or ``model.tflite``),
``labels.json`` (class names, input size and the exact preprocessing) and ``MODEL_CARD.md``
(:func:`model_card`: data, protocol, metrics with 95% confidence intervals, shortcut audit, intended
use and limitations). Only a file bcd saved and whose sha256 matches the run store is ever exported
(:func:`inference.run_model_file`): ``.keras`` is that very file, so its sha256 is the store's; TFLite
is converted from the model loaded through :func:`inference.load_run_model`. The model takes *preprocessed*
images: the backbone's ``preprocess_input`` is applied outside it, as ``labels.json`` describes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .backbones import SCRATCH, get_backbone
from .errors import ConfigError, StoreError
from .features import file_sha256
from .inference import load_run_model, run_model_file
from .store import EvaluationRecord, RunRecord, RunStore

FORMATS = ("keras", "tflite")
MODEL_CARD = "MODEL_CARD.md"
LABELS = "labels.json"
TFLITE_ATOL = 1e-4  # largest allowed probability difference, TFLite vs Keras, for float32 models
TFLITE_ATOL_MIXED = 1e-2  # ... for models trained in mixed precision (Keras computes in float16)
N_CHECK_IMAGES = 4
AUDIT_COMMAND = "python -m bcd_engine audit --data {data_dir}"

# keras.applications preprocessing modes, per BackboneSpec.module, as x = (rgb[..., channels] / divisor - mean) / std
_MODE_OF_MODULE = {
    "vgg16": "caffe", "vgg19": "caffe", "resnet50": "caffe", "resnet": "caffe",
    "xception": "tf", "inception_v3": "tf", "mobilenet_v2": "tf",
    "densenet": "torch", "efficientnet": "passthrough", "": "unit",
}
_MODES = {
    "caffe": ([2, 1, 0], 1.0, [103.939, 116.779, 123.68], [1.0, 1.0, 1.0],
              "RGB to BGR, then the ImageNet channel means subtracted (no scaling)"),
    "tf": ([0, 1, 2], 127.5, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], "scaled to [-1, 1]"),
    "torch": ([0, 1, 2], 255.0, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
              "scaled to [0, 1], then normalised with the ImageNet channel means and standard deviations"),
    "passthrough": ([0, 1, 2], 1.0, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0],
                    "unchanged 0..255 values (the network rescales inside)"),
    "unit": ([0, 1, 2], 255.0, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], "scaled to [0, 1]"),
}


@dataclass(frozen=True)
class ExportResult:
    """The files :func:`export_run` wrote, and how closely the TFLite model matched Keras."""

    run_id: int
    format: str
    model_path: Path
    labels_path: Path
    card_path: Path
    max_abs_diff: float | None  # TFLite vs Keras probabilities on the check images; None for .keras

    @property
    def paths(self) -> tuple[Path, Path, Path]:
        return self.model_path, self.labels_path, self.card_path


def preprocessing_info(backbone: str) -> dict[str, Any]:
    """How to turn an RGB image (float 0..255) into the model's input for ``backbone``, as plain data."""
    spec = get_backbone(backbone)
    mode = _MODE_OF_MODULE[spec.module]
    channels, divisor, mean, std, description = _MODES[mode]
    return {
        "backbone": spec.name,
        "mode": mode,
        "keras_function": None if spec.name == SCRATCH else f"keras.applications.{spec.module}.preprocess_input",
        "description": description,
        "formula": "x = (rgb[..., channels] / divisor - mean) / std",
        "channels": channels,
        "divisor": divisor,
        "mean": mean,
        "std": std,
    }


def labels_document(run: RunRecord, *, model_file: str) -> dict[str, Any]:
    """The content of ``labels.json``: class names in output order, input size and preprocessing."""
    train = run.config["train"]
    size = int(train["image_size"])
    return {
        "run_id": run.id,
        "model_file": model_file,
        "class_names": list(run.config["class_names"]),
        "image_size": size,
        "input": {
            "shape": [None, size, size, 3],
            "dtype": "float32",
            "resize": f"whole image, bilinear, to {size}x{size} (no crop), RGB 0..255",
            "colour_mode": train.get("colour", "rgb"),
            "colour": _colour_instruction(train.get("colour", "rgb")),
            "preprocessed": True,
        },
        "preprocessing": preprocessing_info(run.backbone),
        "output": "softmax probabilities, one per class, in class_names order",
        "tta_views_in_reported_metrics": int(train.get("tta_views", 1)),
    }


def _colour_instruction(mode: str) -> str:
    if mode == "grayscale":
        return ("convert to grayscale first (luminance 0.299 R + 0.587 G + 0.114 B, rounded, copied to all three "
                "channels): the model was trained on grayscale images only")
    return "keep the colours as they are"


def model_card(
    run: RunRecord,
    evaluations: list[EvaluationRecord],
    *,
    audit: dict | None = None,
    split: list[dict] | None = None,
    model_file: str = "model.keras",
    model_sha256: str | None = None,
    exported_on: date | None = None,
) -> str:
    """The model card of ``run`` as Markdown; a pure function of its arguments.

    ``audit`` is :func:`audit.audit_dataset`'s result (or its ``"shortcuts"`` part); ``split`` is
    :meth:`RunStore.get_split`'s rows. Without them the card says what was not given.
    """
    shortcuts, leakage = _audit_parts(audit)
    train = run.config["train"]
    data_dir = run.config.get("data_dir", "DIR")
    prep = preprocessing_info(run.backbone)
    test_metrics = next((e.metrics for e in evaluations if e.name == "test"), {})
    environment = run.environment or {}
    lines = [
        f"# Model card: bcd run {run.id} ({run.backbone})",
        "",
        "> Research and teaching use only. **Not a medical device.** Do not use it to diagnose, screen or treat "
        "anyone.",
        "",
        "## Model",
        "",
        f"- Run id: {run.id}",
        f"- Backbone: {run.backbone}; {get_backbone(run.backbone).paper}",
        f"- Weights before training: {_weights(train.get('weights'))}",
        f"- Image size: {train['image_size']} x {train['image_size']} RGB"
        + (" (grayscale content: trained on grayscale images)" if train.get("colour") == "grayscale" else ""),
        f"- Classes (output order): {', '.join(run.config['class_names'])}",
        f"- Parameters: {test_metrics['parameters']:,}" if "parameters" in test_metrics else "- Parameters: not stored",
        f"- Trained: {_day(run.finished_at)}; TensorFlow {environment.get('tensorflow', '?')}, "
        f"Keras {environment.get('keras', '?')}, {environment.get('device', 'device not recorded')}",
        f"- Recipe: {_recipe(train)}",
        f"- File: `{model_file}`" + (f" (sha256 `{model_sha256}`)" if model_sha256 else ""),
        f"- Exported: {_day(exported_on)}; bcd {__version__}",
        "",
        "## Input",
        "",
        f"The model expects **preprocessed** images, not raw pixels: resize the whole image (bilinear, no crop) to "
        f"{train['image_size']} x {train['image_size']} RGB with values 0..255 as float32; "
        f"{_colour_instruction(train.get('colour', 'rgb'))}; then apply the "
        f"{run.backbone} preprocessing ({prep['mode']}: {prep['description']})"
        + (f", i.e. `{prep['keras_function']}`" if prep["keras_function"] else "")
        + f". Without Keras: `{prep['formula']}` with channels {prep['channels']}, divisor {prep['divisor']}, "
        f"mean {prep['mean']}, std {prep['std']} (all in `labels.json`). The output is one softmax probability per "
        "class, in the order above.",
        "",
        "## Data and protocol",
        "",
        f"- Dataset folder: `{data_dir}`",
        f"- Protocol: {run.protocol}",
        f"- Split: {_split_sizes(split)}",
        f"- Duplicates: {_duplicate_handling(split)}",
        "- No patient identifiers: image-level split. The dataset has no patient ids, so fields of one patient "
        "can be on both sides of the split; the figures below are optimistic for that reason.",
        "",
        "## Metrics",
        "",
        "Point estimates with 95% bootstrap confidence intervals (1,000 resamples of the evaluated images); "
        "ECE is the top-label expected calibration error (15 bins).",
    ]
    if int(train.get("tta_views", 1)) > 1:
        lines += ["", f"Stored metrics average {train['tta_views']} test-time augmented views per image; the "
                      "exported model gives single-view probabilities, which can differ slightly."]
    for evaluation in evaluations:
        lines += _evaluation_section(evaluation)
    if not evaluations:
        lines += ["", "No evaluation is stored for this run."]
    lines += ["", "## Shortcut audit", ""]
    lines += _audit_lines(shortcuts, leakage, data_dir)
    lines += [
        "",
        "## Intended use",
        "",
        "Research and teaching: comparing transfer-learning backbones and evaluation protocols, and showing "
        "how shortcuts and leakage inflate test figures. Out of scope: any clinical use, including diagnosis, "
        "screening, triage or decisions about a patient.",
        "",
        "## Limitations",
        "",
        "- Not a medical device. It has no regulatory clearance and was not validated clinically.",
        "- Colour shortcut: in the ALL dataset the classes differ in stain colour, and colour statistics alone "
        "separate them almost perfectly. High accuracy does not show that the model reads cell morphology; "
        "expect it to fail on other stains, labs, microscopes or cameras.",
        "- No patient identifiers: image-level splits can put one patient's fields in training and test.",
        "- Small test sets give wide confidence intervals; read the intervals, not only the point estimates.",
        "- Performance outside the evaluated folders is unknown.",
        "",
        "## How to load it",
        "",
        "```python",
        *_load_snippet(model_file, prep),
        "```",
        "",
    ]
    return "\n".join(lines)


def to_tflite(model) -> bytes:
    """Convert a Keras 3 model to a TFLite flatbuffer (Keras SavedModel export, then TFLiteConverter).

    A model trained in mixed precision is first copied with float32 layers (same weights): TFLite's
    builtin kernels do not run float16 convolutions.
    """
    import tensorflow as tf

    source = _float32_copy(model) if _reduced_precision(model) else model
    with tempfile.TemporaryDirectory(prefix="bcd-tflite-") as tmp, contextlib.redirect_stdout(sys.stderr):
        source.export(tmp, format="tf_saved_model")
        return tf.lite.TFLiteConverter.from_saved_model(tmp).convert()


def tflite_probabilities(model: bytes | str | os.PathLike, images: np.ndarray) -> np.ndarray:
    """Run a TFLite model (bytes or file) on a batch of preprocessed float32 images."""
    content = model if isinstance(model, bytes) else Path(model).read_bytes()
    images = np.asarray(images, dtype=np.float32)
    interpreter = _interpreter(content)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], images)
    interpreter.invoke()
    return np.array(interpreter.get_tensor(out["index"]))


def export_run(
    run_id: int,
    *,
    format: str,
    out_dir: str | os.PathLike,
    store: RunStore | None = None,
    audit: dict | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export run ``run_id``'s verified model as ``.keras`` or ``.tflite`` with ``labels.json`` and ``MODEL_CARD.md``.

    ``out_dir`` is created if missing; existing files are only replaced with ``overwrite=True``. A TFLite
    export is checked against Keras on seeded random images before anything is written.
    """
    if format not in FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(FORMATS)}, got {format!r}")
    _audit_parts(audit)  # a malformed audit fails before any work
    out = Path(out_dir)
    model_path, labels_path, card_path = out / f"model.{format}", out / LABELS, out / MODEL_CARD
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export folder {out} exists and is not a folder")
    existing = [p.name for p in (model_path, labels_path, card_path) if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{', '.join(existing)} already exist in {out}; overwrite them with overwrite=True (CLI: --overwrite)")
    store = store or RunStore()
    run = store.get_run(run_id)
    content, max_diff = _checked_tflite(load_run_model(run_id, store=store)) if format == "tflite" else (None, None)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if content is None:  # the very file the run saved, so its sha256 is the one in the store
            source, recorded_sha256 = run_model_file(run_id, store=store)
            shutil.copyfile(source, model_path)
            model_sha256 = file_sha256(model_path)
            if model_sha256 != recorded_sha256:
                raise StoreError(f"model file of run {run_id} changed while it was exported; try again")
        else:
            model_path.write_bytes(content)
            model_sha256 = hashlib.sha256(content).hexdigest()
        labels_path.write_text(json.dumps(labels_document(run, model_file=model_path.name), indent=2) + "\n")
        card_path.write_text(model_card(
            run, store.get_evaluations(run_id), audit=audit, split=store.get_split(run_id),
            model_file=model_path.name, model_sha256=model_sha256,
            exported_on=datetime.now(timezone.utc).date(),
        ))
    except OSError as exc:
        raise ConfigError(f"cannot write the export to {out}: {exc.strerror or exc}") from exc
    return ExportResult(run_id, format, model_path, labels_path, card_path, max_diff)


def _checked_tflite(loaded) -> tuple[bytes, float]:
    """Convert, then compare TFLite with Keras on seeded random images; ConfigError when they disagree."""
    size = loaded.config.image_size
    try:
        content = to_tflite(loaded.model)
    except Exception as exc:  # the converter raises several types for unsupported graphs
        raise ConfigError(f"run {loaded.run_id}'s model cannot be converted to TFLite ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); export it as .keras") from exc
    rgb = np.random.default_rng(0).integers(0, 256, (N_CHECK_IMAGES, size, size, 3)).astype(np.float32)
    images = np.asarray(loaded.preprocess()(rgb), dtype=np.float32)
    expected = np.asarray(loaded.model.predict(images, verbose=0), dtype=np.float64)
    diff = float(np.abs(tflite_probabilities(content, images) - expected).max())
    atol = TFLITE_ATOL_MIXED if _reduced_precision(loaded.model) else TFLITE_ATOL
    if not diff <= atol:
        raise ConfigError(f"TFLite model of run {loaded.run_id} differs from Keras by {diff:.2g} "
                          f"(allowed {atol:g}); export it as .keras")
    return content, diff


def _layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)


def _reduced_precision(model) -> bool:
    return any(layer.dtype_policy.compute_dtype != "float32" for layer in _layers(model))


def _float32_copy(model):
    """The same model and weights with every layer computing in float32."""
    import keras

    def float32_layer(layer):
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=float32_layer, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def _interpreter(content: bytes):
    """LiteRT's interpreter when ``ai_edge_litert`` is installed, TensorFlow's otherwise."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated", category=UserWarning)
            return tf.lite.Interpreter(model_content=content)
    return Interpreter(model_content=content)


def _audit_parts(audit: dict | None) -> tuple[dict | None, dict | None]:
    """(shortcuts, leakage) from audit_dataset()'s result or shortcut_audit()'s; ConfigError otherwise."""
    if audit is None:
        return None, None
    shortcuts = audit.get("shortcuts", audit) if isinstance(audit, dict) else None
    needed = ("colour_only_accuracy", "corner_only_accuracy", "chance_accuracy")
    if not isinstance(shortcuts, dict) or any(key not in shortcuts for key in needed):
        raise ConfigError("audit must be the result of audit_dataset() or shortcut_audit() "
                          f"(with {', '.join(needed)})")
    return shortcuts, audit.get("leakage")


def _audit_lines(shortcuts: dict | None, leakage: dict | None, data_dir: str) -> list[str]:
    if shortcuts is None:
        return ["Not run for this export. Run it with `" + AUDIT_COMMAND.format(data_dir=data_dir) + "` and pass "
                "its result to `export_run(..., audit=...)` to include it here."]
    tested_on = f", tested on {shortcuts['n_test']} images" if "n_test" in shortcuts else ""
    lines = [
        f"A random forest on simple colour statistics (no morphology) on a group-aware hold-out split{tested_on}:",
        "",
        f"- Colour-only accuracy: {_pct(shortcuts['colour_only_accuracy'])}",
        f"- Corner-only accuracy (bottom-right {_pct(shortcuts.get('corner_fraction'))} patch): "
        f"{_pct(shortcuts['corner_only_accuracy'])}",
        f"- Chance accuracy (majority class): {_pct(shortcuts['chance_accuracy'])}",
    ]
    if "opposite_corner_accuracy" in shortcuts:
        lines.append(f"- Top-left corner control: {_pct(shortcuts['opposite_corner_accuracy'])}")
    if shortcuts.get("interpretation"):
        lines += ["", shortcuts["interpretation"]]
    if leakage is not None:
        verdict = ("no duplicate group crosses subsets." if leakage.get("ok")
                   else "duplicate groups cross subsets; test figures are inflated.")
        lines += ["", f"Leakage of the audit's split: {verdict}"]
    return lines


def _evaluation_section(evaluation: EvaluationRecord) -> list[str]:
    metrics = evaluation.metrics
    cis = metrics.get("confidence_intervals") or {}
    lines = [
        "",
        f"### {evaluation.name} ({metrics.get('n', '?')} images, {_day(evaluation.created_at)})",
        "",
        f"Data: `{evaluation.data_dir or 'not recorded'}`; classes: {', '.join(evaluation.class_names)}",
        "",
        "| metric | estimate | 95% CI |",
        "| --- | --- | --- |",
    ]
    for key, label in (("accuracy", "Accuracy"), ("macro_f1", "Macro F1"), ("macro_auc", "Macro AUC")):
        ci = cis.get(key) or {}
        interval = f"{_num(ci.get('low'))} – {_num(ci.get('high'))}" if ci.get("low") is not None else "n/a"
        lines.append(f"| {label} | {_num(metrics.get(key))} | {interval} |")
    lines.append(f"| ECE | {_num(metrics.get('ece'))} | |")
    per_class = metrics.get("per_class") or {}
    if per_class:
        lines += ["", "| class | precision | recall (sensitivity) | specificity | F1 | AUC | n |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {_num(c.get('precision'))} | {_num(c.get('recall'))} | {_num(c.get('specificity'))} "
                  f"| {_num(c.get('f1'))} | {_num(c.get('auc'))} | {c.get('support', '?')} |"
                  for name, c in per_class.items()]
    return lines


def _recipe(train: dict) -> str:
    text = f"up to {train['epochs']} epochs (early stopping)"
    if train["fine_tune_epochs"] and train["fine_tune_layers"]:
        text += f", then up to {train['fine_tune_epochs']} fine-tuning the top {train['fine_tune_layers']} layers"
    return (f"{text}; augmentation x{train['augment']['factor']}, optimizer {train['optimizer']}, "
            f"learning rate {train['learning_rate']}, seed {train['seed']}")


def _split_sizes(split: list[dict] | None) -> str:
    if not split:
        return "not stored"
    counts = Counter(row["subset"] for row in split)
    order = sorted(counts, key=lambda s: ({"train": 0, "val": 1, "test": 2}.get(s, 3), s))
    return ", ".join(f"{counts[s]} {s}" for s in order) + f" ({len(split)} images)"


def _duplicate_handling(split: list[dict] | None) -> str:
    if not split:
        return "split not stored"
    subsets = defaultdict(set)
    sizes = Counter()
    for row in split:
        if row.get("group_id") is not None:
            subsets[row["group_id"]].add(row["subset"])
            sizes[row["group_id"]] += 1
    groups = [g for g, n in sizes.items() if n > 1]
    if not groups:
        return "no exact or near-duplicate images in the split."
    crossing = sum(len(subsets[g]) > 1 for g in groups)
    text = (f"{len(groups)} group(s) of exact or near-duplicate images ({sum(sizes[g] for g in groups)} images); "
            "each group is kept on one side of the split")
    return text + ("." if not crossing else f", but {crossing} group(s) cross subsets: test figures are inflated.")


def _load_snippet(model_file: str, prep: dict) -> list[str]:
    tflite = model_file.endswith(".tflite")
    imports = (["from ai_edge_litert.interpreter import Interpreter  # or: from tensorflow.lite import Interpreter"]
               if tflite else ["import keras"])
    same = f"  # equals {prep['keras_function']}(rgb[None])" if prep["keras_function"] else ""
    lines = [
        "import json",
        "",
        *imports,
        "import numpy as np",
        "from PIL import Image",
        "",
        'labels = json.load(open("labels.json"))',
        'p, size = labels["preprocessing"], labels["image_size"]',
        'rgb = np.asarray(Image.open("smear.jpg").convert("RGB").resize((size, size), Image.BILINEAR), "float32")',
        'if labels["input"]["colour_mode"] == "grayscale":  # the model was trained on grayscale images',
        '    rgb = np.repeat(np.rint(rgb @ np.array([0.299, 0.587, 0.114], "float32"))[..., None], 3, axis=-1)',
        'x = (rgb[..., p["channels"]] / p["divisor"] - np.array(p["mean"])) / np.array(p["std"])',
        'x = x[None].astype("float32")' + same,
    ]
    if tflite:
        lines += [
            f'interpreter = Interpreter(model_path="{model_file}")',
            "interpreter.allocate_tensors()",
            "inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]",
            'interpreter.set_tensor(inp["index"], x)',
            "interpreter.invoke()",
            'probabilities = interpreter.get_tensor(out["index"])[0]',
        ]
    else:
        lines += [
            f'model = keras.models.load_model("{model_file}", compile=False)',
            "probabilities = model.predict(x)[0]",
        ]
    return [*lines, 'print(dict(zip(labels["class_names"], probabilities)))']


def _weights(weights: str | None) -> str:
    if weights is None:
        return "none (random initialisation)"
    return "ImageNet" if weights == "imagenet" else f"from file `{Path(weights).name}`"


def _day(value: datetime | date | None) -> str:
    return value.strftime("%Y-%m-%d") if value is not None else "not recorded"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"
