"""Where a run's files live, and finding them again safely.

A run's files are in ``<artifacts>/run-<id>/``: its model (``model.keras``, artifact kind ``model``) and its
out-of-distribution gate with its calibration temperature (``trust.npz``, kind ``trust``). The store records
each file relative to the artifacts folder with its sha256, so a results.db shipped with its artifacts/ works
anywhere; a recorded file is used only when it lies inside the artifacts folder and matches its sha256.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from bcd_engine import settings
from bcd_engine.errors import StoreError
from bcd_engine.files import file_sha256, remove_stale_temp_files

if TYPE_CHECKING:  # runs.py imports this module (RunStore.open sweeps the run folders)
    from bcd_engine.store.runs import RunStore

MODEL_KIND = "model"
MODEL_FILE = "model.keras"
TRUST_KIND = "trust"
TRUST_FILE = "trust.npz"
_WHAT = {MODEL_KIND: "model file", TRUST_KIND: "OOD gate"}
STALE_TEMP_FILE_S = 600  # a save's temporary file untouched this long was left by a killed process


def run_folder(run_id: int) -> Path:
    """Where a run's files live: ``<artifacts>/run-<id>``."""
    return settings.artifacts_dir() / f"run-{int(run_id)}"


def model_path(run_id: int) -> Path:
    """Where a run's model is saved: ``<artifacts>/run-<id>/model.keras``."""
    return run_folder(run_id) / MODEL_FILE


def trust_path(run_id: int) -> Path:
    """Where a run's OOD gate and temperature are saved: ``<artifacts>/run-<id>/trust.npz``."""
    return run_folder(run_id) / TRUST_FILE


def record_artifact(store: RunStore, run_id: int, *, kind: str, path: Path) -> int:
    """Record the file at ``path`` (inside the artifacts folder) as run ``run_id``'s ``kind`` artifact; its id.

    The path is stored relative to the artifacts folder, with the file's sha256 and size.
    """
    relative = path.resolve().relative_to(settings.artifacts_dir().resolve()).as_posix()
    return store.save_artifact(
        run_id, kind=kind, path=relative, sha256=file_sha256(path), size_bytes=os.path.getsize(path)
    )


def artifact_file(run_id: int, kind: str, *, store: RunStore) -> tuple[Path, str] | None:
    """The newest file of ``kind`` recorded for run ``run_id`` and its sha256, checked; None when none is recorded.

    Raises :class:`StoreError` when the file lies outside the artifacts folder, is missing or does not match
    its recorded sha256.
    """
    records = [a for a in store.get_artifacts(run_id) if a.kind == kind]
    if not records:
        return None
    what = _WHAT.get(kind, f"{kind} file")
    root = settings.artifacts_dir().resolve()
    path = (root / records[-1].path).resolve()  # an absolute stored path stays as it is
    if root not in path.parents:
        raise StoreError(f"the {what} of run {run_id} lies outside the artifacts folder {root}; refusing to use it")
    if not path.is_file():
        raise StoreError(f"the {what} of run {run_id} is missing: {path}")
    if file_sha256(path) != records[-1].sha256:
        raise StoreError(f"the {what} of run {run_id} does not match its recorded sha256; refusing to use it")
    return path, records[-1].sha256


def run_model_file(run_id: int, *, store: RunStore) -> tuple[Path, str]:
    """The model file a completed run saved and its recorded sha256, checked as :func:`artifact_file` checks
    (StoreError for a run not completed, without a model, or whose file fails the check)."""
    run = store.get_run(run_id)
    if run.status != "completed":
        raise StoreError(f"run {run_id} is {run.status}, not completed: it has no model to use")
    found = artifact_file(run_id, MODEL_KIND, store=store)
    if found is None:
        raise StoreError(f"run {run_id} has no saved model")
    return found


def model_identity(run_id: int, *, store: RunStore) -> str:
    """What tells this run's model from any other, even one saved later under a reused run id: the run's
    creation time and the recorded sha256 of its model and of its OOD gate (caches key on it)."""
    run = store.get_run(run_id)
    latest = {a.kind: a.sha256 for a in store.get_artifacts(run_id)}  # oldest first: the last of each kind wins
    return f"{run.created_at.isoformat()}/{latest.get(MODEL_KIND, 'no model')}/{latest.get(TRUST_KIND, 'no gate')}"


def delete_run(store: RunStore, run_id: int) -> None:
    """Delete a run from the store (everything recorded about it) and then its files."""
    store.delete_run(run_id)
    shutil.rmtree(run_folder(run_id), ignore_errors=True)


def remove_unrecorded_files(store: RunStore, run_id: int) -> list[Path]:
    """Remove the files in run ``run_id``'s folder that the store has no record of (what a failed run wrote before
    it failed, such as a model saved before its gate could be), and the folder when it is left empty; the files
    removed."""
    folder = run_folder(run_id)
    root = settings.artifacts_dir().resolve()
    recorded = {(root / a.path).resolve() for a in store.get_artifacts(run_id)}
    removed = [path for path in folder.glob("*") if path.is_file() and path.resolve() not in recorded]
    for path in removed:
        path.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return removed


def sweep_temp_files() -> list[Path]:
    """Remove the temporary files that saves killed midway left in the run folders (see
    :func:`bcd_engine.files.atomic_path`), once untouched for STALE_TEMP_FILE_S; the files removed."""
    return [
        path
        for folder in settings.artifacts_dir().glob("run-*")
        if folder.is_dir()
        for path in remove_stale_temp_files(folder, older_than_s=STALE_TEMP_FILE_S)
    ]
