"""Run bundles: one completed run as one ``.zip``, taken out of one run store and added to any other.

A bundle holds everything a store keeps about the run and the files it needs to answer: the model
(``model.keras``), its OOD gate and temperature (``trust.npz``, when the run has them), ``labels.json``,
``MODEL_CARD.md``, ``run.json`` (backbone, protocol, config, where and when it was trained, the dataset's
summary and fingerprint, split sizes), ``split.json``, ``epochs.json`` and ``evaluations.json``, and
``manifest.json``: the bundle format, the source run and the sha256 and size of every other member.

:func:`import_bundle` checks all of it before anything is written: only the members above, each within its
size limit, every checksum matching the manifest, the documents well formed, the model loaded by Keras in
safe mode with as many outputs as the run has classes. A bad bundle raises :class:`BundleError` and the store
is unchanged. An imported run is a new run of the importing store; ``config["imported"]`` keeps its
provenance (source run id, the bundle's sha256, when it was exported and imported), and the record keeps the
source's host, environment (backend included) and training times.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from bcd_engine.data.classes import run_class_guide
from bcd_engine.errors import BCDError, BundleError, ConfigError, WriteError
from bcd_engine.export.bundle import LABELS, labels_document
from bcd_engine.export.card import MODEL_CARD, model_card
from bcd_engine.files import atomic_path, file_sha256
from bcd_engine.inference.trust import RunTrust
from bcd_engine.models.config import TrainConfig
from bcd_engine.store import Protocol, RunStore
from bcd_engine.store.artifacts import (
    MODEL_FILE,
    MODEL_KIND,
    TRUST_FILE,
    TRUST_KIND,
    artifact_file,
    record_artifact,
    run_folder,
    run_model_file,
)
from bcd_engine.version import __version__

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
MODEL = MODEL_FILE
RUN, SPLIT, EPOCHS, EVALUATIONS = "run.json", "split.json", "epochs.json", "evaluations.json"
# Every member a bundle may hold, with the most bytes it may expand to.
MB = 1 << 20
MEMBER_LIMITS: dict[str, int] = {
    MODEL: 2048 * MB,  # the largest backbone's whole model at 1024 px is far below this
    TRUST_FILE: 64 * MB,
    LABELS: 1 * MB,
    MODEL_CARD: 1 * MB,
    RUN: 4 * MB,
    SPLIT: 64 * MB,
    EPOCHS: 4 * MB,
    EVALUATIONS: 256 * MB,
    MANIFEST: 1 * MB,
}
# The files of an imported run, by artifact kind (the model and the gate are what inference loads).
ARTIFACT_KINDS = {MODEL_KIND: MODEL, TRUST_KIND: TRUST_FILE, "model_card": MODEL_CARD, "labels": LABELS}
EPOCH_FIELDS = (
    "phase",
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "learning_rate",
    "seconds",
)
EVALUATION_FIELDS = ("name", "data_dir", "metrics", "class_names", "confusion_matrix", "roc", "predictions")
REQUIRED = (MANIFEST, MODEL, LABELS, MODEL_CARD, RUN, SPLIT, EPOCHS, EVALUATIONS)
MAX_RATIO = 200  # expanded / compressed bytes of one member; JSON compresses about 10x, a bomb thousands of times
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_bundle` added: the new run's id in this store and where the run came from."""

    run_id: int
    source_run_id: int
    backbone: str
    bundle_sha256: str
    members: tuple[str, ...]


def bundle_name(run_id: int, backbone: str) -> str:
    """The file name a run's bundle is written under: ``bcd-run-<id>-<backbone>.zip``."""
    return f"bcd-run-{int(run_id)}-{backbone}.zip"


def write_bundle(run_id: int, *, out_dir: str | Path, store: RunStore, overwrite: bool = False) -> Path:
    """Write run ``run_id``'s bundle into ``out_dir`` (created if missing) and return its path.

    Only a completed run whose model matches its recorded sha256 is bundled (StoreError otherwise); the
    file is written whole or not at all.
    """
    run = store.get_run(run_id)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export folder {out} exists and is not a folder")
    path = out / bundle_name(run_id, run.backbone)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path.name} already exists in {out}; overwrite it with overwrite=True (CLI: --overwrite)")
    try:
        with atomic_path(path, suffix=".zip") as tmp, open(tmp, "wb") as handle:
            write_bundle_to(handle, run_id, store=store)
    except OSError as exc:
        raise WriteError(f"cannot write the bundle to {out}: {exc.strerror or exc}") from exc
    return path


