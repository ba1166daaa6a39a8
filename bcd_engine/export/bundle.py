"""Exporting a run's model for use outside bcd: ``.keras`` or TensorFlow Lite, with labels and a model card.

:func:`export_run` writes three files into a folder: the model (``model.keras`` or ``model.tflite``),
``labels.json`` (class names, input size and the exact preprocessing) and ``MODEL_CARD.md``
(:func:`~bcd_engine.export.card.model_card`). Only a file bcd saved and whose sha256 matches the run
store is ever exported (:func:`~bcd_engine.store.artifacts.run_model_file`): ``.keras`` is that very
file, so its sha256 is the store's; TFLite is converted from the model loaded through
:func:`~bcd_engine.inference.loading.load_run_model`. The model takes *preprocessed* images: the
backbone's ``preprocess_input`` is applied outside it, as ``labels.json`` describes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bcd_engine.errors import ConfigError, StoreError, WriteError
from bcd_engine.export.card import (
    MODEL_CARD,
    audit_parts,
    colour_instruction,
    model_card,
)
from bcd_engine.export.tflite import checked_tflite
from bcd_engine.files import file_sha256
from bcd_engine.inference.loading import load_run_model
from bcd_engine.models.backbones import preprocessing_info
from bcd_engine.protocols.audit import DatasetAudit
from bcd_engine.store import RunRecord, RunStore
from bcd_engine.store.artifacts import run_model_file

FORMATS = ("keras", "tflite")  # the first is the default
LABELS = "labels.json"


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
            "colour": colour_instruction(train.get("colour", "rgb")),
            "mask_regions": train.get("mask_regions", "none"),  # painted in the image's median colour before use
            "preprocessed": True,
        },
        "preprocessing": preprocessing_info(run.backbone),
        "output": "softmax probabilities, one per class, in class_names order",
        "tta_views_in_reported_metrics": int(train.get("tta_views", 1)),
    }


def export_run(
    run_id: int,
    *,
    format: str,
    out_dir: str | os.PathLike,
    store: RunStore,
    audit: DatasetAudit | dict | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export run ``run_id``'s verified model as ``.keras`` or ``.tflite`` with ``labels.json`` and ``MODEL_CARD.md``.

    ``out_dir`` is created if missing; existing files are only replaced with ``overwrite=True``. The model must
    load in Keras safe mode (StoreError otherwise), and a TFLite export is checked against Keras on seeded random
    images, before anything is written.
    """
    if format not in FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(FORMATS)}, got {format!r}")
    audit_parts(audit)  # a malformed audit fails before any work
    out = Path(out_dir)
    model_path, labels_path, card_path = out / f"model.{format}", out / LABELS, out / MODEL_CARD
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export folder {out} exists and is not a folder")
    existing = [p.name for p in (model_path, labels_path, card_path) if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{', '.join(existing)} already exist in {out}; overwrite them with overwrite=True (CLI: --overwrite)"
        )
    run = store.get_run(run_id)
    loaded = load_run_model(run_id, store=store)  # Keras safe mode: a model it refuses is not exported either
    content, max_diff = checked_tflite(loaded) if format == "tflite" else (None, None)
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
        card_path.write_text(
            model_card(
                run,
                store.get_evaluations(run_id),
                audit=audit,
                split=store.get_split(run_id),
                model_file=model_path.name,
                model_sha256=model_sha256,
                exported_on=datetime.now(UTC).date(),
            )
        )
    except OSError as exc:
        raise WriteError(f"cannot write the export to {out}: {exc.strerror or exc}") from exc
    return ExportResult(run_id, format, model_path, labels_path, card_path, max_diff)
