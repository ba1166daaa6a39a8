"""Hostile uploads on the Diagnose page's path: what each of issue 23's hostile inputs costs bcd now.

Each case is generated here (into a temporary folder) and measured in a fresh Python process, through the
engine entry points the Diagnose page uses: ``diagnosis.upload_sources`` on stand-ins of Streamlit's uploaded
files (``name``, ``size``, ``getvalue()``, reads counted), then ``Diagnoser.diagnose_steps`` in steps of
``service.STEP_IMAGES`` images, as the page queues it, with a stand-in model that answers at once (no
TensorFlow): so every image the page would decode is decoded and resized to 224 x 224, and nothing else runs.
The child measures the time of both and its peak resident memory growth (the high-water mark ``VmHWM`` of
/proc/self/status, reset just before the call, minus the resident size then); the files' own bytes are read
into the stand-ins before that, as Streamlit holds an upload before the page runs (column "held").

Cases (the "before" figures are quoted from issue 23, measured before its fixes):

1. a 3 KB JPEG whose header declares 7000 x 7000, its data truncated;
2. a 2 KB lossless WebP of 7000 x 7000;
3. a 200 KB RGBA PNG of 7000 x 7000;
4. a thousand of those PNGs in one zip of about 3 MB;
5. a 64 x 64 progressive JPEG repeating one scan 30,000 times (about 1 MB);
6. a zip whose end-of-central-directory record holds ``PK\\x05\\x06`` in its offset field, so that a search from
   the end finds a fake record: the issue's 197 MB (4.2 million entries) and the largest under the upload limit;
7. five files of 190 MB in one upload (stand-ins that declare their size and make their bytes only if read);
8. the worst mix within the limits: one zip under the upload limit whose members fill the upload's byte budget,
   the first a 20-megapixel RGBA PNG with transparency (the costliest decode per pixel), decoded first while
   every other member's bytes are still held; and that first image alone, as one upload (8b);
9. fair shares, at the engine level (from 127.0.0.1 every Streamlit session is its own visitor, so a server
   could not show one visitor's many tabs): one visitor submits 32 jobs to an ``InferenceQueue`` with the
   server's limits, of one image each (32 tabs: 9a) or of 1,000 images each (32 thousand-image zips: 9b), then
   another visitor one image; each step is a 0.5 s sleep standing in for one model step of STEP_IMAGES images.

    python benchmarks/bench_hostile_uploads.py [--quick] [--json]

``--quick`` makes cases 4, 6 and 8 smaller (100 PNGs, 200,000 entries only, 2 filler members) for a short run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BOMB_SIDE = 7000  # 49 megapixels, as in the issue
IMAGE_SIZE = 224  # what a ResNet50 demo run resizes each image to
CHILD_TIMEOUT_S = 150
FAST_S = 1.0  # a refusal from the header: tests/test_decode_budget.py's bound
SMALL_GROWTH_MB = 40  # the same test's bound on a refusing process's growth
GOAL_GROWTH_MB = 500  # issue 23: any mix of uploads raises the server's resident memory by at most this
FAIR_STEP_S = 0.5  # one step of the stand-in job on the fair-share queue
FAIR_JOBS = 32
FAIR_MARGIN_S = 0.5  # beyond the two steps, for the thread's hand-over on a loaded machine
FAIR_CASES = {"9a": 1, "9b": 1000}  # one visitor's 32 tabs of one image each; 32 thousand-image zips
FAKE_RECORD_ISSUE_BYTES = 197 * 10**6  # the issue's fake-record zip
THOUSAND_PADDING = 2000  # random bytes per PNG in case 4: the zip deflates each about 60 times, as in the issue
DECLARED_FILE_BYTES = 190 * 2**20
DECLARED_FILES = 5
MB = 2**20


# -- the hostile files ------------------------------------------------------------------------------------------------
def _save(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(), mode)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def truncated_jpeg() -> bytes:
    """3,000 bytes: a 64 x 64 JPEG whose frame header declares 7000 x 7000, its data cut short."""
    data = _save(_noise((64, 64)), "JPEG", quality=95)
    frame = data.index(b"\xff\xc0")
    return (data[: frame + 5] + struct.pack(">HH", BOMB_SIDE, BOMB_SIDE) + data[frame + 9 :])[:3000]


def lossless_webp() -> bytes:
    """About 2 KB: a black 7000 x 7000 lossless WebP."""
    return _save(Image.new("RGB", (BOMB_SIDE, BOMB_SIDE)), "WEBP", lossless=True)


def rgba_png(padding: int = 0) -> bytes:
    """About 200 KB: a complete, transparent 7000 x 7000 RGBA PNG (zeros compress well); with ``padding`` random
    bytes in a private chunk after the pixels, so that a zip compresses it less than 100 times (the engine's
    limit on a member's ratio)."""
    rows = zlib.compressobj(9)
    row = bytes(1 + 4 * BOMB_SIDE)
    idat = b"".join(rows.compress(row) for _ in range(BOMB_SIDE)) + rows.flush()
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 6, 0, 0, 0)
    private = _png_chunk(b"prVt", np.random.default_rng(0).bytes(padding)) if padding else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + private
        + _png_chunk(b"IEND", b"")
    )