def bundle_bytes(run_id: int, *, store: RunStore) -> bytes:
    """Run ``run_id``'s bundle as bytes (for a download button)."""
    buffer = io.BytesIO()
    write_bundle_to(buffer, run_id, store=store)
    return buffer.getvalue()


def write_bundle_to(handle: IO[bytes], run_id: int, *, store: RunStore) -> None:
    """Write run ``run_id``'s bundle as a zip into the open binary ``handle`` (a file or ``io.BytesIO``)."""
    run = store.get_run(run_id)
    model_path, model_sha256 = run_model_file(run_id, store=store)  # completed, in the artifacts folder, verified
    trust = artifact_file(run_id, TRUST_KIND, store=store)  # verified as inference verifies it; None: no gate
    evaluations = store.get_evaluations(run_id)
    split = store.get_split(run_id)
    documents: dict[str, bytes] = {
        LABELS: _json(labels_document(run, model_file=MODEL)),
        MODEL_CARD: model_card(
            run,
            evaluations,
            split=split,
            model_file=MODEL,
            model_sha256=model_sha256,
            exported_on=datetime.now(UTC).date(),
        ).encode(),
        RUN: _json(_run_document(run, split)),
        SPLIT: _json(split),
        EPOCHS: _json([_plain(epoch) for epoch in store.get_epochs(run_id)]),
        EVALUATIONS: _json([_evaluation_document(store, evaluation) for evaluation in evaluations]),
    }
    members: dict[str, dict[str, Any]] = {}
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as bundle:
        bundle.write(model_path, MODEL, compress_type=zipfile.ZIP_STORED)  # a .keras file is a zip already
        members[MODEL] = {"sha256": model_sha256, "size": model_path.stat().st_size}
        if trust is not None:
            bundle.write(trust[0], TRUST_FILE)
            members[TRUST_FILE] = {"sha256": trust[1], "size": trust[0].stat().st_size}
        for name, content in documents.items():
            bundle.writestr(name, content)
            members[name] = {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content)}
        bundle.writestr(
            MANIFEST,
            _json(
                {
                    "format": BUNDLE_FORMAT,
                    "kind": "bcd run bundle",
                    "bcd_version": __version__,
                    "source_run_id": run.id,
                    "backbone": run.backbone,
                    "exported_at": datetime.now(UTC).isoformat(),
                    "members": members,
                }
            ),
        )


def _run_document(run, split: list[dict]) -> dict[str, Any]:
    sizes: dict[str, int] = {}
    for row in split:
        sizes[row["subset"]] = sizes.get(row["subset"], 0) + 1
    return {
        "id": run.id,
        "backbone": run.backbone,
        "protocol": _plain(run.protocol),
        "config": run.config,
        "status": run.status,
        "created_at": _time(run.created_at),
        "started_at": _time(run.started_at),
        "finished_at": _time(run.finished_at),
        "seconds": run.seconds,
        "host": run.host,
        "environment": run.environment,
        "test_accuracy": run.test_accuracy,
        "macro_auc": run.macro_auc,
        "dataset": _dataset_summary(run),
        "split_sizes": sizes,
    }


def _dataset_summary(run) -> dict[str, Any]:
    """The run's dataset as the store shows it, with the fingerprint its config recorded (None before bcd did) and
    its classes in words (looked up here, where its folder may be, so that the run answers in words anywhere)."""
    return {
        "name": run.dataset.name,
        "n_images": run.dataset.n_images,
        "synthetic": run.dataset.synthetic,
        "fingerprint": (run.config.get("dataset") or {}).get("fingerprint"),
        "classes": run_class_guide(run.config, synthetic=run.dataset.synthetic).to_dict(),
    }


def _evaluation_document(store: RunStore, evaluation) -> dict[str, Any]:
    return {
        "name": evaluation.name,
        "data_dir": evaluation.data_dir,
        "metrics": evaluation.metrics,
        "class_names": evaluation.class_names,
        "confusion_matrix": evaluation.confusion_matrix,
        "roc": {name: _plain(curve) for name, curve in evaluation.roc.items()},
        "predictions": [
            {
                "path": p.path,
                "true_class": p.true_class,
                "predicted_class": p.predicted_class,
                "probabilities": p.probabilities,
            }
            for p in store.get_predictions(evaluation.id)
        ],
    }


