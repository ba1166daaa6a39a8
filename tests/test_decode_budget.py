"""A decode budget read from headers, archive records found as zipfile finds them, inert CSV cells, and upload
sizes checked before reading: each hostile file is refused fast, without decoding a pixel."""

from __future__ import annotations

import csv
import io
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers import subprocess_env
from PIL import Image, ImageFile, WebPImagePlugin

from bcd_engine.data import images
from bcd_engine.data.archives import read_archive
from bcd_engine.data.images import DecodeBudget, decode_image, read_header
from bcd_engine.errors import ArchiveError, ImageLoadError
from bcd_engine.inference import diagnosis
from bcd_engine.inference.results import Diagnosis, Reading

BOMB_SIDE = 7000  # 49 megapixels: under Pillow's and the engine's general limits, over an upload's
FAST_SECONDS = 1.0
PYTHON_PEAK_BYTES = 5 * 2**20  # what Python may allocate while refusing; a 7000 x 7000 decode is 147-196 MB
RSS_GROWTH_BYTES = 40 * 2**20


def _save(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(), mode)


def _jpeg_declaring(data: bytes, side: int) -> bytes:
    """A JPEG's bytes with its frame header (SOF0 or SOF2) declaring side x side pixels."""
    frame = next(data.index(marker) for marker in (b"\xff\xc0", b"\xff\xc2") if marker in data)
    return data[: frame + 5] + struct.pack(">HH", side, side) + data[frame + 9 :]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def truncated_jpeg() -> bytes:
    """3 KB: a 64 x 64 JPEG's header changed to declare 7000 x 7000, its data cut short."""
    return _jpeg_declaring(_save(_noise((64, 64)), "JPEG", quality=95), BOMB_SIDE)[:3000]


def lossless_webp() -> bytes:
    """About 2 KB: a black 7000 x 7000 lossless WebP."""
    return _save(Image.new("RGB", (BOMB_SIDE, BOMB_SIDE)), "WEBP", lossless=True)


def rgba_png() -> bytes:
    """About 200 KB: a complete transparent 7000 x 7000 RGBA PNG (zeros compress well)."""
    rows = zlib.compressobj(9)
    row = bytes(1 + 4 * BOMB_SIDE)
    idat = b"".join(rows.compress(row) for _ in range(BOMB_SIDE)) + rows.flush()
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def many_scans_jpeg(scans: int = 30_000) -> bytes:
    """About 1 MB: a 64 x 64 progressive JPEG whose first scan is repeated ``scans`` times (a small image: only
    the scan count can refuse it)."""
    data = _save(_noise((64, 64)), "JPEG", progressive=True, quality=95)
    first = data.index(b"\xff\xda")
    second = data.index(b"\xff\xda", first + 2)
    next_table = data.rfind(b"\xff\xc4", first, second)  # a scan's Huffman tables may come right before it
    scan = data[first : next_table if next_table > 0 else second]
    return data[:first] + scan * scans + data[first:]


BOMBS: dict[str, Callable[[], bytes]] = {
    "truncated JPEG declaring 7000 x 7000": truncated_jpeg,
    "lossless WebP of 7000 x 7000": lossless_webp,
    "RGBA PNG of 7000 x 7000": rgba_png,
    "progressive JPEG of 30,000 scans": many_scans_jpeg,
}
REASONS = {
    "truncated JPEG declaring 7000 x 7000": "7000 x 7000 pixels (49.0 megapixels); the limit is 20 megapixels",
    "lossless WebP of 7000 x 7000": "7000 x 7000 pixels (49.0 megapixels); the limit is 20 megapixels",
    "RGBA PNG of 7000 x 7000": "7000 x 7000 pixels (49.0 megapixels); the limit is 20 megapixels",
    "progressive JPEG of 30,000 scans": "a JPEG of more than 100 scans",
}


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {kind: make() for kind, make in BOMBS.items()}


