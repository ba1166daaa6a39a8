"""Decoding one image safely, and loading many for a model.

The format is told from the content, never the name; sizes (and a JPEG's scans) are checked from the header
before pixels are decoded, and :func:`read_header` reads only the header, for a decode budget;
every failure is an :class:`~bcd_engine.errors.ImageLoadError` with a short reason.
:func:`load_image` is the one loader the rest of the engine uses; :func:`load_images` loads a batch
into one uint8 array with all cores.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bcd_engine.errors import (
    ConfigError,
    ImageLoadError,
)
from bcd_engine.progress import progress_bar

# Files a folder scan picks up:
SUPPORTED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP")  # what load_image decodes, told by content
MAX_FILE_BYTES = 50 * 2**20  # larger files are refused before they are read
MAX_IMAGE_PIXELS = 50_000_000  # checked from the header, before any pixel is decoded
MIN_IMAGE_SIDE = 8  # smallest width and height load_image resizes for a model
# Each scan is one more pass of the decoder over the whole image: libjpeg's progressive script writes 10 (6 for
# grey), a baseline JPEG has 1 to 3, hand-tuned scripts a few dozen at most; 1 MB repeating a tiny scan 30,000
# times decodes for minutes. Checked by walking the file's segments, before Pillow reads them.
MAX_JPEG_SCANS = 100
# Segments before and between scans (APPn, DQT, DHT, SOS, ...): a photo has a few dozen, even with a long ICC
# profile in 64 KB pieces; Pillow reads each one in Python (8 MB of empty comments: 7 s to open).
MAX_JPEG_SEGMENTS = 1000
_FRAMES_IN_HEADER = ("WEBP", "PNG", "MPO")  # formats whose header states the frame count (GIF and TIFF do not)
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RST0-7 have no length field
_JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # in a scan, FF00 is a stuffed byte, RSTn and FF fill stay
_MAX_REASON_CHARS = 160
_CONVERT_BAND_PIXELS = 2**18  # pixels per band when a 16-bit or float image is brought to 8 bits
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
    return _to_rgb(decode_stored(data))


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


def read_image_bytes(path: str | os.PathLike[str]) -> bytes:
    """A file's bytes (ImageLoadError when unreadable); files over MAX_FILE_BYTES are refused before reading,
    and so is anything that is not a regular file (a pipe named ``.jpg`` would otherwise block the reader)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # opening a pipe must not wait for a writer
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ImageLoadError("not a regular file (a pipe, device or socket)")
            _check_file_size(st.st_size)
            data = fh.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ImageLoadError(f"cannot read file ({short_reason(exc)})") from exc
    _check_file_size(len(data))
    return data


def _check_file_size(n_bytes: int) -> None:
    if n_bytes > MAX_FILE_BYTES:
        raise ImageLoadError(f"file too large: {format_size(n_bytes)}; the limit is {format_size(MAX_FILE_BYTES)}")


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header declares: its format, size and frame count (only the first frame is ever decoded)."""

    format: str
    width: int
    height: int
    frames: int

    @property
    def pixels(self) -> int:
        """Width x height x frames."""
        return self.width * self.height * self.frames


@dataclass
class DecodeBudget:
    """Pixels that one upload may have decoded: per image and in all, charged from each header before decoding."""

    max_image_pixels: int
    max_total_pixels: int
    pixels_used: int = 0

    def charge(self, header: ImageHeader) -> None:
        """Count the image's pixels (all its frames); ImageLoadError when it passes either limit."""
        frames = f" x {header.frames} frames" if header.frames > 1 else ""
        size = f"{header.width} x {header.height} pixels{frames} ({header.pixels / 1e6:,.1f} megapixels)"
        if header.pixels > self.max_image_pixels:
            raise ImageLoadError(
                f"too large to decode here: {size}; the limit is {self.max_image_pixels / 1e6:g} megapixels per image"
            )
        if self.pixels_used + header.pixels > self.max_total_pixels:
            raise ImageLoadError(
                f"{size} would pass the {self.max_total_pixels / 1e6:g} megapixels one upload may "
                f"decode ({self.pixels_used / 1e6:,.1f} already); refused"
            )
        self.pixels_used += header.pixels


def read_header(data: bytes) -> ImageHeader:
    """Image bytes identified and checked as :func:`decode_stored` does, without decoding a pixel.

    Frames are counted where the header states them (animated WebP and PNG, multi-picture JPEG); GIF and TIFF
    state none (Pillow counts them by walking every frame, seconds for a hostile file) and count as one.
    """
    img = _open_checked(data)
    frames = img.n_frames if img.format in _FRAMES_IN_HEADER else 1
    return ImageHeader(img.format, *img.size, frames)


def decode_stored(data: bytes) -> Image.Image:
    """Identify image bytes by content, check their size (and a JPEG's scans) from the header, then decode the
    first frame.

    Raise ImageLoadError with a short reason; never anything else, whatever the bytes.
    """
    img = _open_checked(data)
    with _pillow_errors():
        img.load()
    return img