def many_scans_jpeg(scans: int = 30_000) -> bytes:
    """About 1 MB: a 64 x 64 progressive JPEG whose first scan is repeated ``scans`` times."""
    data = _save(_noise((64, 64)), "JPEG", progressive=True, quality=95)
    first = data.index(b"\xff\xda")
    second = data.index(b"\xff\xda", first + 2)
    next_table = data.rfind(b"\xff\xc4", first, second)  # a scan's Huffman tables may come right before it
    scan = data[first : next_table if next_table > 0 else second]
    return data[:first] + scan * scans + data[first:]


def zip_of(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED, level: int = 6) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression, compresslevel=level) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def fake_record_zip(entries: int) -> bytes:
    """A central directory of ``entries`` one-letter entries (47 bytes each), closed by an end record whose
    directory offset field reads ``PK\\x05\\x06`` (as tests/test_decode_budget.py builds it)."""
    entry = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"a"
    directory = entry * entries
    end = struct.pack(
        "<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, len(directory), int.from_bytes(b"PK\x05\x06", "little"), 0
    )
    return directory + end


def _rgba_with_transparency(width: int, height: int) -> bytes:
    """A width x height RGBA PNG whose alpha varies (so decoding composites it on white): a gradient and bands."""
    x = np.arange(width, dtype=np.uint32)[None, :]
    y = np.arange(height, dtype=np.uint32)[:, None]
    pixels = np.empty((height, width, 4), dtype=np.uint8)
    pixels[..., 0] = (x * 7 + y) % 256
    pixels[..., 1] = (y * 3) % 256
    pixels[..., 2] = (x ^ y) % 256
    pixels[..., 3] = (x + y * 5) % 256
    return _save(Image.fromarray(pixels, "RGBA"), "PNG", compress_level=1)


def _bulky_png(width: int, height: int, seed: int) -> bytes:
    """An RGB PNG of stored (uncompressed) rows, one byte in eight random: large, yet a zip deflates it to a
    fraction (within the engine's 100x ratio)."""
    flat = np.zeros(width * height * 3, dtype=np.uint8)
    flat[::8] = np.random.default_rng(seed).integers(0, 256, len(flat[::8]), dtype=np.uint8)
    return _save(Image.fromarray(flat.reshape(height, width, 3), "RGB"), "PNG", compress_level=0)


def largest_image_size() -> tuple[int, int]:
    """The largest 5:4 image (width, height) within the per-image pixel limit of an upload."""
    from bcd_engine.inference import diagnosis

    height = int((diagnosis.MAX_UPLOAD_IMAGE_PIXELS / 1.25) ** 0.5)
    return height * 5 // 4, height


