"""Scanning a dataset folder (one subfolder per class).

:func:`scan_dataset` reads every image once, records its md5, size, mode and view hashes, sorts out
files that do not decode, and groups exact and near duplicates so that splits can keep each group on
one side. Per-file results are cached, so re-scanning an unchanged folder is near-instant. The
``Original``/``Segmented`` twin folders of the ALL dataset are found by :func:`twin_root`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bcd_engine import settings
from bcd_engine.data.dedup import (
    DHASH_SIZE,
    N_VIEWS,
    NEAR_DUPLICATE_DISTANCE,
    exact_duplicate_groups,
    gradient_hash,
    near_duplicate_groups,
    turned_and_mirrored,
)
from bcd_engine.data.images import SUPPORTED_EXTENSIONS, decode_stored, read_image_bytes, short_reason
from bcd_engine.errors import ConfigError, DataError, ImageLoadError
from bcd_engine.files import atomic_write_text

_CACHE_FORMAT = 4
TWIN_FOLDERS = ("Original", "Segmented")  # the ALL dataset's twin folders of the same images


@dataclass(frozen=True)
class ImageRecord:
    """What a scan learned about one file."""

    path: str
    class_name: str
    md5: str
    size_bytes: int
    width: int
    height: int
    mode: str
    readable: bool
    error: str | None
    dhash: str | None  # hex dhash of each of the 8 flips and quarter turns, concatenated (the file as stored first)


@dataclass(frozen=True)
class ScanResult:
    """A scanned dataset: readable images (sorted by class, then path), unreadable files, duplicates."""

    root: str
    images: tuple[ImageRecord, ...]
    unreadable: tuple[ImageRecord, ...]
    class_names: tuple[str, ...]
    duplicate_groups: tuple[tuple[str, ...], ...]
    near_duplicate_groups: tuple[tuple[str, ...], ...]

    @property
    def class_counts(self) -> dict[str, int]:
        """Number of readable images per class, in class order."""
        counts = dict.fromkeys(self.class_names, 0)
        for record in self.images:
            counts[record.class_name] += 1
        return counts

    @property
    def n_images(self) -> int:
        """Number of readable images."""
        return len(self.images)

    @property
    def fingerprint(self) -> str:
        """sha256 of the readable images' contents and classes (sorted ``class md5`` lines): the same for the same
        images under any folder or file names, different when one image or label changes."""
        lines = sorted(f"{record.class_name}\t{record.md5}" for record in self.images)
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    @property
    def paths(self) -> list[str]:
        """Absolute paths of the readable images, aligned with :attr:`images`."""
        return [record.path for record in self.images]

    @property
    def labels(self) -> np.ndarray:
        """Class index (into :attr:`class_names`) of every readable image."""
        index = {name: i for i, name in enumerate(self.class_names)}
        return np.array([index[record.class_name] for record in self.images], dtype=np.int64)

    @property
    def groups(self) -> np.ndarray:
        """Group id of every readable image: near-duplicates share one id, other images get their own."""
        group_of_path = {path: k for k, group in enumerate(self.near_duplicate_groups) for path in group}
        ids: dict[tuple[str, int], int] = {}
        out = np.empty(len(self.images), dtype=np.int64)
        for i, record in enumerate(self.images):
            key = ("group", group_of_path[record.path]) if record.path in group_of_path else ("image", i)
            out[i] = ids.setdefault(key, len(ids))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON document the CLI prints for a scan."""
        return {
            "root": self.root,
            "n_images": self.n_images,
            "classes": self.class_counts,
            "unreadable": [{"path": r.path, "reason": r.error} for r in self.unreadable],
            "duplicate_groups": [list(group) for group in self.duplicate_groups],
            "near_duplicate_groups": [list(group) for group in self.near_duplicate_groups],
        }