def _open_checked(data: bytes) -> Image.Image:
    """The image's header parsed by Pillow once its bytes, format, JPEG structure and pixel count are checked."""
    if not data:
        raise ImageLoadError("empty file (0 bytes)")
    _check_file_size(len(data))
    fmt = detect_image_format(data)
    if fmt is None:
        hint = _looks_like(data)
        raise ImageLoadError("not a recognised image format" + (f" (looks like {hint})" if hint else ""))
    if fmt == "JPEG":
        _check_jpeg_segments(data)
    with _pillow_errors():
        img = _open_header(data, fmt)
    _check_pixels(img.size)
    return img


@contextlib.contextmanager
def _pillow_errors() -> Iterator[None]:
    """Whatever Pillow raises, as an ImageLoadError with a short reason."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"too large to decode safely ({short_reason(exc)})") from exc
    except UnidentifiedImageError as exc:  # Pillow's parser for the format refused the header
        raise ImageLoadError("not a recognised image format") from exc
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...)
        raise ImageLoadError(f"corrupt or truncated image ({short_reason(exc)})") from exc


def _check_jpeg_segments(data: bytes) -> None:
    """Refuse a JPEG with more than MAX_JPEG_SCANS scans or MAX_JPEG_SEGMENTS segments, counted by walking its
    segments (a scan's coded data is skipped to the next marker) without decoding; the walk stops at the end of
    the image, at the first limit passed, or where the structure breaks (the decoder then says why)."""
    scans = segments = 0
    pos = 2  # after the start-of-image marker
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xD9:  # end of image
            return
        if marker == 0xFF or marker in _JPEG_STANDALONE_MARKERS:  # a fill byte, or a marker without a length
            pos += 1 if marker == 0xFF else 2
            continue
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise ImageLoadError(
                f"too costly to decode: a JPEG of more than {MAX_JPEG_SEGMENTS} segments (a photo has a few dozen)"
            )
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: its coded data runs to the next marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ImageLoadError(
                    f"too costly to decode: a JPEG of more than {MAX_JPEG_SCANS} scans "
                    "(a progressive photo has about 10)"
                )
            scan_end = _JPEG_SCAN_END.search(data, pos)
            if scan_end is None:
                return
            pos = scan_end.start()


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
    """Upright RGB copy of a freshly decoded image (changed in place): 16-bit and float scaled to 8 bits,
    transparency on white.

    At most one full-size copy is made beside the decoded image (and its alpha band when it has one): a
    20-megapixel RGBA image costs about 180 MB here, not the 400 MB of converting through RGBA composites.
    """
    with contextlib.suppress(Exception):  # a broken EXIF block only loses the orientation; the pixels are fine
        ImageOps.exif_transpose(img, in_place=True)
    try:
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            img = _grey_to_8_bit(img)
        if img.has_transparency_data:
            if img.mode not in ("RGBA", "LA"):  # the modes Pillow pastes onto RGB as they are
                img = img.convert("RGBA")  # a palette or a transparent colour: its alpha made explicit
            rgb = Image.new("RGB", img.size, (255, 255, 255))
            rgb.paste(img, mask=img.getchannel("A"))
            return rgb
        return img.convert("RGB")
    except Exception as exc:  # e.g. a TIFF colour mode Pillow cannot convert
        raise ImageLoadError(f"cannot convert colour mode {img.mode} to RGB ({short_reason(exc)})") from exc


def _grey_to_8_bit(img: Image.Image) -> Image.Image:
    """Mode L copy of a 16-bit, 32-bit or float grey image.

    16-bit modes span 0..65535; 32-bit integers and floats are read as 8-bit or 16-bit by their
    largest value (floats up to 1.0 as 0..1), wider ranges are scaled by their maximum.

    The pixels are converted a band of rows at a time, so memory beyond the image as stored and its 8-bit
    copy stays within a few megabytes whatever the image's size (never a full-size float64 copy).
    """
    arr = np.asarray(img)  # as stored: uint16, int32 or float32
    rows = max(1, _CONVERT_BAND_PIXELS // max(1, arr.shape[1]))
    bands = [slice(start, start + rows) for start in range(0, len(arr), rows)]

    def finite(band: slice) -> np.ndarray:
        return np.nan_to_num(arr[band].astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)

    top = max((float(finite(band).max(initial=0.0)) for band in bands), default=0.0)
    if img.mode.startswith("I;16"):
        full_scale = 65535.0
    elif img.mode == "F" and top <= 1.0:
        full_scale = 1.0
    else:
        full_scale = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    out = np.empty(arr.shape, dtype=np.uint8)
    for band in bands:
        out[band] = np.clip(np.rint(finite(band) * (255.0 / full_scale)), 0, 255)
    return Image.fromarray(out, "L")


def format_size(n_bytes: int) -> str:
    """``"51.5 MB"``, ``"60 MB"``; under a megabyte ``"12,000 bytes"``."""
    if n_bytes < 2**20:
        return f"{n_bytes:,} bytes"
    return f"{n_bytes / 2**20:,.1f}".removesuffix(".0") + " MB"


def short_reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


def load_images(paths, *, image_size: int, progress: bool = False, description: str = "loading") -> np.ndarray:
    """Decode and resize images into one uint8 array (n, size, size, 3), using all cores."""
    from concurrent.futures import ThreadPoolExecutor

    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    with progress_bar(len(paths), description, enabled=progress) as bar, ThreadPoolExecutor(os.cpu_count()) as pool:
        for i, image in enumerate(pool.map(lambda p: load_image(p, image_size=image_size), paths)):
            out[i] = image
            bar.update(1)
    return out
