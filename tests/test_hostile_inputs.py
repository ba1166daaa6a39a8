"""Hostile and odd files for the shared image loader: it reads what it can and refuses the rest.

Every file is built here; none is committed. ``load_image`` must return a uint8 H x W x 3 array or
raise ImageLoadError (ConfigError only for a bad ``image_size``), whatever the bytes.
"""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import subprocess_env
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bcd_engine.data.images import (
    MAX_FILE_BYTES,
    MIN_IMAGE_SIDE,
    detect_image_format,
    load_image,
)
from bcd_engine.errors import ImageLoadError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
UNKNOWN = "not a recognised image format"


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR chunk is patched (CRC included) to declare width x height."""
    data = bytearray(_encode(Image.new("RGB", (8, 8)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, BLUE)]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], **_lossless(fmt))


def _lossless(fmt: str) -> dict[str, object]:
    return {"lossless": True} if fmt == "WEBP" else {}


def _truncated(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    return data[: len(data) // 2]


def _left_red_right_blue() -> Image.Image:
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(RED, (0, 0, 20, 20))
    return img


def _is(pixel: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> bool:
    return bool(np.abs(pixel.astype(int) - colour).max() <= tolerance)


# --- refused, with the reason ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_bytes", "reason"),
    [
        (lambda: b"", r"empty file \(0 bytes\)"),
        (lambda: _truncated("JPEG"), r"corrupt or truncated image \(.*truncated"),
        (lambda: _truncated("PNG"), r"corrupt or truncated image"),
        (lambda: b"<!DOCTYPE html>\n<html><body>Not Found</body></html>", rf"{UNKNOWN} \(looks like an HTML page\)$"),
        (lambda: b"  <html><head></head></html>", rf"{UNKNOWN} \(looks like an HTML page\)$"),
        (lambda: b"just some notes about a smear\n", rf"{UNKNOWN}$"),
        (lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", rf"{UNKNOWN} \(looks like a PDF document\)$"),
        (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", rf"{UNKNOWN} \(looks like a PostScript file\)$"),
        (lambda: _encode(Image.new("RGB", (8, 8)), "PPM"), rf"{UNKNOWN}$"),
        (lambda: _encode(Image.new("RGB", (8, 8)), "PNG")[:40], rf"{UNKNOWN}$"),
        (lambda: _png_declaring(0, 8), rf"{UNKNOWN}$"),
        (
            lambda: _png_declaring(10_000, 6_000),
            r"too large to decode safely: 10000 x 6000 pixels \(60\.0 megapixels\); the limit is 50 megapixels$",
        ),
        (lambda: _png_declaring(100_000, 100_000), r"too large to decode safely \(Image size \(10000000000 pixels\)"),
    ],
    ids=[
        "empty",
        "truncated-jpeg",
        "truncated-png",
        "html",
        "html-indented",
        "text",
        "pdf",
        "postscript",
        "ppm",
        "png-header-only",
        "zero-width",
        "60-megapixels",
        "decompression-bomb",
    ],
)
def test_hostile_file_named_jpg_is_refused(tmp_path: Path, make_bytes: Callable[[], bytes], reason: str) -> None:
    path = tmp_path / "smear.jpg"
    path.write_bytes(make_bytes())
    with pytest.raises(ImageLoadError, match=rf"^{re.escape(str(path))}: {reason}"):
        load_image(path)


def test_pillows_bomb_warning_is_an_error_inside_the_loader_only() -> None:
    """100 megapixels is past Pillow's warning threshold and under its error threshold."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        with pytest.raises(ImageLoadError, match=r"too large to decode safely \(Image size \(100000000 pixels\)"):
            load_image(_png_declaring(10_000, 10_000))
        assert warnings.filters == filters
    assert caught == []


def test_concurrent_loads_keep_the_warning_filters() -> None:
    """Threads switching as often as possible neither lose a filter nor let a bomb warning out."""
    small = _encode(Image.new("RGB", (8, 8), RED), "PNG")
    sources = [_png_declaring(10_000, 10_000), small] * 200

    def outcome(data: bytes) -> str:
        try:
            return str(load_image(data)[0, 0].tolist())
        except ImageLoadError:
            return "refused"

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            filters = list(warnings.filters)
            with ThreadPoolExecutor(max_workers=8) as pool:
                outcomes = list(pool.map(outcome, sources))
            assert warnings.filters == filters
    finally:
        sys.setswitchinterval(interval)
    assert outcomes == ["refused", "[255, 0, 0]"] * 200
    assert caught == []


def test_file_over_the_size_cap_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    with path.open("wb") as fh:
        fh.truncate(60 * 2**20)  # sparse: nothing is written, and the loader must not read it either
    with pytest.raises(ImageLoadError, match=rf"^{re.escape(str(path))}: file too large: 60 MB; the limit is 50 MB$"):
        load_image(path)
    with pytest.raises(ImageLoadError, match=r"^image bytes: file too large: 51\.5 MB; the limit is 50 MB$"):
        load_image(b"\x89PNG\r\n\x1a\n" + bytes(MAX_FILE_BYTES + 3 * 2**19))