def worst_mix(*, fillers: int) -> tuple[bytes, str]:
    """One zip under the upload limit whose members fill the upload's byte budget: first a 20-megapixel RGBA PNG
    with transparency, then up to ``fillers`` bulky 12-megapixel PNGs (36 MB each), as many as the budget holds."""
    from bcd_engine.inference import diagnosis

    width, height = largest_image_size()
    big = ("0-rgba-20mp.png", _rgba_with_transparency(width, height))
    bulky, members_bytes = [], len(big[1])
    for i in range(1, fillers + 1):  # as many as the members alone fit the budget (the zip's own bytes count too)
        filler = (f"{i}-bulky-12mp.png", _bulky_png(4000, 3000, seed=i))
        members_bytes += len(filler[1])
        if members_bytes > diagnosis.MAX_UPLOAD_TOTAL_BYTES:
            break
        bulky.append(filler)
    while True:
        members = [big, *bulky]
        data = zip_of(members, level=1)
        held = len(data) + sum(len(payload) for _, payload in members)  # the budget counts both
        if held <= diagnosis.MAX_UPLOAD_TOTAL_BYTES and len(data) <= diagnosis.MAX_ARCHIVE_UPLOAD_BYTES:
            break
        bulky.pop()
    pixels = width * height + 12_000_000 * len(bulky)
    what = (
        f"zip of {len(data) / MB:.1f} MB: a {width} x {height} RGBA PNG ({len(big[1]) / MB:.1f} MB) first, then "
        f"{len(bulky)} x 4000 x 3000 PNGs of {len(bulky[0][1]) / MB:.1f} MB; {held / MB:.0f} MB of the "
        f"{diagnosis.MAX_UPLOAD_TOTAL_BYTES // MB} MB budget, {pixels / 1e6:.0f} of "
        f"{diagnosis.MAX_UPLOAD_PIXELS / 1e6:g} megapixels, {len(members)} of {diagnosis.MAX_UPLOAD_FILES} files"
    )
    return data, what


# -- the cases --------------------------------------------------------------------------------------------------------
Files = list[tuple[str, bytes | int]]  # one upload: (name, its bytes, or only the size it declares)


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    before: str  # quoted from issue 23
    make: Callable[[bool], tuple[Files, str]]  # quick -> (the upload's files, what they are)


def _one(name: str, make: Callable[[], bytes]) -> Callable[[bool], tuple[Files, str]]:
    def files(quick: bool) -> tuple[Files, str]:
        data = make()
        return [(name, data)], f"{len(data):,} bytes"

    return files


def _thousand(quick: bool) -> tuple[Files, str]:
    png = rgba_png(padding=THOUSAND_PADDING)
    count = 100 if quick else 1000
    data = zip_of([(f"cell-{i:04d}.png", png) for i in range(count)])
    return [("cells.zip", data)], (
        f"{count} members of {len(png):,} bytes, {THOUSAND_PADDING:,} of them random; zip of {len(data) / MB:.1f} MB"
    )


def _fake_record(entries: int) -> Callable[[bool], tuple[Files, str]]:
    def files(quick: bool) -> tuple[Files, str]:
        data = fake_record_zip(entries)
        return [("batch.zip", data)], f"{entries:,} entries, {len(data):,} bytes"

    return files


def _declared(quick: bool) -> tuple[Files, str]:
    return (
        [(f"scan-{i}.tif", DECLARED_FILE_BYTES) for i in range(1, DECLARED_FILES + 1)],
        f"{DECLARED_FILES} stand-ins declaring {DECLARED_FILE_BYTES // MB} MB each",
    )


def _largest_image(quick: bool) -> tuple[Files, str]:
    width, height = largest_image_size()
    data = _rgba_with_transparency(width, height)
    return [("rgba-20mp.png", data)], f"{width} x {height} RGBA PNG, {len(data):,} bytes"


def _mix(quick: bool) -> tuple[Files, str]:
    data, what = worst_mix(fillers=2 if quick else 8)
    return [("worst-mix.zip", data)], what