@contextmanager
def no_pixel_decoded(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail if Pillow decodes any pixel in the block (every format's decoding starts in ``load``; WebP's own)."""
    decoded = []

    def refuse(self: Image.Image) -> None:
        decoded.append(self.format)
        raise RuntimeError("no pixel may be decoded here")

    with monkeypatch.context() as patch:
        for image_class in (ImageFile.ImageFile, WebPImagePlugin.WebPImageFile):
            patch.setattr(image_class, "load", refuse)
        yield
    assert decoded == [], f"pixels were decoded: {decoded}"


class FakeUpload:
    """An uploaded file as the page hands it over (Streamlit's UploadedFile): name, size, getvalue."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name, self.size, self._data, self.reads = name, len(data), data, 0

    def getvalue(self) -> bytes:
        self.reads += 1
        return self._data


@pytest.mark.parametrize("kind", list(BOMBS))
def test_a_bomb_is_refused_from_its_header_fast_and_without_decoding(
    kind: str, bombs: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bombs[kind]
    read_header(_save(_noise((16, 16)), "PNG"))  # Pillow's plugins imported before the clock starts
    tracemalloc.start()
    started = time.perf_counter()
    with no_pixel_decoded(monkeypatch):
        sources, rejected = diagnosis.upload_sources([FakeUpload("cell.jpg", data)])
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sources == []
    [refusal] = rejected
    assert REASONS[kind] in refusal.error and "\n" not in refusal.error
    assert elapsed < FAST_SECONDS, f"{kind}: refused in {elapsed:.2f} s"
    assert peak < PYTHON_PEAK_BYTES, f"{kind}: {peak / 2**20:.1f} MB allocated while refusing"


def test_bombs_raise_a_fresh_processs_memory_by_a_few_megabytes_at_most(
    bombs: dict[str, bytes], tmp_path: Path
) -> None:
    """Memory Pillow and libjpeg/libwebp allocate in C is invisible to tracemalloc: the peak resident size of a
    process that reads every bomb's header is measured instead."""
    for i, data in enumerate(bombs.values()):
        (tmp_path / f"{i}.bin").write_bytes(data)
    script = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from bcd_engine.data.images import DecodeBudget, read_header\n"
        "from bcd_engine.errors import ImageLoadError\n"
        "files = [p.read_bytes() for p in sorted(Path(sys.argv[1]).glob('*.bin'))]\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "refused = 0\n"
        "for data in files:\n"
        "    try:\n"
        "        DecodeBudget(20_000_000, 250_000_000).charge(read_header(data))\n"
        "    except ImageLoadError:\n"
        "        refused += 1\n"
        "print(refused, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env=subprocess_env(),
        timeout=120,
    ).stdout.split()
    assert int(out[0]) == len(bombs)
    assert int(out[1]) < RSS_GROWTH_BYTES, f"resident memory grew {int(out[1]) / 2**20:.0f} MB"


def test_a_bomb_inside_an_archive_is_refused_alone_before_decoding(
    bombs: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    cell = _save(_noise((64, 64)), "PNG")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:  # stored: a bomb's ratio is not what refuses it
        zf.writestr("cell.png", cell)
        zf.writestr("bomb.jpg", bombs["truncated JPEG declaring 7000 x 7000"])
        zf.writestr("scans.jpg", bombs["progressive JPEG of 30,000 scans"])
    with no_pixel_decoded(monkeypatch):
        sources, rejected = diagnosis.upload_sources([FakeUpload("batch.zip", archive.getvalue())])
    assert rejected == []
    assert [(s.name, s.data is None) for s in sources] == [
        ("batch.zip/cell.png", False),
        ("batch.zip/bomb.jpg", True),
        ("batch.zip/scans.jpg", True),
    ]
    assert "the limit is 20 megapixels" in sources[1].error and "more than 100 scans" in sources[2].error


@pytest.mark.parametrize("size", [(2592, 1944), (224, 224)])
@pytest.mark.parametrize("options", [{}, {"progressive": True}], ids=["baseline", "progressive"])
def test_a_real_smear_photo_passes_and_decodes(size: tuple[int, int], options: dict) -> None:
    data = _save(_noise(size), "JPEG", quality=90, **options)
    sources, rejected = diagnosis.upload_sources([FakeUpload("smear.jpg", data)])
    assert rejected == [] and [s.name for s in sources] == ["smear.jpg"]
    assert decode_image(sources[0].data).size == size


def test_frames_stated_in_the_header_count() -> None:
    frames = [_noise((64, 64), seed=i) for i in range(3)]
    for fmt in ("WEBP", "PNG"):
        animated = _save(frames[0], fmt, save_all=True, append_images=frames[1:])
        header = read_header(animated)
        assert (header.frames, header.pixels) == (3, 3 * 64 * 64)
        with pytest.raises(ImageLoadError, match=r"64 x 64 pixels x 3 frames .* the limit is 0.01 megapixels"):
            DecodeBudget(max_image_pixels=10_000, max_total_pixels=10**9).charge(header)
        DecodeBudget(max_image_pixels=10_000, max_total_pixels=10**9).charge(read_header(_save(frames[0], fmt)))


def test_the_uploads_pixel_total_joins_its_byte_and_file_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    cell = _save(_noise((64, 64)), "PNG")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.png", cell)
        zf.writestr("b.png", cell)
    with no_pixel_decoded(monkeypatch):
        sources, rejected = diagnosis.upload_sources(
            [FakeUpload("one.png", cell), FakeUpload("batch.zip", archive.getvalue()), FakeUpload("two.png", cell)],
            max_pixels=2 * 64 * 64,
        )
    assert [(s.name, s.error is None) for s in sources] == [
        ("one.png", True),
        ("batch.zip/a.png", True),
        ("batch.zip/b.png", False),
    ]
    assert "would pass the 0.008192 megapixels one upload may decode (0.0 already)" in sources[2].error
    assert [r.name for r in rejected] == ["two.png"]


def test_a_jpeg_of_too_many_segments_is_refused_before_pillow_reads_them() -> None:
    data = _save(_noise((16, 16)), "JPEG")
    comments = data[:2] + b"\xff\xfe\x00\x02" * 2_000_000 + data[2:]  # 8 MB of empty comments: 7 s in Pillow
    started = time.perf_counter()
    with pytest.raises(ImageLoadError, match="more than 1000 segments"):
        read_header(comments)
    assert time.perf_counter() - started < FAST_SECONDS


def test_a_jpeg_with_restart_markers_stuffed_bytes_and_thumbnails_passes() -> None:
    """Within a scan FF00, RSTn and fill bytes are not markers, and a thumbnail's scans are inside its segment."""
    photo = _noise((256, 256))
    exif = Image.Exif()
    thumbnail = _save(_noise((32, 32), seed=1), "JPEG")
    exif[0x010E] = "smear"
    data = _save(photo, "JPEG", quality=100, progressive=True, restart_marker_blocks=1, exif=exif.tobytes())
    data = data[:2] + b"\xff\xe1" + struct.pack(">H", 2 + len(thumbnail)) + thumbnail + data[2:]
    assert b"\xff\x00" in data and b"\xff\xd0" in data
    assert read_header(data).format == "JPEG"
    assert decode_image(data).size == (256, 256)


def test_the_scan_limit_is_inclusive() -> None:
    own_scans = _save(_noise((64, 64)), "JPEG", progressive=True, quality=95).count(b"\xff\xda")  # 10
    assert read_header(many_scans_jpeg(scans=images.MAX_JPEG_SCANS - own_scans)).width == 64
    with pytest.raises(ImageLoadError, match="more than 100 scans"):
        read_header(many_scans_jpeg(scans=images.MAX_JPEG_SCANS - own_scans + 1))


def fake_record_zip(entries: int) -> bytes:
    """A central directory of ``entries`` one-letter entries, closed by an end record whose directory offset
    field reads ``PK\\x05\\x06``: a search from the end finds a (cut-off) record inside the real one."""
    entry = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"a"
    directory = entry * entries
    return directory + struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, len(directory), int.from_bytes(b"PK\x05\x06", "little"), 0
    )


def test_a_fake_record_in_the_end_records_fields_does_not_hide_the_directory_size() -> None:
    data = fake_record_zip(100_000)
    assert len(zipfile.ZipFile(io.BytesIO(fake_record_zip(3))).infolist()) == 3  # zipfile reads the real record
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ArchiveError, match=r"too many entries \(up to 102,173 by its directory\)"):
        read_archive(data)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < FAST_SECONDS and peak < 2**20  # zipfile would build 100,000 ZipInfo objects first
    nested = io.BytesIO()
    with zipfile.ZipFile(nested, "w") as zf:
        zf.writestr("inner.zip", data)
    contents = read_archive(nested.getvalue(), max_ratio=10_000)
    assert contents.skipped == (
        (
            "inner.zip",
            "nested archive not expanded: too many entries (up to 102,173 by its directory); the limit is 1000 files",
        ),
    )


def test_a_zip_with_a_comment_is_still_read() -> None:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cell.png", _save(_noise((16, 16)), "PNG"))
        zf.comment = b"made by the microscope"
    assert [name for name, _ in read_archive(archive.getvalue()).images] == ["cell.png"]


def test_csv_cells_that_a_spreadsheet_would_run_are_made_text() -> None:
    names = ['=HYPERLINK("http://x")', "+1", "-2", "@SUM(A1)", "\tcell", "\rcell", "cell.png", "a\r=1+1.png"]
    results = [Diagnosis.unusable(name, "corrupt") for name in names]
    results.append(
        Diagnosis(
            name="ok.png",
            predicted_class="-Pro",
            reading=Reading.OK,
            in_domain=True,
            ood_score=-3.5,
            uncertainty={"confidence": 0.9, "margin": -0.0, "disagreement": 0.0},
            calibrated_probabilities={"Pro": 0.9},
        )
    )
    rows = list(csv.DictReader(io.StringIO(diagnosis.results_csv(results).decode(), newline="")))
    assert [row["image"] for row in rows] == ["'" + name for name in names[:6]] + names[6:] + ["ok.png"]
    assert rows[-1]["predicted_class"] == "'-Pro"
    assert (rows[-1]["ood_score"], rows[-1]["margin"]) == ("-3.5", "-0.0")  # numbers stay numbers


def test_an_uploads_size_is_checked_before_its_bytes_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    cell = _save(_noise((64, 64)), "PNG")
    monkeypatch.setattr(diagnosis, "MAX_ARCHIVE_UPLOAD_BYTES", 10 * len(cell))
    uploads = [FakeUpload("a.png", cell), FakeUpload("b.png", cell), FakeUpload("huge.zip", cell * 11)]
    sources, rejected = diagnosis.upload_sources(uploads, max_total_bytes=len(cell) + 1)
    assert [s.name for s in sources] == ["a.png"]
    assert [r.name for r in rejected] == ["b.png", "huge.zip"]
    assert "the upload would hold more than" in rejected[0].error and "the limit is" in rejected[1].error
    assert [u.reads for u in uploads] == [1, 0, 0]
