"""Leave-one-dataset-out cross-validation (LODO): train on every dataset but one, test on the one left out.

Datasets whose class names differ are related by a label map onto shared labels (e.g. the four ALL
classes onto benign/malignant). Each round trains on a merged folder of links to the other datasets'
images, ``<workdir>/without-<held out>/<shared label>/<dataset>__<class>__<file name>``, so the
feature cache (keyed by image md5) serves every round and rerun; an image within the near-duplicate
distance of a held-out image (in any flip or quarter turn, the measure :func:`scan_dataset` groups by,
but pair by pair rather than through chains) is left out of training. The round's run is then
evaluated on the held-out folder, which may have a single class (its accuracy is then one minus its
false-positive or false-negative rate).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from filelock import FileLock, Timeout

from bcd_engine import settings
from bcd_engine.data.dedup import near_copies
from bcd_engine.data.scan import ScanResult, scan_dataset
from bcd_engine.errors import BCDError, ConfigError, DataError
from bcd_engine.inference.evaluate import evaluate_run_on_folder
from bcd_engine.models.config import TrainConfig
from bcd_engine.store import Protocol, RunStore
from bcd_engine.training.executor import Executor, LocalExecutor
from bcd_engine.training.run import train

_SOURCES_DIGEST = ".sources-digest"  # in a finished training folder: what it was built from
_BUILD_LOCK_SECONDS = 600  # the longest a round waits for another to finish building the same folder


@dataclass(frozen=True)
class LodoRound:
    """One round: ``held_out`` left out of training; ``status`` completed, skipped or failed (``reason`` says why
    it is not completed); the run's in-domain test figures, and its figures on the held-out dataset (accuracy,
    macro AUC, confusion matrix ``{"labels", "counts"}`` and ``per_label_rate`` {true: {predicted: share}})."""

    held_out: str
    status: str
    reason: str | None
    run_id: int | None
    train_datasets: list[str]
    train_labels: list[str]
    excluded_duplicates: int  # training images within the near-duplicate distance of a held-out image
    n_train: int | None
    n_val: int | None
    n_test_in_domain: int | None
    in_domain_accuracy: float | None
    in_domain_macro_auc: float | None
    n_held_out: int
    held_out_labels: list[str]
    held_out_accuracy: float | None
    held_out_macro_auc: float | None
    confusion_matrix: dict | None
    per_label_rate: dict[str, dict[str, float]] | None


@dataclass(frozen=True)
class LodoDataset:
    """One dataset of a LODO: its folder, its image count and its images per shared label."""

    root: str
    n_images: int
    labels: dict[str, int]


@dataclass(frozen=True)
class LodoResult:
    """What :func:`leave_one_dataset_out` reports: the shared labels, the folder the rounds train on, the datasets
    and one round per dataset."""

    protocol: str
    shared_labels: list[str]
    workdir: str
    datasets: dict[str, LodoDataset]
    rounds: tuple[LodoRound, ...]

    def to_dict(self) -> dict:
        """The JSON shape ``lodo --json`` prints: ``{"protocol", "shared_labels", "workdir", "datasets": {name:
        {"root", "n_images", "labels"}}, "rounds": [{"held_out", "status", ...}]}``."""
        return {
            "protocol": self.protocol,
            "shared_labels": list(self.shared_labels),
            "workdir": self.workdir,
            "datasets": {name: asdict(dataset) for name, dataset in self.datasets.items()},
            "rounds": [asdict(row) for row in self.rounds],
        }


def held_out_evaluation_name(held_out: str) -> str:
    """The name of the evaluation on the held-out dataset ``held_out`` of a round's run."""
    return f"held-out {held_out}"


def load_dataset_label_map(path: str | os.PathLike) -> dict:
    """Read a LODO label map file: JSON ``{dataset name: {folder class: shared label}}``.

    The map is validated against the datasets by :func:`leave_one_dataset_out`.
    """
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read label map {path}: {exc}") from exc