def cases(quick: bool) -> list[Case]:
    from bcd_engine.inference import diagnosis

    largest_entries = (diagnosis.MAX_ARCHIVE_UPLOAD_BYTES - 22) // 47
    fake = [
        Case(
            "6a",
            "fake end record, the issue's size",
            "197 MB zip: 62 s, +1.85 GB",
            _fake_record(FAKE_RECORD_ISSUE_BYTES // 47),
        ),
        Case(
            "6b",
            "fake end record, largest under the upload limit",
            "(the issue's file was 197 MB)",
            _fake_record(200_000 if quick else largest_entries),
        ),
    ]
    return [
        Case(
            "1",
            "3 KB JPEG declaring 7000 x 7000, truncated",
            "accepted, 1.2 s, +375 MB",
            _one("cell.jpg", truncated_jpeg),
        ),
        Case("2", "2 KB lossless WebP of 7000 x 7000", "accepted, +750 MB", _one("cell.webp", lossless_webp)),
        Case("3", "200 KB RGBA PNG of 7000 x 7000", "accepted, 6 s, +935 MB", _one("cell.png", rgba_png)),
        Case("4", "a thousand such PNGs in one zip", "20-100 min of the inference thread", _thousand),
        Case(
            "5",
            "progressive JPEG repeating one scan 30,000 times",
            "minutes (another visitor's image: 146 s, not 15 s)",
            _one("scans.jpg", many_scans_jpeg),
        ),
        *(fake[1:] if quick else fake),
        Case("7", "five 190 MB files in one upload", "+2.6 GB (1.7 GB kept)", _declared),
        Case("8a", "worst mix within the limits, decoded step by step", "(goal: at most +500 MB)", _mix),
        Case("8b", "the worst mix's first image alone", "(what one decode costs)", _largest_image),
    ]


# -- the child process: one case, measured --------------------------------------------------------------------------
class StandInUpload:
    """An uploaded file as the page gets it from ``st.file_uploader``: ``name``, ``size`` and ``getvalue()``.

    It holds its bytes already, as Streamlit does; one that only declares a size makes its bytes when read.
    ``reads`` counts the ``getvalue()`` calls."""

    def __init__(self, name: str, size: int, data: bytes | None) -> None:
        self.name, self.size, self._data, self.reads = name, size, data, 0

    def getvalue(self) -> bytes:
        self.reads += 1
        return self._data if self._data is not None else bytes(self.size)


class StandInModel:
    """What ``Diagnoser`` asks of a loaded run, answering at once: uniform probabilities, no gate."""

    run_id = 0
    class_names = ("class a", "class b")
    config = SimpleNamespace(image_size=IMAGE_SIZE)
    trust = None
    synthetic = False

    def forward_with_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.full((len(images), 2), 0.5, np.float32), np.zeros((len(images), 1), np.float32)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_high_water_mark() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux 4.0+: VmHWM := VmRSS


def measure_case(manifest: Path) -> dict:
    """Run one case's uploads through upload_sources and diagnose_steps; time, memory and what happened."""
    from bcd_engine.data.images import decode_image, read_header
    from bcd_engine.inference import diagnosis
    from bcd_engine.inference.service import STEP_IMAGES

    specs = json.loads(manifest.read_text())
    uploads = [StandInUpload(s["name"], s["size"], Path(s["path"]).read_bytes() if s["path"] else None) for s in specs]
    held = sum(u.size for u in uploads if u._data is not None)
    warm = _save(_noise((32, 32), "RGBA"), "PNG")  # Pillow's plugins loaded before the measurement
    read_header(warm)
    decode_image(warm)
    decoded = []
    real_decode = diagnosis.decode_image
    diagnosis.decode_image = lambda data: decoded.append(len(data)) or real_decode(data)

    before_kb = _status_kb("VmRSS")
    _reset_high_water_mark()
    started = time.perf_counter()
    sources, rejected = diagnosis.upload_sources(uploads)
    read_s = time.perf_counter() - started
    member_errors = [s.error for s in sources if s.error is not None]
    steps = diagnosis.Diagnoser([StandInModel()]).diagnose_steps(
        sources, batch_size=STEP_IMAGES, keep_images=len(sources) == 1
    )
    accepted = len(sources)
    del sources
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            results = stop.value
            break
    elapsed = time.perf_counter() - started
    peak_kb = _status_kb("VmHWM")
    errors = [r.error for r in results]
    refused = [(r.name, r.error) for r in rejected]
    return {
        "files": len(uploads),
        "held_mb": held / MB,
        "reads": [u.reads for u in uploads],
        "refused_files": [error for _, error in refused],
        "refused_names": [name for name, _ in refused],
        "sources": accepted,
        "member_errors": member_errors,
        "decode_errors": [e for e in errors if e is not None and e not in member_errors],
        "decoded": sum(e is None for e in errors),
        "images_to_decoder": len(decoded),
        "read_s": read_s,
        "seconds": elapsed,
        "growth_mb": (peak_kb - before_kb) / 1024,
    }


def fair_share(images_per_job: int) -> dict:
    """One visitor's 32 jobs of ``images_per_job`` images, then another visitor's one image, on a queue with the
    server's limits; each step sleeps FAIR_STEP_S, standing in for one model step of STEP_IMAGES images."""
    from bcd_engine.errors import BusyError
    from bcd_engine.inference.service import STEP_IMAGES, InferenceQueue

    queue = InferenceQueue()
    running = threading.Event()

    def steps(images: int):
        total = -(-images // STEP_IMAGES)
        for done in range(1, total + 1):
            running.set()
            time.sleep(FAIR_STEP_S)
            yield done, total

    accepted, refusals = [], []
    for _ in range(FAIR_JOBS):
        try:
            accepted.append(queue.submit(steps(images_per_job), visitor="visitor A", images=images_per_job))
        except BusyError as exc:
            refusals.append(str(exc))
    running.wait(30)
    started = time.perf_counter()
    other_refused = None
    try:
        other = queue.submit(steps(1), visitor="visitor B", images=1)
        other_s = time.perf_counter() - started if other.wait(120) else None
    except BusyError as exc:
        other_refused, other_s = str(exc), time.perf_counter() - started
    for job in accepted:
        job.cancel()
    return {
        "images_per_job": images_per_job,
        "accepted": len(accepted),
        "refusals": refusals,
        "other_refused": other_refused,
        "other_s": other_s,
        "step_s": FAIR_STEP_S,
        "step_images": STEP_IMAGES,
    }


# -- the parent -------------------------------------------------------------------------------------------------------
def _child(*args: str) -> dict:
    try:
        done = subprocess.run(
            [sys.executable, __file__, *args], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"failed": f"did not finish in {CHILD_TIMEOUT_S} s"}
    if done.returncode != 0:
        return {"failed": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_case(case: Case, folder: Path, quick: bool) -> dict:
    log(f"case {case.key}: making the files")
    files, what = case.make(quick)
    specs = []
    for i, (name, data) in enumerate(files):
        if isinstance(data, int):
            specs.append({"name": name, "size": data, "path": None})
        else:
            path = folder / f"{case.key}-{i}.bin"
            path.write_bytes(data)
            specs.append({"name": name, "size": len(data), "path": str(path)})
    del files
    manifest = folder / f"{case.key}.json"
    manifest.write_text(json.dumps(specs))
    log(f"case {case.key}: measuring ({what})")
    measured = _child("--child", str(manifest))
    for spec in specs:
        if spec["path"]:
            Path(spec["path"]).unlink()
    return {"key": case.key, "case": case.title, "before": case.before, "what": what, **measured}


def outcome(row: dict) -> str:
    """What bcd did, in one cell: refused with its message, or accepted and what became of the images."""
    if "failed" in row:
        return f"FAILED: {row['failed']}"
    parts = []
    refused = row["refused_files"]
    if refused:
        count = "" if row["files"] == 1 else f" {len(refused)} of {row['files']} files"
        parts.append(f"refused{count}: “{refused[0]}”")
    if row["sources"]:
        members = row["member_errors"]
        parts.append(f"accepted {row['sources']} image(s)")
        if members:
            parts.append(f"{len(members)} refused from their header: “{members[0]}”")
        parts.append(f"{row['decoded']} decoded")
        if row["decode_errors"]:
            parts.append(f"{len(row['decode_errors'])} failed to decode: “{row['decode_errors'][0]}”")
    reads = sum(row["reads"])
    parts.append(f"getvalue() called for {reads} of {row['files']} file(s)")
    return "; ".join(parts)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict], fairs: dict[str, dict]) -> list[str]:
    lines = [
        "| # | case | before (quoted from issue 23) | after: what bcd does now | s | peak RSS growth | held by the "
        "uploader | images to the decoder |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "failed" in row:
            lines.append(
                f"| {row['key']} | {_cell(row['case'])} ({_cell(row['what'])}) | {_cell(row['before'])} | "
                f"{_cell(outcome(row))} | | | | |"
            )
            continue
        lines.append(
            f"| {row['key']} | {_cell(row['case'])} ({_cell(row['what'])}) | {_cell(row['before'])} | "
            f"{_cell(outcome(row))} | {row['seconds']:.2f} | +{row['growth_mb']:.0f} MB | {row['held_mb']:.1f} MB | "
            f"{row['images_to_decoder']} |"
        )
    for key, fair in fairs.items():
        title = (
            f"fair share: one visitor's {FAIR_JOBS} jobs of {FAIR_CASES[key]:,} image(s), then "
            f"another visitor's one image (engine level, {FAIR_STEP_S} s steps)"
        )
        before = "“the server is busy” within 0.5 s"
        if "failed" in fair:
            lines.append(f"| {key} | {title} | {before} | FAILED: {_cell(fair['failed'])} | | | | |")
        else:
            seconds = "" if fair["other_s"] is None else f"{fair['other_s']:.2f}"
            lines.append(f"| {key} | {title} | {before} | {_cell(fair_outcome(fair))} | {seconds} | | | |")
    return lines


def fair_outcome(fair: dict) -> str:
    first = f": “{fair['refusals'][0]}”" if fair["refusals"] else ""
    if fair["other_refused"]:
        other = f"the other visitor refused: “{fair['other_refused']}”"
    elif fair["other_s"] is None:
        other = "the other visitor's job not answered within 120 s"
    else:
        other = (
            f"the other visitor's image answered after {fair['other_s']:.2f} s: the step running when it came "
            f"and its own ({fair['other_s'] / fair['step_s']:.1f} steps)"
        )
    return f"{fair['accepted']} of {FAIR_JOBS} jobs queued, {len(fair['refusals'])} refused{first}; {other}"


def verdicts(rows: list[dict], fairs: dict[str, dict], *, quick: bool) -> list[str]:
    from bcd_engine.inference import diagnosis

    by_key = {row["key"]: row for row in rows}

    def refused_fast(keys: list[str], growth_mb: float = SMALL_GROWTH_MB) -> tuple[bool, str]:
        ok, figures = True, []
        for key in keys:
            row = by_key.get(key)
            if row is None:
                continue
            if "failed" in row:
                ok = False
                figures.append(f"{key}: failed")
                continue
            nothing_decoded = row["images_to_decoder"] == 0
            ok &= nothing_decoded and row["seconds"] < FAST_S and row["growth_mb"] < growth_mb
            figures.append(
                f"{key}: {row['seconds']:.2f} s, +{row['growth_mb']:.0f} MB"
                + ("" if nothing_decoded else f", {row['images_to_decoder']} decoded")
            )
        return ok, "; ".join(figures)

    def says(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    lines = []
    ok, figures = refused_fast(["1", "2", "3", "5"])
    lines.append(
        f"- Decode budget read from headers (cases 1, 2, 3 and 5 refused before any pixel is decoded, each "
        f"within {FAST_S:g} s and +{SMALL_GROWTH_MB} MB): {says(ok)} ({figures})"
    )
    budget_mb = diagnosis.MAX_UPLOAD_TOTAL_BYTES / MB
    ok, figures = refused_fast(["4"], growth_mb=budget_mb)
    lines.append(
        f"- A thousand bombs in one zip (case 4: every member refused before any pixel is decoded, within "
        f"{FAST_S:g} s; memory within the upload's byte budget of {budget_mb:.0f} MB, since the members are "
        f"expanded before their headers are read): {says(ok)} ({figures})"
    )
    ok, figures = refused_fast(["6a", "6b"])
    lines.append(
        f"- Archive records located as zipfile does (case 6 refused within {FAST_S:g} s and "
        f"+{SMALL_GROWTH_MB} MB): {says(ok)} ({figures})"
    )
    row = by_key["7"]
    ok = "failed" not in row and not any(row["reads"]) and row["growth_mb"] < SMALL_GROWTH_MB
    lines.append(
        f"- Memory charged before it is spent (case 7: no refused file read, +{SMALL_GROWTH_MB} MB at "
        f"most): {says(ok)}"
        + (
            ""
            if "failed" in row
            else f" (getvalue() calls {row['reads']}, +{row['growth_mb']:.0f} MB); "
            f"server.maxUploadSize is {upload_limit_mb()} MB, so the server itself "
            "refuses these files before the page runs"
        )
    )
    row, alone = by_key["8a"], by_key["8b"]
    if "failed" in row:
        lines.append(
            f"- Any mix raises resident memory by at most {GOAL_GROWTH_MB} MB (case 8): NOT MEASURED ({row['failed']})"
        )
    else:
        total = row["growth_mb"] + row["held_mb"]
        lines.append(
            f"- Any mix raises resident memory by at most {GOAL_GROWTH_MB} MB (case 8): "
            f"{says(total <= GOAL_GROWTH_MB)}: +{row['growth_mb']:.0f} MB in the engine, "
            f"{total:.0f} MB with the {row['held_mb']:.1f} MB the uploader holds (ratio "
            f"{total / GOAL_GROWTH_MB:.2f}); decoding only, the model's own step not included"
            + ("" if "failed" in alone else f"; its first image alone +{alone['growth_mb']:.0f} MB (8b)")
            + ("; --quick: a smaller mix than the worst" if quick else "")
        )
    for key, fair in fairs.items():
        if "failed" in fair:
            lines.append(f"- Fair shares (case {key}, engine level): NOT MEASURED ({fair['failed']})")
            continue
        answered = fair["other_refused"] is None and fair["other_s"] is not None
        within_a_step = answered and fair["other_s"] <= 2 * fair["step_s"] + FAIR_MARGIN_S
        lines.append(
            f"- Fair shares (case {key}, engine level; answered within the running step and its own): "
            f"{says(within_a_step)}: {fair_outcome(fair)}"
        )
    return lines


def upload_limit_mb() -> int | None:
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    return config.get("server", {}).get("maxUploadSize")


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, "
        f"Pillow {Image.__version__}, load average {[round(v, 2) for v in os.getloadavg()]}"
    )


def log(message: str) -> None:
    print(f"[bench_hostile_uploads] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller cases 4, 6 and 8; no 197 MB zip")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--fair-share", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_case(args.child)))
        return
    if args.fair_share:
        print(json.dumps(fair_share(args.fair_share)))
        return

    started = time.perf_counter()
    machine_start = machine()
    with tempfile.TemporaryDirectory(prefix="bcd-hostile-") as folder:
        rows = [run_case(case, Path(folder), args.quick) for case in cases(args.quick)]
    fairs = {}
    for key, images in FAIR_CASES.items():
        log(f"case {key}: fair share on the inference queue, jobs of {images} image(s)")
        fairs[key] = _child("--fair-share", str(images))
    document = {
        "machine_at_start": machine_start,
        "machine_at_end": machine(),
        "quick": args.quick,
        "wall_s": time.perf_counter() - started,
        "cases": rows,
        "fair_share": fairs,
        "verdicts": verdicts(rows, fairs, quick=args.quick),
    }
    if args.json:
        print(json.dumps(document, indent=2))
        return
    print(f"machine: {machine_start}")
    print(
        f"each case in a fresh process; memory: peak resident growth (VmHWM reset before the call, minus VmRSS "
        f"then), images resized to {IMAGE_SIZE} px; the files' own bytes were in memory before (held by the "
        "uploader); MB = 2^20 bytes\n"
    )
    print("\n".join(table(rows, fairs)))
    print()
    print("\n".join(document["verdicts"]))
    print(f"\n{document['wall_s']:.0f} s in all; at the end: {document['machine_at_end']}")


if __name__ == "__main__":
    main()