def test_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=rf"^{re.escape(str(tmp_path))}: cannot read file"):
        load_image(tmp_path)


def test_tiny_image_is_refused_for_a_model_but_shown_as_it_is() -> None:
    tiny = _encode(Image.new("RGB", (MIN_IMAGE_SIDE - 1, 30), RED), "PNG")
    with pytest.raises(ImageLoadError, match=r"^image bytes: image too small: 7 x 30 pixels; the minimum is 8 x 8$"):
        load_image(tiny, image_size=224)
    assert load_image(tiny).shape == (30, 7, 3)
    smallest = _encode(Image.new("RGB", (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE), RED), "PNG")
    assert load_image(smallest, image_size=224).shape == (224, 224, 3)


# --- read, correctly ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"])
def test_format_comes_from_the_content_not_the_name(tmp_path: Path, fmt: str) -> None:
    data = _encode(Image.new("RGB", (12, 10), RED), fmt, **_lossless(fmt))
    assert detect_image_format(data) == fmt
    path = tmp_path / ("smear.png" if fmt != "PNG" else "smear.jpg")
    path.write_bytes(data)
    arr = load_image(path)
    assert arr.shape == (10, 12, 3) and _is(arr[5, 6], RED)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_is_converted(fmt: str) -> None:
    arr = load_image(_encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), fmt))
    assert arr.dtype == np.uint8 and _is(arr[8, 8], RED)


@pytest.mark.parametrize(
    ("values", "fmt", "grey"),
    [
        (np.full((16, 16), 32768, np.uint16), "TIFF", 128),  # 16-bit mid-grey stays mid-grey
        (np.full((16, 16), 32768, np.uint16), "PNG", 128),
        (np.full((16, 16), 1028, np.uint16), "PNG", 4),  # a dark 16-bit image is not stretched
        (np.full((16, 16), 40000, np.int32), "TIFF", 156),  # 32-bit holding 16-bit values
        (np.full((16, 16), 0.5, np.float32), "TIFF", 128),  # float in 0..1
        (np.full((16, 16), 200.0, np.float32), "TIFF", 200),  # float in 0..255
    ],
)
def test_high_bit_depth_grey_is_scaled_not_clipped(values: np.ndarray, fmt: str, grey: int) -> None:
    arr = load_image(_encode(Image.fromarray(values), fmt))
    assert arr.shape == (16, 16, 3) and (arr == grey).all()