def import_bundle(path: str | Path, *, store: RunStore) -> ImportResult:
    """Add the run in bundle ``path`` to ``store`` as a new completed run, after checking all of it.

    BundleError (one line) for anything wrong with the bundle, before anything is written.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"no bundle at {path}")
    with tempfile.TemporaryDirectory(prefix="bcd-bundle-") as scratch:
        members, manifest, bundle_sha256 = _unpack(path, Path(scratch))
        documents = {name: _read_json(members[name], name) for name in (RUN, SPLIT, EPOCHS, EVALUATIONS, LABELS)}
        run_doc = documents[RUN]
        config, protocol, class_names = _checked_run(run_doc)
        _check_model(members[MODEL], class_names=class_names, image_size=config.image_size)
        if TRUST_FILE in members:
            _check_trust(members[TRUST_FILE])
        imported = {
            "source_run_id": manifest.get("source_run_id"),
            "bundle": path.name,
            "bundle_sha256": bundle_sha256,
            "exported_at": manifest.get("exported_at"),
            "exported_by_bcd": manifest.get("bcd_version"),
            "imported_at": datetime.now(UTC).isoformat(),
            "source_created_at": run_doc.get("created_at"),
        }
        run_id = _add_to_store(
            store,
            run_doc=run_doc,
            config=config,
            protocol=protocol,
            imported=imported,
            documents=documents,
            members=members,
        )
    return ImportResult(
        run_id, int(manifest.get("source_run_id") or 0), config.backbone, bundle_sha256, tuple(sorted(members))
    )


def _add_to_store(
    store: RunStore,
    *,
    run_doc: dict,
    config: TrainConfig,
    protocol: Protocol,
    imported: dict,
    documents: dict[str, Any],
    members: dict[str, Path],
) -> int:
    """Record the checked run in ``store`` with its files in a new run folder; its id. The run is ``failed`` ("being
    imported") until the last record is written; if writing fails, the run and its folder are removed again."""
    # The run is shown with the dataset the bundle names (its folder is not on this machine, so none is registered).
    run_config = {**run_doc["config"], "dataset": run_doc["dataset"], "imported": imported}
    run_id = store.create_run(backbone=config.backbone, protocol=protocol, status="failed", config=run_config)
    store.finish_run(run_id, status="failed", error=f"being imported from {imported['bundle']}")
    folder = run_folder(run_id)
    try:
        shutil.rmtree(folder, ignore_errors=True)  # left by an earlier run of this id that no store row owns
        folder.mkdir(parents=True)
        for kind, name in ARTIFACT_KINDS.items():
            if name in members:
                shutil.copyfile(members[name], folder / name)
                record_artifact(store, run_id, kind=kind, path=folder / name)
        store.save_split(run_id, documents[SPLIT])
        for epoch in documents[EPOCHS]:
            store.log_epoch(run_id, **{key: epoch.get(key) for key in EPOCH_FIELDS})
        for evaluation in documents[EVALUATIONS]:
            store.save_evaluation(run_id, **{key: evaluation[key] for key in EVALUATION_FIELDS})
        store.complete_imported_run(
            run_id,
            started_at=_parse_time(run_doc.get("started_at")),
            finished_at=_parse_time(run_doc.get("finished_at")),
            seconds=run_doc.get("seconds"),
            host=run_doc.get("host"),
            environment=run_doc.get("environment"),
            test_accuracy=run_doc.get("test_accuracy"),
            macro_auc=run_doc.get("macro_auc"),
        )
    except BaseException as exc:
        store.delete_run(run_id)
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write the imported run to {folder}: {exc.strerror or exc}") from exc
        if isinstance(exc, (AttributeError, KeyError, TypeError, ValueError)):  # a record of the wrong shape
            raise BundleError(f"the bundle's records cannot be read ({type(exc).__name__}: {exc})") from exc
        if isinstance(exc, BCDError) and not isinstance(exc, BundleError):
            raise BundleError(f"the bundle's records were refused by the store: {exc}") from exc
        raise
    return run_id


def _unpack(path: Path, folder: Path) -> tuple[dict[str, Path], dict[str, Any], str]:
    """Every member of the bundle at ``path`` written into ``folder`` after the checks; (name -> file, the manifest,
    the bundle's sha256)."""
    try:
        bundle = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{path.name} is not a run bundle (not a readable zip: {exc})") from exc
    with bundle:
        infos = bundle.infolist()
        names = [info.filename for info in infos]
        unknown = sorted(set(names) - set(MEMBER_LIMITS))
        if unknown:
            raise BundleError(f"{path.name} holds members a run bundle never has: {', '.join(map(repr, unknown[:5]))}")
        if len(names) != len(set(names)):
            raise BundleError(f"{path.name} holds a member twice")
        missing = [name for name in REQUIRED if name not in names]
        if missing:
            raise BundleError(f"{path.name} lacks {', '.join(missing)}: not a complete run bundle")
        for info in infos:
            if info.file_size > MEMBER_LIMITS[info.filename]:
                raise BundleError(
                    f"{info.filename} in {path.name} expands to {info.file_size} bytes, beyond its "
                    f"limit of {MEMBER_LIMITS[info.filename]}"
                )
            if info.file_size > MB and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                ratio = info.file_size // max(info.compress_size, 1)
                raise BundleError(f"{info.filename} in {path.name} expands {ratio} times: refused as a zip bomb")
        digests: dict[str, str] = {}
        files: dict[str, Path] = {}
        for info in infos:
            files[info.filename] = folder / info.filename
            digests[info.filename] = _copy_member(bundle, info, files[info.filename], path.name)
    manifest = _read_json(files[MANIFEST], MANIFEST)
    listed = manifest.get("members") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path.name}'s manifest is not one of bundle format {BUNDLE_FORMAT}")
    present = set(files) - {MANIFEST}
    if set(listed) != present:
        difference = sorted(set(listed) ^ present)
        raise BundleError(f"{path.name}'s manifest and its members differ ({', '.join(difference)})")
    for name in sorted(present):
        if not isinstance(listed[name], Mapping) or listed[name].get("sha256") != digests[name]:
            raise BundleError(
                f"{name} in {path.name} does not match the sha256 its manifest records; refusing the bundle"
            )
    return files, manifest, file_sha256(path)