def scan_dataset(
    data_dir: str | os.PathLike[str],
    *,
    use_cache: bool = True,
    progress: bool = False,
    near_duplicate_distance: int = NEAR_DUPLICATE_DISTANCE,
    allow_single_class: bool = False,
) -> ScanResult:
    """Scan ``data_dir/<Class>/*`` for images; raise :class:`DataError` when the folder cannot be used."""
    if (
        isinstance(near_duplicate_distance, bool)
        or not isinstance(near_duplicate_distance, int)
        or not (0 <= near_duplicate_distance <= DHASH_SIZE * DHASH_SIZE)
    ):
        raise ConfigError(
            f"near_duplicate_distance must be an integer from 0 to {DHASH_SIZE * DHASH_SIZE}, "
            f"got {near_duplicate_distance!r}"
        )
    root_path = _resolve_root(data_dir)
    files = _list_files(root_path)

    cache_file = _cache_file(root_path) if use_cache else None
    cached = _read_cache(cache_file) if cache_file is not None else {}
    stats = {path: os.stat(path) for _, path in files}
    todo = [path for _, path in files if _cache_key(stats[path]) != tuple(cached.get(path, {}).get("key", ()))]

    fresh: dict[str, dict[str, Any]] = {}
    if todo:
        workers = min(8, os.cpu_count() or 1, len(todo))
        with (
            ThreadPoolExecutor(max_workers=workers) as pool,
            tqdm(total=len(todo), disable=not progress, file=sys.stderr, desc="Scanning images", unit="img") as bar,
        ):
            for path, info in zip(todo, pool.map(_read_file, todo)):
                fresh[path] = {"key": list(_cache_key(stats[path])), **info}
                bar.update()
    entries = {path: fresh.get(path) or cached[path] for _, path in files}
    if cache_file is not None and (fresh or set(cached) != set(entries)):
        _write_cache(cache_file, root_path, entries)

    records = [_record(path, class_name, entries[path]) for class_name, path in files]
    images = [r for r in records if r.readable]
    unreadable = tuple(r for r in records if not r.readable)
    if not images:
        raise DataError(f"{root_path}: none of the {len(records)} image files could be read")
    class_names = tuple(sorted({r.class_name for r in images}))
    if len(class_names) < 2 and not allow_single_class:
        raise DataError(f"{root_path}: needs at least two classes with readable images, found only {class_names[0]!r}")
    images.sort(key=lambda r: (r.class_name, r.path))
    return ScanResult(
        root=str(root_path),
        images=tuple(images),
        unreadable=unreadable,
        class_names=class_names,
        duplicate_groups=exact_duplicate_groups(images),
        near_duplicate_groups=near_duplicate_groups(images, near_duplicate_distance),
    )