def leave_one_dataset_out(
    config: TrainConfig,
    datasets: dict[str, str | os.PathLike],
    label_map: dict | None = None,
    *,
    store: RunStore,
    progress: bool = False,
    workdir: str | os.PathLike | None = None,
    executor: Executor | None = None,
) -> LodoResult:
    """Hold out each dataset in turn: train ``config`` on the others, evaluate on it; one stored run per round.

    ``datasets`` maps names to folders of class subfolders; ``label_map`` maps a dataset name to
    ``{folder class: shared label}`` (an unmapped class keeps its name). A round whose training
    datasets have fewer than two shared labels, or lack a label of the held-out set, is skipped with
    its reason; a round whose training or evaluation fails is marked failed with the error, and the
    other rounds still run. Each round's run is stored in ``store`` under ``Protocol.lodo(<held out>)``.
    The result has one round per dataset with its run, in-domain test and held-out figures (accuracy, macro AUC,
    confusion matrix, per-label rates); ``workdir`` defaults to
    a folder under the cache keyed by the inputs. The rounds train one after another here unless ``executor``
    runs them elsewhere (the Ray executor: in parallel, without progress bars); the result is the same.
    """
    scans = {
        name: scan_dataset(root, progress=progress, allow_single_class=True)
        for name, root in _check_datasets(datasets).items()
    }
    labels_of = _check_label_map(label_map, scans)
    workdir = Path(workdir) if workdir is not None else _default_workdir(scans, labels_of)
    executor = executor or LocalExecutor()
    work = functools.partial(
        _round,
        config=config,
        scans=scans,
        labels_of=labels_of,
        workdir=workdir,
        progress=progress and isinstance(executor, LocalExecutor),
    )
    return LodoResult(
        protocol=Protocol.lodo().label,
        shared_labels=sorted({label for labels in labels_of.values() for label in labels.values()}),
        workdir=str(workdir),
        datasets={
            name: LodoDataset(scan.root, scan.n_images, _label_counts(scan, labels_of[name]))
            for name, scan in scans.items()
        },
        rounds=tuple(executor.map(work, list(scans), store=store)),
    )


def _check_datasets(datasets: dict) -> dict[str, Path]:
    if not isinstance(datasets, dict):
        raise ConfigError(f"datasets must map names to folders, got {type(datasets).__name__}")
    if len(datasets) < 2:
        raise ConfigError(f"leave-one-dataset-out needs at least 2 datasets (NAME=DIR), got {len(datasets)}")
    roots: dict[Path, str] = {}
    for name, root in datasets.items():
        _check_folder_name("dataset name", name)
        resolved = Path(root).expanduser().resolve()
        if resolved in roots:
            raise ConfigError(f"datasets {roots[resolved]!r} and {name!r} are the same folder {resolved}")
        roots[resolved] = name
    return {name: Path(root) for name, root in datasets.items()}


def _check_label_map(label_map: dict | None, scans: dict[str, ScanResult]) -> dict[str, dict[str, str]]:
    """{dataset: {class: shared label}} for every class of every dataset, after validating ``label_map``."""
    label_map = {} if label_map is None else label_map
    shape = 'a JSON object {"<dataset>": {"<folder class>": "<shared label>"}}'
    if not isinstance(label_map, dict) or not all(
        isinstance(part, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in part.items())
        for part in label_map.values()
    ):
        raise ConfigError(f"the label map must be {shape}")
    unknown = sorted(set(label_map) - set(scans))
    if unknown:
        raise ConfigError(
            f"the label map names unknown dataset(s) {', '.join(map(repr, unknown))}; "
            f"the datasets are {', '.join(map(repr, scans))}"
        )
    labels_of = {}
    for name, scan in scans.items():
        part = label_map.get(name, {})
        missing = sorted(set(part) - set(scan.class_names))
        if missing:
            raise DataError(
                f"the label map for dataset {name!r} names class(es) {', '.join(map(repr, missing))} "
                f"that {scan.root} does not have (its classes: {', '.join(scan.class_names)})"
            )
        labels_of[name] = {cls: part.get(cls, cls) for cls in scan.class_names}
    seen: dict[str, str] = {}
    for label in sorted({label for labels in labels_of.values() for label in labels.values()}):
        _check_folder_name("shared label", label)
        if seen.setdefault(label.casefold(), label) != label:
            raise ConfigError(
                f"shared labels {seen[label.casefold()]!r} and {label!r} differ only in case; map them onto one label"
            )
    return labels_of


def _check_folder_name(what: str, name: object) -> None:
    if not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise ConfigError(
            f"{what} {name!r} cannot be used as a folder name (empty, starts with '.', or contains '/' or '\\')"
        )


