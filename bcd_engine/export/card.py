"""The model card (``MODEL_CARD.md``) of an exported run: data, protocol, metrics with 95% intervals,
shortcut audit, intended use and limitations, and how to load the model.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import date, datetime
from pathlib import Path

from bcd_engine.errors import ConfigError
from bcd_engine.evaluation.ood import HELD_OUT_BOUND_RULE
from bcd_engine.models.backbones import get_backbone, preprocessing_info
from bcd_engine.protocols.audit import DatasetAudit
from bcd_engine.protocols.occlusion import stored_occlusion
from bcd_engine.store import EvaluationRecord, RunRecord, latest_evaluation
from bcd_engine.version import __version__

MODEL_CARD = "MODEL_CARD.md"
AUDIT_COMMAND = "python -m bcd_engine audit --data {data_dir}"


def model_card(
    run: RunRecord,
    evaluations: list[EvaluationRecord],
    *,
    audit: DatasetAudit | dict | None = None,
    split: list[dict] | None = None,
    model_file: str = "model.keras",
    model_sha256: str | None = None,
    exported_on: date | None = None,
) -> str:
    """The model card of ``run`` as Markdown; a pure function of its arguments.

    ``audit`` is :func:`~bcd_engine.protocols.audit.audit_dataset`'s result (or its ``"shortcuts"`` part); ``split`` is
    :meth:`RunStore.get_split`'s rows. Without them the card says what was not given.
    """
    shortcuts, leakage = audit_parts(audit)
    train = run.config["train"]
    data_dir = run.config.get("data_dir", "DIR")
    prep = preprocessing_info(run.backbone)
    test = latest_evaluation(evaluations)
    test_metrics = test.metrics if test is not None else {}
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
        f"- Masked regions: {_masked_regions(run.config)}",
        f"- Parameters: {test_metrics['parameters']:,}" if "parameters" in test_metrics else "- Parameters: not stored",
        f"- Trained: {_day(run.finished_at)}; {_library(environment)}, "
        f"Keras {environment.get('keras', '?')}, {environment.get('device', 'device not recorded')}",
        f"- Recipe: {_recipe(train)}",
        f"- File: `{model_file}`" + (f" (sha256 `{model_sha256}`)" if model_sha256 else ""),
        f"- Exported: {_day(exported_on)}; bcd {__version__}",
        "",
        "## Input",
        "",
        f"The model expects **preprocessed** images, not raw pixels: resize the whole image (bilinear, no crop) to "
        f"{train['image_size']} x {train['image_size']} RGB with values 0..255 as float32; "
        f"{_mask_instruction(train)}{colour_instruction(train.get('colour', 'rgb'))}; then apply the "
        f"{run.backbone} preprocessing ({prep['mode']}: {prep['description']})"
        + (f", i.e. `{prep['keras_function']}`" if prep["keras_function"] else "")
        + f". Without Keras: `{prep['formula']}` with channels {prep['channels']}, divisor {prep['divisor']}, "
        f"mean {prep['mean']}, std {prep['std']} (all in `labels.json`). The output is one softmax probability per "
        "class, in the order above.",
        "",
        "## Data and protocol",
        "",
        f"- Dataset: {_dataset(run)}; folder `{data_dir}`",
        f"- Protocol: {run.protocol.label}",
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
        lines += [
            "",
            f"Stored metrics average {train['tta_views']} test-time augmented views per image; the "
            "exported model gives single-view probabilities, which can differ slightly.",
        ]
    for evaluation in evaluations:
        lines += _evaluation_section(evaluation)
    if not evaluations:
        lines += ["", "No evaluation is stored for this run."]
    lines += _trust_lines(test_metrics, run)
    lines += ["", "## Shortcut audit", ""]
    lines += _audit_lines(shortcuts, leakage, data_dir)
    lines += _occlusion_lines(run)
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


def audit_parts(audit: DatasetAudit | dict | None) -> tuple[dict | None, dict | None]:
    """(shortcuts, leakage) from audit_dataset()'s result (or its dict) or shortcut_audit()'s; ConfigError
    otherwise."""
    if audit is None:
        return None, None
    if isinstance(audit, DatasetAudit):
        return audit.shortcuts, audit.leakage
    shortcuts = audit.get("shortcuts", audit) if isinstance(audit, dict) else None
    needed = ("colour_only_accuracy", "corner_only_accuracy", "chance_accuracy")
    if not isinstance(shortcuts, dict) or any(key not in shortcuts for key in needed):
        raise ConfigError(f"audit must be the result of audit_dataset() or shortcut_audit() (with {', '.join(needed)})")
    return shortcuts, audit.get("leakage")


def _audit_lines(shortcuts: dict | None, leakage: dict | None, data_dir: str) -> list[str]:
    if shortcuts is None:
        return [
            "Not run for this export. Run it with `" + AUDIT_COMMAND.format(data_dir=data_dir) + "` and pass "
            "its result to `export_run(..., audit=...)` to include it here."
        ]
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
        verdict = (
            "no duplicate group crosses subsets."
            if leakage.get("ok")
            else "duplicate groups cross subsets; test figures are inflated."
        )
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
    if metrics.get("ece_calibrated") is not None:
        lines.append(
            f"| ECE after calibration (temperature {metrics['temperature']:.2f}) | "
            f"{_num(metrics['ece_calibrated'])} | |"
        )
    if metrics.get("ood_flagged_share") is not None:
        lines.append(f"| Flagged out of domain by the gate | {_pct(metrics['ood_flagged_share'])} | |")
    per_class = metrics.get("per_class") or {}
    if per_class:
        lines += [
            "",
            "| class | precision | recall (sensitivity) | specificity | F1 | AUC | n |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {name} | {_num(c.get('precision'))} | {_num(c.get('recall'))} | {_num(c.get('specificity'))} "
            f"| {_num(c.get('f1'))} | {_num(c.get('auc'))} | {c.get('support', '?')} |"
            for name, c in per_class.items()
        ]
    return lines


def _dataset(run: RunRecord) -> str:
    dataset = run.dataset
    size = f", {dataset.n_images:,} images" if dataset.n_images is not None else ""
    return f"{dataset.name}{size}" + (
        " (**SYNTHETIC**: drawn by a program, not medical data)" if dataset.synthetic else ""
    )


def _trust_lines(test_metrics: dict, run: RunRecord) -> list[str]:
    lines = ["", "## Out-of-domain gate and calibration", ""]
    if test_metrics.get("ood_threshold") is None:
        return [
            *lines,
            f"This run has no out-of-domain gate and no calibration temperature; "
            f"`python -m bcd_engine calibrate --run {run.id}` fits them from its recorded split.",
        ]
    if test_metrics.get("ood_rule") == HELD_OUT_BOUND_RULE:
        rule = (
            f"set so that, with 95% confidence, at most {_pct(1 - test_metrics['ood_pass_rate'])} of new images "
            "like the training images are refused (from the scores of the validation images and of the training "
            "images, each scored by a gate fitted without it; in-domain images only)"
        )
    else:
        rule = (
            f"a threshold that {_pct(test_metrics['ood_pass_rate'])} of the validation images pass (set from "
            "in-domain images only)"
        )
    return [
        *lines,
        "bcd answers only for images that look like the training images: a Mahalanobis score on the network's "
        "pooled features (class means and one shared, shrunk covariance from the training images) must stay "
        f"under {test_metrics['ood_threshold']:.1f}, {rule}.",
        "",
        f"**Own test images refused by the gate: {_pct(test_metrics['ood_flagged_share'])}** "
        f"({test_metrics['ood_flagged']} of {test_metrics.get('n', '?')}: images from the same source as the "
        "training images that neither the model nor the gate saw).",
        "",
        "It catches images far from every class in feature space (another lab's stain or microscope, no smear at "
        "all, noise, blank frames); it does not catch an in-domain image the model gets wrong, and a confident "
        "answer is not a correct one.",
        "",
        f"Probabilities shown are calibrated by temperature scaling (T = {test_metrics['temperature']:.2f}, fitted "
        "on the validation images, never below 1); the exported model gives the raw probabilities: divide "
        "their logarithms by T and apply softmax to calibrate them.",
    ]


def _recipe(train: dict) -> str:
    text = f"up to {train['epochs']} epochs (early stopping)"
    if train["fine_tune_epochs"] and train["fine_tune_layers"]:
        text += f", then up to {train['fine_tune_epochs']} fine-tuning the top {train['fine_tune_layers']} layers"
    return (
        f"{text}; augmentation x{train['augment']['factor']}, optimizer {train['optimizer']}, "
        f"learning rate {train['learning_rate']}, seed {train['seed']}"
    )


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
    text = (
        f"{len(groups)} group(s) of exact or near-duplicate images ({sum(sizes[g] for g in groups)} images); "
        "each group is kept on one side of the split"
    )
    return text + ("." if not crossing else f", but {crossing} group(s) cross subsets: test figures are inflated.")


def _load_snippet(model_file: str, prep: dict) -> list[str]:
    tflite = model_file.endswith(".tflite")
    imports = (
        ["from ai_edge_litert.interpreter import Interpreter  # or: from tensorflow.lite import Interpreter"]
        if tflite
        else ["import keras"]
    )
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


def _masked_regions(config: dict) -> str:
    """What the run painted over in every image it saw, and why (``train --mask-regions``)."""
    regions = config["train"].get("mask_regions", "none")
    reason = (config.get("mask") or {}).get("reason")
    if regions == "none":
        return "none (the model saw whole images)" + (f"; {reason}" if reason and reason != "nothing masked" else "")
    return f"`{regions}` (x0,y0,x1,y1 in fractions of width and height), painted in each image's median colour" + (
        f"; {reason}" if reason else ""
    )


def _mask_instruction(train: dict) -> str:
    regions = train.get("mask_regions", "none")
    if regions == "none":
        return ""
    return (
        f"paint the regions `{regions}` (x0,y0,x1,y1 in fractions of width and height, `;` between boxes) in the "
        "image's median colour per channel, as the model never saw them; "
    )


def _occlusion_lines(run: RunRecord) -> list[str]:
    """The run's latest occlusion audit (``audit --run N --occlusion``), or how to make one."""
    audit = stored_occlusion(run.config)
    lines = ["", "## Occlusion audit", ""]
    if audit is None:
        return [*lines, f"Not run. `python -m bcd_engine audit --run {run.id} --occlusion` measures it."]
    lines.append(f"On the run's {audit.n_test} test images: {audit.summary()}.")
    if audit.flagged_regions:
        lines.append(
            f"Flagged regions: {', '.join(f'{r.name} `{r.to_text()}`' for r in audit.flagged_regions)} "
            f"({audit.flagged_reason})."
        )
    if audit.heat is not None:
        lines.append(
            f"Grad-CAM heat over {audit.heat.n_images} test images: {audit.heat.border:.0%} on the border "
            f"({audit.heat.border_area:.0%} of the image), {audit.heat.flagged:.0%} on the flagged regions "
            f"({audit.heat.flagged_area:.0%} of the image)."
        )
    return lines


def _weights(weights: str | None) -> str:
    if weights is None:
        return "none (random initialisation)"
    return "ImageNet" if weights == "imagenet" else f"from file `{Path(weights).name}`"


def _library(environment: dict) -> str:
    """The library the run's Keras backend ran on, with its version (TensorFlow for runs before bcd recorded it)."""
    backend = environment.get("backend", "tensorflow")
    title = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}.get(backend, backend)
    return f"{title} {environment.get(backend, '?')}"


def _day(value: datetime | date | None) -> str:
    return value.strftime("%Y-%m-%d") if value is not None else "not recorded"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def colour_instruction(mode: str) -> str:
    if mode == "grayscale":
        return (
            "convert to grayscale first (luminance 0.299 R + 0.587 G + 0.114 B, rounded, copied to all three "
            "channels): the model was trained on grayscale images only"
        )
    return "keep the colours as they are"