def _copy_member(bundle: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, bundle_name: str) -> str:
    """Copy one member to ``target`` counting bytes against its limit; its sha256."""
    digest, written = hashlib.sha256(), 0
    try:
        with bundle.open(info) as source, open(target, "wb") as out:
            for chunk in iter(lambda: source.read(_CHUNK), b""):
                written += len(chunk)
                if written > MEMBER_LIMITS[info.filename]:
                    raise BundleError(f"{info.filename} in {bundle_name} expands beyond its limit")
                digest.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as exc:
        raise BundleError(f"{info.filename} in {bundle_name} cannot be read ({exc})") from exc
    except OSError as exc:
        raise WriteError(f"cannot unpack {bundle_name}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def _checked_run(run_doc: Any) -> tuple[TrainConfig, Protocol, list[str]]:
    """The run document's train config, protocol and class names, or BundleError saying what is wrong."""
    try:
        config = TrainConfig.from_dict(run_doc["config"]["train"])
        protocol = Protocol(**run_doc["protocol"])
        class_names = [str(name) for name in run_doc["config"]["class_names"]]
        dataset = run_doc["dataset"]
        if not isinstance(dataset, dict) or not isinstance(run_doc["split_sizes"], dict):
            raise TypeError("dataset and split sizes must be objects")
    except (KeyError, TypeError, BCDError) as exc:
        raise BundleError(f"{RUN} cannot be read by this version of bcd ({type(exc).__name__}: {exc})") from exc
    if run_doc.get("status") != "completed":
        raise BundleError(f"the bundled run is {run_doc.get('status')}, not completed")
    if len(class_names) < 2:
        raise BundleError(f"{RUN} names {len(class_names)} classes; a run has at least two")
    return config, protocol, class_names


def _check_model(path: Path, *, class_names: list[str], image_size: int) -> None:
    """BundleError unless Keras loads the model in safe mode with the run's input size and number of classes."""
    import keras

    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras refuses unsafe or broken files with many types
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise BundleError(f"the bundled model cannot be loaded safely ({detail}); refusing the bundle") from exc
    outputs, inputs = model.output_shape[-1], tuple(model.input_shape[1:3])
    if outputs != len(class_names) or inputs != (image_size, image_size):
        raise BundleError(
            f"the bundled model takes {inputs} and gives {outputs} classes, but the run says "
            f"{(image_size, image_size)} and {len(class_names)}"
        )


def _check_trust(path: Path) -> None:
    try:
        RunTrust.load(path)
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"the bundled OOD gate cannot be read ({type(exc).__name__}: {exc})") from exc


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{name} is not valid JSON ({exc})") from exc


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=1, default=_json_default) + "\n").encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return _time(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _plain(record: Any) -> dict[str, Any]:
    """A frozen record's fields as a dict (datetimes as ISO text)."""
    return {name: _time(value) if isinstance(value, datetime) else value for name, value in record.__dict__.items()}


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_time(text: Any) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(str(text))
    except ValueError as exc:
        raise BundleError(f"{RUN} has a time that is not ISO 8601: {text!r}") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


__all__ = [
    "BUNDLE_FORMAT",
    "ImportResult",
    "bundle_bytes",
    "bundle_name",
    "import_bundle",
    "write_bundle",
    "write_bundle_to",
]