def _default_workdir(scans: dict[str, ScanResult], labels_of: dict) -> Path:
    """``<cache>/lodo/<digest of the dataset folders and label map>``: the same inputs reuse one folder."""
    key = json.dumps({name: [scan.root, labels_of[name]] for name, scan in scans.items()}, sort_keys=True)
    return settings.cache_dir() / "lodo" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _label_counts(scan: ScanResult, labels: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in scan.images:
        counts[labels[record.class_name]] = counts.get(labels[record.class_name], 0) + 1
    return dict(sorted(counts.items()))


def _round(
    store: RunStore,
    held_out: str,
    *,
    config: TrainConfig,
    scans: dict[str, ScanResult],
    labels_of: dict,
    progress: bool,
    workdir: Path,
) -> LodoRound:
    """Train on the datasets other than ``held_out`` and evaluate on it; one row of the LODO table."""
    train_names = [name for name in scans if name != held_out]
    sources, excluded = {}, 0
    for name in train_names:
        copies = near_copies(scans[name].images, scans[held_out].images)
        excluded += sum(copies)
        for record, is_copy in zip(scans[name].images, copies, strict=True):
            if is_copy:
                continue
            label = labels_of[name][record.class_name]
            sources[Path(label) / f"{name}__{record.class_name}__{Path(record.path).name}"] = record.path
    train_labels = sorted({rel.parts[0] for rel in sources})
    held_out_labels = sorted(set(labels_of[held_out].values()))
    skipped = LodoRound(
        held_out=held_out,
        status="skipped",
        reason=None,
        run_id=None,
        train_datasets=train_names,
        train_labels=train_labels,
        excluded_duplicates=excluded,
        n_train=None,
        n_val=None,
        n_test_in_domain=None,
        in_domain_accuracy=None,
        in_domain_macro_auc=None,
        n_held_out=scans[held_out].n_images,
        held_out_labels=held_out_labels,
        held_out_accuracy=None,
        held_out_macro_auc=None,
        confusion_matrix=None,
        per_label_rate=None,
    )
    unseen = [label for label in held_out_labels if label not in train_labels]
    if len(train_labels) < 2:
        have = f"only the shared label {train_labels[0]!r}" if train_labels else "no images left"
        return replace(
            skipped, reason=f"the training datasets ({', '.join(train_names)}) have {have}; training needs two labels"
        )
    if unseen:
        return replace(
            skipped,
            reason=f"held-out label(s) {', '.join(map(repr, unseen))} do not occur in the "
            f"training datasets ({', '.join(train_names)}), so the model cannot predict "
            "them",
        )
    train_dir = _link_folder(workdir / f"without-{held_out}", sources)
    try:
        result = train(config, train_dir, store=store, progress=progress, protocol=Protocol.lodo(held_out))
    except BCDError as exc:  # one failed round does not cost the others their results
        return replace(skipped, status="failed", reason=str(exc))
    trained = replace(
        skipped,
        run_id=result.run_id,
        status=result.status,
        n_train=result.n_train,
        n_val=result.n_val,
        n_test_in_domain=result.n_test,
        in_domain_accuracy=result.test_accuracy,
        in_domain_macro_auc=result.macro_auc,
    )
    if result.status != "completed":
        return replace(trained, reason=f"run {result.run_id} was {result.status}")
    try:
        evaluation = evaluate_run_on_folder(
            result.run_id,
            scans[held_out].root,
            store=store,
            progress=progress,
            label_map={"run": {label: label for label in train_labels}, "data": labels_of[held_out]},
            evaluation_name=held_out_evaluation_name(held_out),
        )
    except BCDError as exc:
        return replace(
            trained, status="failed", reason=f"run {result.run_id} trained, but its held-out evaluation failed: {exc}"
        )
    names = evaluation.class_names
    return replace(
        trained,
        held_out_accuracy=evaluation.accuracy,
        held_out_macro_auc=evaluation.macro_auc,
        confusion_matrix={"labels": names, "counts": evaluation.confusion_matrix},
        per_label_rate={
            names[i]: {names[j]: n / sum(counts) for j, n in enumerate(counts)}
            for i, counts in enumerate(evaluation.confusion_matrix)
            if sum(counts)
        },
    )


def _link_folder(folder: Path, sources: dict[Path, str]) -> Path:
    """``folder`` with a link at each relative path to its source file; return it.

    A folder already built from the same sources is reused as it is. Otherwise it is built under a lock (so
    concurrent runs with the same inputs build it once and share it) in a hidden sibling that is renamed into
    place when complete, so a reader never sees a half-built folder.
    """
    digest = hashlib.sha256(json.dumps(sorted((str(rel), src) for rel, src in sources.items())).encode()).hexdigest()
    if _built_from(folder) == digest:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder.parent / f".{folder.name}.lock", timeout=_BUILD_LOCK_SECONDS)
    try:
        with lock:
            if _built_from(folder) == digest:  # another run built it while this one waited
                return folder
            _build_folder(folder, sources, digest)
    except Timeout as exc:
        raise DataError(
            f"another run has been building {folder} for over {_BUILD_LOCK_SECONDS} s; "
            f"if no run is, remove {lock.lock_file} and try again"
        ) from exc
    return folder


def _build_folder(folder: Path, sources: dict[Path, str], digest: str) -> None:
    """Make the links in a hidden sibling, then rename it into place (nothing half-built is left behind)."""
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for rel, source in sources.items():
            link = building / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            _link(Path(source).resolve(), link)
        (building / _SOURCES_DIGEST).write_text(digest)
        if folder.exists():  # built from other sources (a dataset changed since): set it aside, then remove it
            stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}-stale-", dir=folder.parent))
            folder.rename(stale / folder.name)
            shutil.rmtree(stale, ignore_errors=True)
        building.rename(folder)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def _built_from(folder: Path) -> str | None:
    """The digest of the sources ``folder`` was built from, or None when it is not a finished folder."""
    try:
        return (folder / _SOURCES_DIGEST).read_text()
    except OSError:
        return None


def _link(source: Path, link: Path) -> None:
    """A symbolic link, else a hard link, else a copy (its mtime kept, so scan caches stay valid)."""
    try:
        link.symlink_to(source)
    except OSError:
        try:
            os.link(source, link)
        except OSError:
            shutil.copy2(source, link)
