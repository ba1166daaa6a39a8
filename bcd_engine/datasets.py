"""Scanning a dataset folder (one subfolder per class) and loading images.

:func:`scan_dataset` reads every image once, records its md5, size, mode and a 16x16 gradient
hash, sorts out files that do not decode, and groups exact and near duplicates so that splits
can keep each group on one side. Per-file results are cached, so re-scanning an unchanged
folder is near-instant. :func:`load_image` is the one loader the rest of the engine uses.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from bcd_engine import settings
from bcd_engine.errors import ConfigError, DataError, ImageLoadError

SUPPORTED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")  # files a folder scan picks up
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP")  # what load_image decodes, told by content
MAX_FILE_BYTES = 50 * 2**20  # larger files are refused before they are read
MAX_IMAGE_PIXELS = 50_000_000  # checked from the header, before any pixel is decoded
MIN_IMAGE_SIDE = 8  # smallest width and height load_image resizes for a model

DHASH_SIZE = 16
NEAR_DUPLICATE_DISTANCE = 12  # dhash bits; reproduces the ALL dataset's published near-duplicate groups
_CACHE_FORMAT = 4
_MAX_REASON_CHARS = 160
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)
_NOT_IMAGE_PREFIXES = (
    (b"<!doctype html", "an HTML page"),
    (b"<html", "an HTML page"),
    (b"<?xml", "an XML document"),
    (b"<svg", "an SVG drawing"),
    (b"%pdf", "a PDF document"),
    (b"%!ps", "a PostScript file"),
    (b"pk\x03\x04", "a zip archive"),
)
_WARNINGS_LOCK = threading.Lock()
_QUARTER_TURNS = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
_VIEWS = 8  # dihedral views hashed per image, so a flipped or turned copy is still a near-duplicate
_VIEW_BASE = 4 * (DHASH_SIZE + 1)  # pixels a side of the reduced copy the turned and mirrored views come from


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
    root: str | os.PathLike[str],
    *,
    use_cache: bool = True,
    progress: bool = False,
    near_duplicate_distance: int = NEAR_DUPLICATE_DISTANCE,
    allow_single_class: bool = False,
) -> ScanResult:
    """Scan ``root/<Class>/*`` for images; raise :class:`DataError` when the folder cannot be used."""
    if isinstance(near_duplicate_distance, bool) or not isinstance(near_duplicate_distance, int) or not (
        0 <= near_duplicate_distance <= DHASH_SIZE * DHASH_SIZE
    ):
        raise ConfigError(
            f"near_duplicate_distance must be an integer from 0 to {DHASH_SIZE * DHASH_SIZE}, "
            f"got {near_duplicate_distance!r}"
        )
    root_path = Path(root).expanduser().resolve()
    files = _list_files(root_path)

    cache_file = _cache_file(root_path) if use_cache else None
    cached = _read_cache(cache_file) if cache_file is not None else {}
    stats = {path: os.stat(path) for _, path in files}
    todo = [path for _, path in files if _cache_key(stats[path]) != tuple(cached.get(path, {}).get("key", ()))]

    fresh: dict[str, dict[str, Any]] = {}
    if todo:
        workers = min(8, os.cpu_count() or 1, len(todo))
        with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
            total=len(todo), disable=not progress, file=sys.stderr, desc="Scanning images", unit="img"
        ) as bar:
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
        raise DataError(
            f"{root_path}: needs at least two classes with readable images, found only {class_names[0]!r}"
        )
    images.sort(key=lambda r: (r.class_name, r.path))
    return ScanResult(
        root=str(root_path),
        images=tuple(images),
        unreadable=unreadable,
        class_names=class_names,
        duplicate_groups=_duplicate_groups(images),
        near_duplicate_groups=_near_duplicate_groups(images, near_duplicate_distance),
    )


def load_image(path_or_bytes: str | os.PathLike[str] | bytes, *, image_size: int | None = None) -> np.ndarray:
    """Decode an image file (or its bytes) to a uint8 RGB array, optionally resized to image_size x image_size.

    The format is told from the content, never the name: PNG, JPEG, BMP, TIFF, GIF and WebP are read
    (first frame), upright by their EXIF orientation. Any other input, including corrupt, truncated,
    oversized (:data:`MAX_FILE_BYTES`, :data:`MAX_IMAGE_PIXELS`) files and, when resizing for a model,
    images under :data:`MIN_IMAGE_SIDE` pixels, raises :class:`ImageLoadError` with the reason.

    >>> load_image("smear.jpg", image_size=224).shape  # doctest: +SKIP
    (224, 224, 3)
    """
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    is_bytes = isinstance(path_or_bytes, (bytes, bytearray, memoryview))
    name = "image bytes" if is_bytes else str(path_or_bytes)
    try:
        data = bytes(path_or_bytes) if is_bytes else read_image_bytes(path_or_bytes)
        return image_array(decode_image(data), image_size=image_size)
    except ImageLoadError as exc:
        raise ImageLoadError(f"{name}: {exc}") from exc


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes as :func:`load_image` does, to an upright RGB image; errors carry only the reason.

    Decode once and call :func:`image_array` per size when one image feeds models of different sizes.
    """
    return _to_rgb(_decode(data))


def image_array(img: Image.Image, *, image_size: int | None = None) -> np.ndarray:
    """A decoded RGB image as a uint8 array, resized to image_size x image_size when given.

    Raises :class:`ImageLoadError` when resizing an image under :data:`MIN_IMAGE_SIDE` pixels.
    """
    if image_size is not None:
        _check_min_side(img.size)
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.array(img, dtype=np.uint8)


def detect_image_format(data: bytes) -> str | None:
    """The supported format (one of :data:`IMAGE_FORMATS`) that ``data`` starts with, or None.

    >>> detect_image_format(b"GIF89a...")
    'GIF'
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)


def folder_signature(root: str | os.PathLike[str]) -> str:
    """A digest of the folder's image files (paths, sizes, modification times): it changes whenever a scan
    of the folder could; cheap (no file is read), so callers can key their own caches on it."""
    entries = []
    for _, path in _list_files(Path(root).expanduser().resolve()):
        with contextlib.suppress(OSError):  # removed since it was listed: leave it out, as a scan would
            st = os.stat(path)
            entries.append((path, *_cache_key(st)))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _list_files(root: Path) -> list[tuple[str, str]]:
    """(class name, absolute path) of every supported, non-hidden file in root's class subfolders."""
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
        data = Path(path).read_bytes()
    except OSError as exc:
        info["error"] = f"cannot read file ({_short(exc)})"
        return info
    info["md5"] = hashlib.md5(data).hexdigest()
    info["size"] = len(data)
    try:
        img = _decode(data)
    except ImageLoadError as exc:
        info["error"] = str(exc)
        return info
    info["width"], info["height"] = img.size
    info["mode"] = img.mode
    gray = img.convert("L")
    info["dhash"] = _gradient_hash(gray) + "".join(map(_gradient_hash, _turned_and_mirrored(gray)))
    return info


def _turned_and_mirrored(img: Image.Image) -> list[Image.Image]:
    """The seven other views: turned by 90, 180 and 270 degrees, and all four mirrored.

    They are made from a copy reduced to _VIEW_BASE pixels a side (the hash is 17 x 16 pixels anyway),
    so a large image costs one extra resize rather than seven full-size turns.
    """
    if max(img.size) > _VIEW_BASE:
        img = img.resize((_VIEW_BASE, _VIEW_BASE), Image.Resampling.BILINEAR)
    turns = [img, *(img.transpose(t) for t in _QUARTER_TURNS)]
    return turns[1:] + [view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for view in turns]


def _gradient_hash(img: Image.Image) -> str:
    """16x16 horizontal-gradient hash (dhash) as hex, resized bilinearly.

    Bilinear rather than imagehash.dhash's Lanczos resize: it reproduces the near-duplicate groups
    published with the ALL dataset's MANIFEST exactly (Lanczos moves 4 of its 71 pairs across the
    distance threshold).
    """
    small = np.asarray(img.convert("L").resize((DHASH_SIZE + 1, DHASH_SIZE), Image.Resampling.BILINEAR),
                       dtype=np.int16)
    return str(imagehash.ImageHash(small[:, 1:] > small[:, :-1]))


def read_image_bytes(path: str | os.PathLike[str]) -> bytes:
    """A file's bytes (ImageLoadError when unreadable); files over MAX_FILE_BYTES are refused before reading."""
    try:
        with open(path, "rb") as fh:
            _check_file_size(os.fstat(fh.fileno()).st_size)
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ImageLoadError(f"cannot read file ({_short(exc)})") from exc
    _check_file_size(len(data))
    return data


def _check_file_size(n_bytes: int) -> None:
    if n_bytes > MAX_FILE_BYTES:
        raise ImageLoadError(f"file too large: {_format_size(n_bytes)}; the limit is {_format_size(MAX_FILE_BYTES)}")


def _decode(data: bytes) -> Image.Image:
    """Identify image bytes by content, check their size from the header, then decode the first frame.

    Raise ImageLoadError with a short reason; never anything else, whatever the bytes.
    """
    if not data:
        raise ImageLoadError("empty file (0 bytes)")
    _check_file_size(len(data))
    fmt = detect_image_format(data)
    if fmt is None:
        hint = _looks_like(data)
        raise ImageLoadError("not a recognised image format" + (f" (looks like {hint})" if hint else ""))
    try:
        img = _open_header(data, fmt)
        _check_pixels(img.size)
        img.load()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"too large to decode safely ({_short(exc)})") from exc
    except UnidentifiedImageError as exc:  # Pillow's parser for the format refused the header
        raise ImageLoadError("not a recognised image format") from exc
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...)
        raise ImageLoadError(f"corrupt or truncated image ({_short(exc)})") from exc
    return img


def _open_header(data: bytes, fmt: str) -> Image.Image:
    """Parse the header only, with Pillow's decompression-bomb warnings raised as errors.

    ``catch_warnings`` swaps the process-wide filter list, so a lock keeps concurrent loads from
    restoring each other's filters. Pixel decoding (``load``) runs outside the lock: before it starts,
    the header's size is checked against MAX_IMAGE_PIXELS, below Pillow's default warning threshold.
    """
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data), formats=(fmt,))


def _check_pixels(size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageLoadError(
            f"too large to decode safely: {width} x {height} pixels ({width * height / 1e6:.1f} megapixels); "
            f"the limit is {MAX_IMAGE_PIXELS / 1e6:g} megapixels"
        )


def _check_min_side(size: tuple[int, int]) -> None:
    width, height = size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageLoadError(
            f"image too small: {width} x {height} pixels; the minimum is {MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE}"
        )


def _looks_like(data: bytes) -> str | None:
    """A guess at what non-image bytes are, for the error message."""
    head = data[:256].lstrip().lower()
    return next((what for prefix, what in _NOT_IMAGE_PREFIXES if head.startswith(prefix)), None)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Upright RGB copy of a decoded image: 16-bit and float scaled to 8 bits, transparency on white."""
    with contextlib.suppress(Exception):  # a broken EXIF block only loses the orientation; the pixels are fine
        img = ImageOps.exif_transpose(img)
    try:
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            img = _grey_to_8_bit(img)
        if img.has_transparency_data:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except Exception as exc:  # e.g. a TIFF colour mode Pillow cannot convert
        raise ImageLoadError(f"cannot convert colour mode {img.mode} to RGB ({_short(exc)})") from exc


def _grey_to_8_bit(img: Image.Image) -> Image.Image:
    """Mode L copy of a 16-bit, 32-bit or float grey image.

    16-bit modes span 0..65535; 32-bit integers and floats are read as 8-bit or 16-bit by their
    largest value (floats up to 1.0 as 0..1), wider ranges are scaled by their maximum.
    """
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(arr.max(initial=0.0))
    if img.mode.startswith("I;16"):
        full_scale = 65535.0
    elif img.mode == "F" and top <= 1.0:
        full_scale = 1.0
    else:
        full_scale = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    return Image.fromarray(np.clip(np.rint(arr * (255.0 / full_scale)), 0, 255).astype(np.uint8), "L")


def _format_size(n_bytes: int) -> str:
    """``"51.5 MB"``, ``"60 MB"``; under a megabyte ``"12,000 bytes"``."""
    if n_bytes < 2**20:
        return f"{n_bytes:,} bytes"
    return f"{n_bytes / 2**20:,.1f}".removesuffix(".0") + " MB"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


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


def _duplicate_groups(images: list[ImageRecord]) -> tuple[tuple[str, ...], ...]:
    """Paths of readable images with equal md5, in image order, groups ordered by first member."""
    by_md5: dict[str, list[str]] = {}
    for record in images:
        by_md5.setdefault(record.md5, []).append(record.path)
    return tuple(tuple(paths) for paths in by_md5.values() if len(paths) > 1)


def _near_duplicate_groups(images: list[ImageRecord], max_distance: int) -> tuple[tuple[str, ...], ...]:
    """Union-find over pairs within max_distance bits in some flip or turn (exact duplicates included)."""
    n = len(images)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    def union(pairs: Iterable[tuple[int, int]]) -> None:
        for a, b in pairs:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)

    union(_close_pairs(_hash_words(images), max_distance))
    first_of_md5: dict[str, int] = {}
    union((first_of_md5.setdefault(r.md5, i), i) for i, r in enumerate(images))

    members: dict[int, list[str]] = {}
    for i, record in enumerate(images):
        members.setdefault(find(i), []).append(record.path)
    return tuple(tuple(paths) for _, paths in sorted(members.items()) if len(paths) > 1)


def near_copies(records: Sequence[ImageRecord], of: Sequence[ImageRecord],
                max_distance: int = NEAR_DUPLICATE_DISTANCE, block: int = 512) -> list[bool]:
    """For each readable record, whether it is an exact or near-duplicate (in some flip or turn) of one in ``of``."""
    close = np.zeros(len(records), dtype=bool)
    if records and of:
        mine, theirs = _hash_words(list(records)), _hash_words(list(of))
        for start in range(0, len(mine), block):  # a record as stored near a view of one in ``of``
            near = _view_distances(mine[start : start + block], theirs) <= max_distance
            close[start : start + block] |= near.any(axis=1)
        for start in range(0, len(theirs), block):  # or one in ``of`` as stored near a view of the record
            close |= (_view_distances(theirs[start : start + block], mine) <= max_distance).any(axis=0)
    return close.tolist()


def _hash_words(images: list[ImageRecord]) -> np.ndarray:
    """The readable images' view dhashes as an (n, views, words) uint64 bit array."""
    n_bytes = DHASH_SIZE * DHASH_SIZE // 8
    raw = b"".join(bytes.fromhex(r.dhash or "") for r in images)
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(images), _VIEWS, n_bytes).view(np.uint64)


def _close_pairs(words: np.ndarray, max_distance: int, block: int = 512) -> set[tuple[int, int]]:
    """Index pairs (i < j) where i as stored is within max_distance bits of some view of j (or j of i)."""
    pairs: set[tuple[int, int]] = set()
    for start in range(0, len(words), block):
        ii, jj = np.nonzero(_view_distances(words[start : start + block], words) <= max_distance)
        ii += start
        pairs.update((min(i, j), max(i, j)) for i, j in zip(ii.tolist(), jj.tolist()) if i != j)
    return pairs


def _view_distances(rows: np.ndarray, words: np.ndarray) -> np.ndarray:
    """(len(rows), len(words)) uint16: bits between each of ``rows`` as stored and the nearest view of each
    of ``words``, summed word by word (far faster than one popcount-and-sum over a 3-D array)."""
    stored = rows[:, 0, :]
    nearest = np.full((len(rows), len(words)), np.iinfo(np.uint16).max, dtype=np.uint16)
    for view in range(_VIEWS):
        distance = np.zeros_like(nearest)
        for word in range(words.shape[2]):
            distance += _popcount(stored[:, None, word] ^ words[None, :, view, word])
        np.minimum(nearest, distance, out=nearest)
    return nearest


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element (numpy >= 2 has a native ufunc; older numpy counts bytes)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1)


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
    return not readable or (isinstance(dhash, str) and len(dhash) == _VIEWS * DHASH_SIZE * DHASH_SIZE // 4)


def _write_cache(cache_file: Path, root: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Write the cache atomically (temp file + os.replace); failing to write only warns."""
    doc = {"format": _CACHE_FORMAT, "root": str(root), "files": entries}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=cache_file.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, separators=(",", ":"))
            os.replace(tmp, cache_file)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        warnings.warn(f"could not write the scan cache {cache_file}: {exc}", RuntimeWarning, stacklevel=3)