def test_a_large_16_bit_image_is_brought_to_8_bits_without_full_size_float_copies() -> None:
    """A 16-bit 3000 x 3000 grey image (18 MB as stored) once took several float64 copies (72 MB each)."""
    values = np.random.default_rng(0).integers(0, 65536, (3000, 3000), dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    expected = np.clip(np.rint(values.astype(np.float64) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    tracemalloc.start()
    try:
        arr = load_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(arr[..., 0], expected)  # the same pixels as the one-shot conversion gave
    # The decoded image as stored, its 8-bit copy, the RGB result and one band: well under one float64 copy more.
    assert peak < values.nbytes + 5 * expected.nbytes + 8 * 2**20, f"peak {peak / 2**20:.0f} MB"


def test_a_large_transparent_image_is_put_on_white_with_one_full_size_copy(tmp_path: Path) -> None:
    """A 20-megapixel RGBA PNG (80 MB decoded) once took more full-size RGBA copies on its way to RGB (+238 MB here).

    Pillow allocates in C, out of tracemalloc's sight: a fresh process's peak resident growth is measured instead.
    """
    image = Image.new("RGBA", (5000, 4000), (200, 100, 50, 128))
    image.putpixel((0, 0), (0, 0, 0, 0))
    (tmp_path / "big.png").write_bytes(_encode(image, "PNG"))
    del image
    script = (
        "import json, resource, sys\n"
        "from bcd_engine.data.images import decode_image\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "rgb = decode_image(data)\n"
        "grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024\n"
        "print(json.dumps([rgb.mode, rgb.getpixel((0, 0)), rgb.getpixel((1, 0)), grew]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "big.png")],
        capture_output=True,
        text=True,
        check=True,
        env=subprocess_env(),
        timeout=120,
    ).stdout
    mode, transparent, half, grew = json.loads(out)
    assert mode == "RGB" and transparent == [255, 255, 255] and _is(np.array(half), (228, 178, 153), tolerance=1), out
    assert grew < 20_000_000 * (4 + 4 + 1) + 24 * 2**20, f"grew {grew / 2**20:.0f} MB"


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF"])
def test_animation_or_multi_page_gives_the_first_frame(fmt: str) -> None:
    arr = load_image(_animated(fmt))
    assert arr.shape == (8, 8, 3) and _is(arr[4, 4], RED, tolerance=0)


@pytest.mark.parametrize(
    ("orientation", "shape", "red_at", "blue_at"),
    [
        (1, (20, 40, 3), (10, 5), (10, 35)),
        (2, (20, 40, 3), (10, 35), (10, 5)),  # mirrored
        (3, (20, 40, 3), (10, 35), (10, 5)),  # upside down
        (6, (40, 20, 3), (5, 10), (35, 10)),  # to be turned 90 degrees clockwise: the left half goes on top
        (8, (40, 20, 3), (35, 10), (5, 10)),  # counter-clockwise: the left half goes to the bottom
    ],
)
def test_exif_orientation_is_applied(
    orientation: int, shape: tuple[int, int, int], red_at: tuple[int, int], blue_at: tuple[int, int]
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    arr = load_image(_encode(_left_red_right_blue(), "JPEG", exif=exif, quality=95))
    assert arr.shape == shape and _is(arr[red_at], RED) and _is(arr[blue_at], BLUE)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_broken_exif_keeps_the_pixels() -> None:
    arr = load_image(_encode(_left_red_right_blue(), "JPEG", exif=b"Exif\x00\x00MM\x00*garbage", quality=95))
    assert arr.shape == (20, 40, 3) and _is(arr[10, 5], RED)


def _palette_with_transparent_index() -> Image.Image:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, *RED])
    img.paste(1, (0, 0, 4, 8))
    img.info["transparency"] = 0
    return img


@pytest.mark.parametrize(
    ("make_image", "fmt", "left", "right"),
    [
        (lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 128)), "PNG", (255, 127, 127), (255, 127, 127)),
        (lambda: Image.new("LA", (8, 8), (0, 0)), "PNG", WHITE, WHITE),
        (lambda: Image.new("LA", (8, 8), (0, 255)), "PNG", (0, 0, 0), (0, 0, 0)),
        (_palette_with_transparent_index, "PNG", RED, WHITE),
        (_palette_with_transparent_index, "GIF", RED, WHITE),
    ],
    ids=["rgba-half-transparent", "la-transparent", "la-opaque", "palette-png", "palette-gif"],
)
def test_transparency_is_composited_on_white(
    make_image: Callable[[], Image.Image], fmt: str, left: tuple[int, int, int], right: tuple[int, int, int]
) -> None:
    arr = load_image(_encode(make_image(), fmt))
    assert _is(arr[4, 1], left, tolerance=1) and _is(arr[4, 6], right, tolerance=1)


# --- fuzzing: an array or ImageLoadError, nothing else -------------------------------------------------


def _valid_samples() -> list[bytes]:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        _encode(rgb, "PNG"),
        _encode(rgb.convert("P"), "PNG", transparency=0),
        _encode(rgb, "JPEG", exif=exif),
        _encode(rgb, "JPEG", progressive=True),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb, "BMP"),
        _encode(rgb.convert("1"), "BMP"),
        _encode(rgb, "TIFF", compression="tiff_deflate"),
        _encode(Image.fromarray(rng.integers(0, 65536, (10, 12), dtype=np.uint16)), "TIFF"),
        _animated("GIF"),
        _animated("WEBP"),
    ]


VALID_SAMPLES = _valid_samples()
SIGNATURES = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WEBP",
]


@st.composite
def _mutated_images(draw: st.DrawFn) -> bytes:
    """A valid sample with a few bytes flipped, overwritten, inserted or deleted, or cut short."""
    data = bytearray(draw(st.sampled_from(VALID_SAMPLES)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        if edit == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "overwrite":
            data[at : at + 4] = draw(st.binary(min_size=1, max_size=4))
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


def _array_or_image_load_error(data: bytes, image_size: int | None) -> None:
    try:
        arr = load_image(data, image_size=image_size)
    except ImageLoadError:
        return
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and min(arr.shape[:2]) >= 1
    if image_size is not None:
        assert arr.shape == (image_size, image_size, 3)


FUZZ = settings(max_examples=200, deadline=None, database=None)
fuzz_warnings = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")


@fuzz_warnings
@FUZZ
@given(data=st.binary(max_size=2048), image_size=st.sampled_from([None, 16]))
def test_fuzz_random_bytes(data: bytes, image_size: int | None) -> None:
    _array_or_image_load_error(data, image_size)


@fuzz_warnings
@FUZZ
@given(signature=st.sampled_from(SIGNATURES), rest=st.binary(max_size=512), image_size=st.sampled_from([None, 16]))
def test_fuzz_random_bytes_behind_an_image_signature(signature: bytes, rest: bytes, image_size: int | None) -> None:
    _array_or_image_load_error(signature + rest, image_size)


@fuzz_warnings
@FUZZ
@given(data=_mutated_images(), image_size=st.sampled_from([None, 16]))
def test_fuzz_mutated_valid_images(data: bytes, image_size: int | None) -> None:
    _array_or_image_load_error(data, image_size)
