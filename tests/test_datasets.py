"""Scanning dataset folders, the per-file scan cache, and the shared image loader."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from bcd_engine.data import dedup, scan
from bcd_engine.data.images import SUPPORTED_EXTENSIONS, load_image
from bcd_engine.data.scan import ScanResult, scan_dataset
from bcd_engine.errors import ConfigError, DataError, ImageLoadError

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _smooth_image(seed: int, size: int = 64) -> Image.Image:
    """A smooth random RGB image: strong gradients everywhere, so its dhash is stable under small edits."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return coarse.resize((size, size), Image.Resampling.BICUBIC)


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _two_class_folder(root: Path, per_class: int = 2) -> Path:
    for k, name in enumerate(("A", "B")):
        for i in range(per_class):
            _write(root / name / f"img{i}.png", _encode(_smooth_image(100 * k + i), "PNG"))
    return root


@pytest.fixture
def count_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every PIL ``Image.open`` call made while the test runs."""
    calls: list[str] = []
    real_open = Image.open

    def counting_open(fp: object, *args: object, **kwargs: object) -> Image.Image:
        calls.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return calls


# --- a clean dataset -----------------------------------------------------------------------------


def test_scan_synthetic_dataset(synthetic_dataset: Path) -> None:
    scan = scan_dataset(synthetic_dataset)
    assert scan.root == str(synthetic_dataset.resolve())
    assert scan.class_names == ("Benign", "Early", "Pre", "Pro")
    assert scan.class_counts == {"Benign": 12, "Early": 12, "Pre": 12, "Pro": 12}
    assert scan.n_images == 48 == len(scan.paths)
    assert scan.unreadable == () and scan.duplicate_groups == () and scan.near_duplicate_groups == ()
    assert scan.labels.tolist() == [k for k in range(4) for _ in range(12)]
    assert sorted(scan.groups.tolist()) == list(range(48))
    assert [(r.class_name, r.path) for r in scan.images] == sorted((r.class_name, r.path) for r in scan.images)
    for record in scan.images:
        assert os.path.isabs(record.path) and Path(record.path).parent.name == record.class_name
        assert (record.width, record.height, record.mode, record.readable, record.error) == (32, 32, "RGB", True, None)
        assert record.size_bytes == Path(record.path).stat().st_size
        assert len(record.md5) == 32 and len(record.dhash or "") == 8 * 64  # one dhash per flip or turn


def test_to_dict_is_the_cli_document(synthetic_dataset_copy: Path) -> None:
    _write(synthetic_dataset_copy / "Pro" / "broken.jpg", b"not an image")
    doc = scan_dataset(synthetic_dataset_copy).to_dict()
    assert list(doc) == ["root", "n_images", "classes", "unreadable", "duplicate_groups", "near_duplicate_groups"]
    assert doc["n_images"] == 48 and doc["classes"]["Pro"] == 12
    assert doc["unreadable"] == [
        {
            "path": str((synthetic_dataset_copy / "Pro" / "broken.jpg").resolve()),
            "reason": "not a recognised image format",
        }
    ]
    assert json.loads(json.dumps(doc)) == doc


def test_ignores_hidden_unsupported_and_nested_files(tmp_path: Path) -> None:
    root = _two_class_folder(tmp_path / "data")
    image = _encode(_smooth_image(7), "PNG")
    _write(root / "A" / ".hidden.png", image)
    _write(root / "A" / "notes.txt", b"hello")
    _write(root / "A" / "nested" / "deep.png", image)
    _write(root / ".thumbs" / "x.png", image)
    _write(root / "top-level.png", image)
    _write(root / "B" / "UPPER.PNG", _encode(_smooth_image(8), "PNG"))
    scan = scan_dataset(root)
    assert scan.class_counts == {"A": 2, "B": 3}
    assert any(p.endswith("UPPER.PNG") for p in scan.paths)


@pytest.mark.parametrize("extension", SUPPORTED_EXTENSIONS)
def test_every_supported_extension_is_read(tmp_path: Path, extension: str) -> None:
    fmt = {
        ".jpg": "JPEG",
        ".jpeg": "JPEG",
        ".png": "PNG",
        ".bmp": "BMP",
        ".tif": "TIFF",
        ".tiff": "TIFF",
        ".gif": "GIF",
        ".webp": "WEBP",
    }[extension]
    root = _two_class_folder(tmp_path / "data")
    _write(root / "A" / f"extra{extension}", _encode(_smooth_image(9), fmt))
    assert scan_dataset(root).class_counts["A"] == 3


# --- files that cannot be used -----------------------------------------------------------------------


def _truncated_jpeg() -> bytes:
    data = _encode(_smooth_image(1), "JPEG", quality=90)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("name", "make_bytes", "reason"),
    [
        ("truncated.jpg", _truncated_jpeg, r"^corrupt or truncated image \(.*truncated"),
        ("empty.png", lambda: b"", r"^empty file \(0 bytes\)$"),
        ("text.jpg", lambda: b"this is a text file, not a JPEG\n", r"^not a recognised image format$"),
        ("truncated.png", lambda: _encode(_smooth_image(2), "PNG")[:-200], r"^corrupt or truncated image \("),
        ("header-only.png", lambda: _encode(_smooth_image(2), "PNG")[:40], r"^not a recognised image format$"),
    ],
)
def test_unreadable_files_are_reported_not_raised(
    synthetic_dataset_copy: Path, name: str, make_bytes: Callable[[], bytes], reason: str
) -> None:
    bad = _write(synthetic_dataset_copy / "Early" / name, make_bytes())
    scan = scan_dataset(synthetic_dataset_copy)
    assert scan.n_images == 48
    [record] = scan.unreadable
    assert record.path == str(bad.resolve()) and not record.readable
    assert record.error is not None and re.search(reason, record.error)
    assert str(bad.resolve()) not in scan.paths


def test_decompression_bomb_is_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _two_class_folder(tmp_path / "data")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 images are now "bombs" (> 2x the limit)
    with pytest.raises(DataError, match=r"none of the 4 image files could be read"):
        scan_dataset(root, use_cache=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    _write(root / "A" / "small.png", _encode(_smooth_image(3, size=16), "PNG"))
    _write(root / "B" / "small.png", _encode(_smooth_image(4, size=16), "PNG"))
    scan = scan_dataset(root, use_cache=False)
    assert scan.n_images == 2
    assert {r.error.split(" (")[0] for r in scan.unreadable if r.error} == {"too large to decode safely"}


# --- duplicates ----------------------------------------------------------------------------------------


def test_exact_and_near_duplicates_are_grouped(tmp_path: Path) -> None:
    root = _two_class_folder(tmp_path / "data", per_class=3)
    original = _smooth_image(42)
    a = _write(root / "A" / "original.png", _encode(original, "PNG"))
    copy = root / "A" / "copy.png"
    shutil.copyfile(a, copy)
    near = _write(root / "A" / "near.jpg", _encode(ImageEnhance.Brightness(original).enhance(1.05), "JPEG", quality=90))
    other = _write(root / "B" / "other.png", _encode(_smooth_image(43), "PNG"))

    scan = scan_dataset(root)
    resolved = {p: str(p.resolve()) for p in (a, copy, near, other)}
    assert scan.duplicate_groups == (tuple(sorted([resolved[a], resolved[copy]])),)
    assert scan.near_duplicate_groups == (tuple(sorted([resolved[a], resolved[copy], resolved[near]])),)
    groups = dict(zip(scan.paths, scan.groups.tolist(), strict=True))
    assert groups[resolved[a]] == groups[resolved[copy]] == groups[resolved[near]]
    assert len(set(groups.values())) == scan.n_images - 2
    assert all(resolved[other] not in group for group in scan.near_duplicate_groups)


def test_flipped_and_turned_copies_are_near_duplicates_and_stay_on_one_side_of_a_split(tmp_path: Path) -> None:
    from bcd_engine.data.splits import holdout_split

    root = _two_class_folder(tmp_path / "data", per_class=2)
    originals = [_smooth_image(500 + i, size=160) for i in range(10)]  # larger than the views' reduced copy
    for i, img in enumerate(originals):
        _write(root / "A" / f"cell{i}.png", _encode(img, "PNG"))
        _write(
            root / "A" / f"cell{i}-mirrored.jpg",
            _encode(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "JPEG", quality=90),
        )
        _write(root / "B" / f"cell{i}-turned.png", _encode(img.transpose(Image.Transpose.ROTATE_90), "PNG"))
    scan = scan_dataset(root)
    triples = [g for g in scan.near_duplicate_groups if any("cell" in Path(p).name for p in g)]
    assert sorted(sorted(Path(p).name for p in g) for g in triples) == sorted(
        sorted([f"cell{i}.png", f"cell{i}-mirrored.jpg", f"cell{i}-turned.png"]) for i in range(10)
    )
    split = holdout_split(scan.labels, scan.groups, val_fraction=0.2, test_fraction=0.2, seed=0)
    side = {i: name for name in ("train", "val", "test") for i in getattr(split, name).tolist()}
    index = {p: i for i, p in enumerate(scan.paths)}
    assert all(len({side[index[p]] for p in group}) == 1 for group in triples)


@pytest.mark.parametrize(("distance", "group_size"), [(0, 2), (12, 2), (256, 5)])
def test_near_duplicate_distance_threshold(tmp_path: Path, distance: int, group_size: int) -> None:
    root = _two_class_folder(tmp_path / "data")
    shutil.copyfile(root / "A" / "img0.png", root / "A" / "img0-copy.png")
    scan = scan_dataset(root, near_duplicate_distance=distance)
    assert [len(group) for group in scan.near_duplicate_groups] == [group_size]


def test_groups_are_deterministic(tmp_path: Path) -> None:
    root = _two_class_folder(tmp_path / "data", per_class=4)
    shutil.copyfile(root / "B" / "img3.png", root / "B" / "img3-copy.png")
    shutil.copyfile(root / "A" / "img1.png", root / "A" / "img1-copy.png")
    first, second = scan_dataset(root), scan_dataset(root, use_cache=False)
    assert first == second
    assert first.groups.tolist() == second.groups.tolist()
    assert [g[0] for g in first.near_duplicate_groups] == sorted(g[0] for g in first.near_duplicate_groups)


# --- errors -------------------------------------------------------------------------------------------------


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nope"


def _a_file(tmp_path: Path) -> Path:
    return _write(tmp_path / "file.png", _encode(_smooth_image(0), "PNG"))


def _no_class_folders(tmp_path: Path) -> Path:
    _write(tmp_path / "data" / "loose.png", _encode(_smooth_image(0), "PNG"))
    return tmp_path / "data"


def _no_supported_images(tmp_path: Path) -> Path:
    _write(tmp_path / "data" / "A" / "notes.txt", b"x")
    _write(tmp_path / "data" / "B" / ".hidden.png", _encode(_smooth_image(0), "PNG"))
    return tmp_path / "data"


def _nothing_readable(tmp_path: Path) -> Path:
    _write(tmp_path / "data" / "A" / "a.jpg", b"")
    _write(tmp_path / "data" / "B" / "b.jpg", b"text")
    return tmp_path / "data"


def _one_class(tmp_path: Path) -> Path:
    _write(tmp_path / "data" / "A" / "a.png", _encode(_smooth_image(0), "PNG"))
    _write(tmp_path / "data" / "B" / "b.jpg", b"text")
    return tmp_path / "data"


@pytest.mark.parametrize(
    ("make_root", "message"),
    [
        (_missing, r"dataset folder does not exist: .*nope"),
        (_a_file, r"dataset path is not a folder: .*file\.png"),
        (_no_class_folders, r"is empty: no class subfolders"),
        (_no_supported_images, r"is empty: no supported image files"),
        (_nothing_readable, r"none of the 2 image files could be read"),
        (_one_class, r"needs at least two classes with readable images, found only 'A'"),
    ],
)
def test_unusable_folders_raise_data_error(tmp_path: Path, make_root: Callable[[Path], Path], message: str) -> None:
    with pytest.raises(DataError, match=message):
        scan_dataset(make_root(tmp_path))


def test_single_class_allowed_on_request(tmp_path: Path) -> None:
    scan = scan_dataset(_one_class(tmp_path), allow_single_class=True)
    assert scan.class_names == ("A",) and scan.n_images == 1 and len(scan.unreadable) == 1


@pytest.mark.parametrize("distance", [-1, 257, 1.5, True])
def test_bad_near_duplicate_distance(synthetic_dataset: Path, distance: object) -> None:
    with pytest.raises(ConfigError, match=r"near_duplicate_distance must be an integer from 0 to 256"):
        scan_dataset(synthetic_dataset, near_duplicate_distance=distance)  # type: ignore[arg-type]


# --- cache --------------------------------------------------------------------------------------------------


def test_second_scan_reads_nothing(synthetic_dataset: Path, isolated_cache: Path, count_opens: list[str]) -> None:
    first = scan_dataset(synthetic_dataset)
    assert len(count_opens) == 48
    assert len(list((isolated_cache / "scan").glob("*.json"))) == 1
    count_opens.clear()
    second = scan_dataset(synthetic_dataset)
    assert count_opens == []
    assert second == first


def test_changed_added_and_removed_files_are_rescanned(synthetic_dataset_copy: Path, count_opens: list[str]) -> None:
    first = scan_dataset(synthetic_dataset_copy)
    changed = synthetic_dataset_copy / "Pre" / "synthetic-pre-001.png"
    changed.write_bytes(_encode(_smooth_image(5, size=40), "PNG"))
    added = _write(synthetic_dataset_copy / "Pro" / "added.png", _encode(_smooth_image(6), "PNG"))
    removed = synthetic_dataset_copy / "Benign" / "synthetic-benign-001.png"
    removed.unlink()
    count_opens.clear()

    second = scan_dataset(synthetic_dataset_copy)
    assert len(count_opens) == 2
    records = {r.path: r for r in second.images}
    assert records[str(changed.resolve())].width == 40
    assert records[str(changed.resolve())].md5 != {r.path: r for r in first.images}[str(changed.resolve())].md5
    assert str(added.resolve()) in records and str(removed.resolve()) not in records
    count_opens.clear()
    assert scan_dataset(synthetic_dataset_copy) == second and count_opens == []


def test_touched_file_of_same_size_is_reread(synthetic_dataset_copy: Path, count_opens: list[str]) -> None:
    scan_dataset(synthetic_dataset_copy)
    target = synthetic_dataset_copy / "Early" / "synthetic-early-002.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    count_opens.clear()
    scan_dataset(synthetic_dataset_copy)
    assert len(count_opens) == 1


@pytest.mark.parametrize("garbage", [b"", b"{not json", b"[1, 2]", b'{"format": 1, "files": {"x": 3}}', b"\xff\xfe"])
def test_corrupt_cache_is_rebuilt(
    synthetic_dataset: Path, isolated_cache: Path, count_opens: list[str], garbage: bytes
) -> None:
    expected = scan_dataset(synthetic_dataset)
    [cache_file] = (isolated_cache / "scan").glob("*.json")
    cache_file.write_bytes(garbage)
    count_opens.clear()
    assert scan_dataset(synthetic_dataset) == expected
    assert len(count_opens) == 48
    assert json.loads(cache_file.read_text())["format"] == scan._CACHE_FORMAT


def test_use_cache_false_neither_reads_nor_writes(
    synthetic_dataset: Path, isolated_cache: Path, count_opens: list[str]
) -> None:
    scan_dataset(synthetic_dataset, use_cache=False)
    scan_dataset(synthetic_dataset, use_cache=False)
    assert len(count_opens) == 96
    assert not (isolated_cache / "scan").exists()


def test_unwritable_cache_only_warns(synthetic_dataset: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = _write(tmp_path / "not-a-folder", b"x")
    monkeypatch.setenv("BCD_CACHE_DIR", str(blocker))
    with pytest.warns(RuntimeWarning, match=r"could not write the scan cache"):
        scan = scan_dataset(synthetic_dataset)
    assert scan.n_images == 48


def test_progress_bar_goes_to_stderr(synthetic_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scan_dataset(synthetic_dataset, progress=True, use_cache=False)
    captured = capsys.readouterr()
    assert "Scanning images" in captured.err and "48/48" in captured.err and captured.out == ""


def test_scan_result_is_frozen(synthetic_dataset: Path) -> None:
    scan = scan_dataset(synthetic_dataset)
    assert isinstance(scan, ScanResult)
    with pytest.raises(AttributeError, match="cannot assign to field 'root'"):
        scan.root = "elsewhere"  # type: ignore[misc]


# --- load_image ---------------------------------------------------------------------------------------------


def _rgb_array() -> np.ndarray:
    return np.asarray(_smooth_image(11, size=24))


@pytest.mark.parametrize(
    ("make_image", "fmt"),
    [
        (lambda: Image.fromarray(_rgb_array()), "PNG"),
        (lambda: Image.fromarray(_rgb_array()).convert("RGBA"), "PNG"),
        (lambda: Image.fromarray(_rgb_array()).convert("L"), "PNG"),
        (lambda: Image.fromarray(_rgb_array()).convert("LA"), "PNG"),
        (lambda: Image.fromarray(_rgb_array()).convert("P"), "PNG"),
        (lambda: Image.fromarray(_rgb_array()).convert("CMYK"), "JPEG"),
        (lambda: Image.fromarray(_rgb_array()).convert("CMYK"), "TIFF"),
        (lambda: Image.fromarray(_rgb_array()).convert("1"), "BMP"),
        (lambda: Image.fromarray(_rgb_array()[..., 0].astype(np.uint16) * 257), "PNG"),
        (lambda: Image.fromarray(_rgb_array()[..., 0].astype(np.float32)), "TIFF"),
    ],
)
def test_load_image_converts_any_mode_to_rgb(tmp_path: Path, make_image: Callable[[], Image.Image], fmt: str) -> None:
    path = _write(tmp_path / f"img.{fmt.lower()}", _encode(make_image(), fmt))
    arr = load_image(path)
    assert arr.dtype == np.uint8 and arr.shape == (24, 24, 3)
    assert 0 < arr.mean() < 255


def test_load_image_scales_16_bit_and_composites_alpha_on_white() -> None:
    sixteen = Image.fromarray(np.array([[0, 257 * 128, 65535]], dtype=np.uint16))
    assert load_image(_encode(sixteen, "PNG"))[0, :, 0].tolist() == [0, 128, 255]
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert (load_image(_encode(transparent, "PNG")) == 255).all()
    opaque = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    assert load_image(_encode(opaque, "PNG"))[0, 0].tolist() == [10, 20, 30]


def test_load_image_resizes_and_accepts_bytes(tmp_path: Path) -> None:
    data = _encode(Image.new("RGB", (40, 20), (200, 100, 50)), "PNG")
    from_bytes = load_image(data, image_size=16)
    assert from_bytes.shape == (16, 16, 3) and from_bytes[8, 8].tolist() == [200, 100, 50]
    assert np.array_equal(load_image(_write(tmp_path / "x.png", data), image_size=16), from_bytes)
    assert load_image(bytearray(data)).shape == (20, 40, 3)


def test_load_image_applies_exif_orientation() -> None:
    img = Image.new("RGB", (30, 10), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 5, 10))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    arr = load_image(_encode(img, "JPEG", exif=exif, quality=95))
    assert arr.shape == (30, 10, 3)
    assert arr[1, 5, 0] > 200 and arr[-2, 5, 2] > 200  # the left strip is now on top


def test_load_image_takes_the_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    arr = load_image(buf.getvalue())
    assert arr.shape == (8, 8, 3) and arr[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (b"", r"image bytes: empty file \(0 bytes\)"),
        (b"plain text", r"image bytes: not a recognised image format"),
        (_truncated_jpeg(), r"image bytes: corrupt or truncated image"),
        ("/definitely/not/here.png", r"/definitely/not/here\.png: cannot read file"),
    ],
)
def test_load_image_errors(source: object, message: str) -> None:
    with pytest.raises(ImageLoadError, match=message):
        load_image(source)  # type: ignore[arg-type]


def test_load_image_error_names_the_path(tmp_path: Path) -> None:
    path = _write(tmp_path / "fake.jpg", b"nope")
    with pytest.raises(ImageLoadError, match=rf"{path.name}: not a recognised image format"):
        load_image(path)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_load_image_bad_size(size: object) -> None:
    with pytest.raises(ConfigError, match=r"image_size must be a positive integer"):
        load_image(_encode(Image.new("RGB", (4, 4)), "PNG"), image_size=size)  # type: ignore[arg-type]


def test_folder_signature_changes_exactly_when_a_scan_could(tmp_path: Path) -> None:
    root = _two_class_folder(tmp_path / "data")
    first = scan.folder_signature(root)
    assert scan.folder_signature(root) == first
    (root / "A" / "notes.txt").write_text("not an image")  # not scanned: no change
    assert scan.folder_signature(root) == first
    added = _write(root / "A" / "new.png", _encode(_smooth_image(7), "PNG"))
    with_new = scan.folder_signature(root)
    assert with_new != first
    os.utime(added, ns=(added.stat().st_atime_ns, added.stat().st_mtime_ns + 10**9))
    assert scan.folder_signature(root) not in (first, with_new)
    added.unlink()
    assert scan.folder_signature(root) == first
    with pytest.raises(DataError, match="does not exist"):
        scan.folder_signature(tmp_path / "missing")


def test_near_copies_match_in_either_direction_and_only_across_the_two_sets(tmp_path: Path) -> None:
    root = _two_class_folder(tmp_path / "data", per_class=1)
    img = _smooth_image(900, size=160)
    _write(root / "A" / "x.png", _encode(img, "PNG"))
    _write(root / "A" / "x-twin.png", _encode(img, "PNG"))  # a copy inside the same set is not a "copy of"
    _write(root / "B" / "x-turned.png", _encode(img.transpose(Image.Transpose.ROTATE_270), "PNG"))
    by_name = {Path(r.path).name: r for r in scan_dataset(root).images}
    records = [by_name["img0.png"], by_name["x.png"], by_name["x-twin.png"]]
    assert dedup.near_copies(records, [by_name["x-turned.png"]]) == [False, True, True]
    assert dedup.near_copies([by_name["x-turned.png"]], records) == [True]
    assert dedup.near_copies(records[:1], records[1:]) == [False]
    assert dedup.near_copies([], records) == [] and dedup.near_copies(records, []) == [False] * 3
