"""A model export (``export_run``) as one zip in memory, for a download button."""

from __future__ import annotations

import io
import tempfile
import zipfile

from bcd_engine.export.bundle import ExportResult, export_run
from bcd_engine.store import RunStore


def export_name(run_id: int, backbone: str, format: str) -> str:
    """The file name a run's model export is offered under: ``bcd-run-<id>-<backbone>-<format>.zip``."""
    return f"bcd-run-{int(run_id)}-{backbone}-{format}.zip"


def export_zip(run_id: int, *, format: str, store: RunStore) -> tuple[bytes, ExportResult]:
    """Run ``run_id`` exported as ``format`` (``keras`` or ``tflite``, checked as :func:`export_run` checks it) with
    its ``labels.json`` and model card, zipped: (the zip's bytes, the export's result)."""
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="bcd-export-") as folder:
        result = export_run(run_id, format=format, out_dir=folder, store=store)
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in result.paths:
                archive.write(path, path.name)
    return buffer.getvalue(), result