def folder_signature(data_dir: str | os.PathLike[str]) -> str:
    """A digest of the folder's image files (paths, sizes, modification times): it changes whenever a scan
    of the folder could; cheap (no file is read), so callers can key their own caches on it."""
    entries = []
    for _, path in _list_files(_resolve_root(data_dir)):
        with contextlib.suppress(OSError):  # removed since it was listed: leave it out, as a scan would
            st = os.stat(path)
            entries.append((path, *_cache_key(st)))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _resolve_root(root: str | os.PathLike[str]) -> Path:
    """The dataset folder as an absolute path (``~`` expanded); DataError for a path that cannot be one."""
    try:
        return Path(root).expanduser().resolve()
    except (RuntimeError, ValueError, OSError) as exc:  # ~nosuchuser, a NUL byte, a loop of links
        raise DataError(f"dataset folder {_shown(root)} cannot be used: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """The system's reason without the path it repeats (``File name too long``), else the exception's text."""
    return getattr(exc, "strerror", None) or short_reason(exc)


def _shown(root: str | os.PathLike[str]) -> str:
    text = repr(str(root))
    return text if len(text) <= 80 else text[:77] + "..."


def _list_files(root: Path) -> list[tuple[str, str]]:
    """(class name, absolute path) of every supported, non-hidden file in root's class subfolders."""
    try:
        return _listed_files(root)
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, no permission
        raise DataError(f"dataset folder {_shown(root)} cannot be read: {_reason(exc)}") from exc


def _listed_files(root: Path) -> list[tuple[str, str]]:
    if not root.exists():
        raise DataError(f"dataset folder does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"dataset path is not a folder: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root} is empty: no class subfolders (expected {root}/<Class>/<image>)")
    files = [
        (class_dir.name, str(path))
        for class_dir in class_dirs
        for path in sorted(class_dir.iterdir())
        if not path.name.startswith(".") and path.suffix.lower() in SUPPORTED_EXTENSIONS and path.is_file()
    ]
    if not files:
        raise DataError(
            f"{root} is empty: no supported image files ({', '.join(SUPPORTED_EXTENSIONS)}) in its class subfolders"
        )
    return files


def _read_file(path: str) -> dict[str, Any]:
    """Hash and fully decode one file; the result is what the cache stores."""
    info: dict[str, Any] = {"md5": "", "size": 0, "width": 0, "height": 0, "mode": "", "error": None, "dhash": None}
    try:
        data = read_image_bytes(path)  # refused unread when too large
    except ImageLoadError as exc:
        info["error"] = str(exc)
        return info
    info["md5"] = hashlib.md5(data).hexdigest()
    info["size"] = len(data)
    try:
        img = decode_stored(data)
    except ImageLoadError as exc:
        info["error"] = str(exc)
        return info
    info["width"], info["height"] = img.size
    info["mode"] = img.mode
    gray = img.convert("L")
    info["dhash"] = gradient_hash(gray) + "".join(map(gradient_hash, turned_and_mirrored(gray)))
    return info


def _record(path: str, class_name: str, info: dict[str, Any]) -> ImageRecord:
    return ImageRecord(
        path=path,
        class_name=class_name,
        md5=info["md5"],
        size_bytes=info["size"],
        width=info["width"],
        height=info["height"],
        mode=info["mode"],
        readable=info["error"] is None,
        error=info["error"],
        dhash=info["dhash"],
    )


def _cache_key(st: os.stat_result) -> tuple[int, int]:
    return (st.st_size, st.st_mtime_ns)


def _cache_file(root: Path) -> Path:
    digest = hashlib.sha256(str(root).encode("utf-8")).hexdigest()[:24]
    return settings.cache_dir() / "scan" / f"{digest}.json"


def _read_cache(cache_file: Path) -> dict[str, dict[str, Any]]:
    """Per-file entries from the cache file; a missing or corrupt file gives an empty cache."""
    try:
        doc = json.loads(cache_file.read_text(encoding="utf-8"))
        files = doc["files"] if doc.get("format") == _CACHE_FORMAT else {}
        return {path: entry for path, entry in files.items() if _valid_entry(entry)}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _valid_entry(entry: Any) -> bool:
    """Whether a cache entry has every field, with every view's full-length dhash exactly when it is readable."""
    required = {"key", "md5", "size", "width", "height", "mode", "error", "dhash"}
    if not isinstance(entry, dict) or not required <= entry.keys():
        return False
    dhash = entry["dhash"]
    readable = entry["error"] is None
    return not readable or (isinstance(dhash, str) and len(dhash) == N_VIEWS * DHASH_SIZE * DHASH_SIZE // 4)


def _write_cache(cache_file: Path, root: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Write the cache atomically; failing to write only warns."""
    doc = {"format": _CACHE_FORMAT, "root": str(root), "files": entries}
    try:
        atomic_write_text(cache_file, json.dumps(doc, separators=(",", ":")))
    except OSError as exc:
        warnings.warn(f"could not write the scan cache {cache_file}: {exc}", RuntimeWarning, stacklevel=3)


def twin_root(data_dir: str | os.PathLike) -> Path | None:
    """For ``.../Original`` return ``.../Segmented`` (and back) when that twin folder exists."""
    folder = Path(data_dir)
    if folder.name not in TWIN_FOLDERS:
        return None
    other = folder.parent / TWIN_FOLDERS[1 - TWIN_FOLDERS.index(folder.name)]
    return other if other.is_dir() else None


def twin_of(path: str | os.PathLike, data_dir: str | os.PathLike) -> Path | None:
    """The same file (``<Class>/<name>``) in the twin folder of ``data_dir``, when it exists."""
    other = twin_root(data_dir)
    if other is None:
        return None
    candidate = other / Path(path).resolve().relative_to(Path(data_dir).resolve())
    return candidate if candidate.is_file() else None
