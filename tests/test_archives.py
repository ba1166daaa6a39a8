"""Expanding uploaded zip archives safely: unsafe paths, zip bombs, nesting, junk and corrupt archives."""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bcd_engine.data.archives import MAX_RATIO, ArchiveContents, ExpansionBudget, read_archive
from bcd_engine.errors import ArchiveError, ConfigError, DataError


def _image(colour: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format=fmt)
    return buf.getvalue()


RED, GREEN, BLUE = _image((255, 0, 0)), _image((0, 255, 0), "JPEG"), _image((0, 0, 255), "BMP")


def _zip(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buf.getvalue()


def test_good_archive_gives_its_images_in_order(tmp_path: Path) -> None:
    data = _zip([("b/second.jpg", GREEN), ("first.png", RED), ("third.bmp", BLUE)])
    path = tmp_path / "batch.zip"
    path.write_bytes(data)
    for source in (path, data, bytearray(data)):
        contents = read_archive(source)
        assert contents == ArchiveContents(
            images=(("b/second.jpg", GREEN), ("first.png", RED), ("third.bmp", BLUE)), skipped=()
        )


def test_images_are_recognised_by_content_and_other_members_are_listed() -> None:
    contents = read_archive(
        _zip(
            [
                ("cell.dat", RED),  # an image whatever its name
                ("notes.txt", b"smears from ward 3"),
                ("fake.jpg", b"<html>not a picture</html>"),
                ("report.docx", _zip([("word/media/image1.png", RED)])),  # a zip, but not a nested archive
            ]
        )
    )
    assert contents.images == (("cell.dat", RED),)
    reason = "not a supported image (PNG, JPEG, BMP, TIFF, GIF, WEBP)"
    assert contents.skipped == (("notes.txt", reason), ("fake.jpg", reason), ("report.docx", reason))


def test_folders_hidden_files_and_macos_forks_are_left_out_silently() -> None:
    contents = read_archive(
        _zip(
            [
                ("cells/", b""),
                ("cells/a.png", RED),
                ("cells/.hidden.png", RED),
                (".DS_Store", b"\x00\x00\x00\x01Bud1"),
                ("__MACOSX/cells/._a.png", b"\x00\x05\x16\x07"),
                ("Thumbs.db", b"\xd0\xcf\x11\xe0"),
                ("./cells/b.png", BLUE),
            ]
        )
    )
    assert contents == ArchiveContents(images=(("cells/a.png", RED), ("./cells/b.png", BLUE)), skipped=())


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../evil.jpg", "parent folder '..'"),
        ("cells/../../evil.jpg", "parent folder '..'"),
        ("..\\evil.jpg", "parent folder '..'"),
        ("cells\\..\\..\\evil.jpg", "parent folder '..'"),
        ("/etc/evil.jpg", "absolute path"),
        ("\\\\server\\share\\evil.jpg", "absolute path"),
        ("C:/Windows/evil.jpg", "drive letter"),
        ("C:\\evil.jpg", "drive letter"),
        ("c:evil.jpg", "drive letter"),
        ("../.hidden", "parent folder '..'"),  # refused even where it would be skipped as hidden
    ],
)
def test_unsafe_member_paths_refuse_the_archive(name: str, problem: str) -> None:
    data = _zip([("ok.png", RED), (name, RED)])
    with pytest.raises(ArchiveError, match=rf"^archive: unsafe member path {re.escape(repr(name))} \({problem}\)"):
        read_archive(data)


def test_nothing_is_written_to_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    read_archive(_zip([("a.png", RED), ("inner.zip", _zip([("b.png", BLUE)]))]))
    assert os.listdir(tmp_path) == []


def test_nested_archive_is_expanded_one_level() -> None:
    inner = _zip([("b.png", BLUE), ("note.txt", b"hello")])
    contents = read_archive(_zip([("a.png", RED), ("more.zip", inner), ("c.jpg", GREEN)]))
    assert contents.images == (("a.png", RED), ("more.zip/b.png", BLUE), ("c.jpg", GREEN))
    assert [name for name, _ in contents.skipped] == ["more.zip/note.txt"]


def test_archive_nested_two_levels_is_not_expanded() -> None:
    innermost = _zip([("deep.png", RED)])
    inner = _zip([("b.png", BLUE), ("deeper.ZIP", innermost)])
    contents = read_archive(_zip([("a.png", RED), ("more.zip", inner)]))
    assert contents.images == (("a.png", RED), ("more.zip/b.png", BLUE))
    reason = "nested archive not expanded: nesting is limited to 1 level(s)"
    assert contents.skipped == (("more.zip/deeper.ZIP", reason),)
    assert read_archive(_zip([("more.zip", inner)]), allow_nested=2).images[-1] == ("more.zip/deeper.ZIP/deep.png", RED)
    assert read_archive(_zip([("more.zip", inner)]), allow_nested=0).skipped[0][0] == "more.zip"


def test_zip_bomb_is_refused_from_its_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    """200 MB of zeros squeezed into about 1 MB: refused before a byte is inflated."""
    buf = io.BytesIO()
    zeros = bytes(2**20)
    with (
        zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive,
        archive.open("smear.bmp", "w", force_zip64=True) as member,
    ):
        for _ in range(200):
            member.write(zeros)
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *args, **kwargs: pytest.fail("a member was opened"))
    with pytest.raises(
        ArchiveError,
        match=rf"^archive: member 'smear\.bmp' expands [\d,]+ times "
        rf"\(the limit is {MAX_RATIO}\); refused as a possible zip bomb$",
    ):
        read_archive(buf.getvalue())


def _stored_bitmaps(n: int) -> bytes:
    """A zip of n incompressible 4,000-byte members that start like BMP images, stored (ratio 1)."""
    return _zip([(f"{i}.bmp", b"BM" + os.urandom(3998)) for i in range(n)], compression=zipfile.ZIP_STORED)


def test_archive_expanding_past_the_byte_budget_is_refused() -> None:
    data = _stored_bitmaps(3)
    assert len(read_archive(data, max_total_bytes=len(data) + 12_000).images) == 3  # the archive itself counts too
    with pytest.raises(
        ArchiveError,
        match=r"^archive: expands to 12,000 bytes; with what the upload holds already "
        r"\([\d,]+ bytes, this archive included\) that is more than the [\d,]+ "
        r"bytes one upload may hold in memory; refused$",
    ):
        read_archive(data, max_total_bytes=len(data) + 11_999)
    with pytest.raises(ArchiveError, match=r"^archive: too large: [\d,]+ bytes; the limit is 300 bytes$"):
        read_archive(data, max_total_bytes=300)


def test_archive_declaring_more_than_the_whole_budget_is_refused_as_a_zip_bomb() -> None:
    member = b"BM" + os.urandom(800) + bytes(40_000 - 802)  # about 40 times smaller deflated: under the ratio limit
    data = _zip([(f"{i}.bmp", member) for i in range(3)])
    with pytest.raises(
        ArchiveError,
        match=r"^archive: expands to 120,000 bytes \(declared in its headers\); "
        r"the limit is 100,000 bytes in all; refused as a possible zip bomb$",
    ):
        read_archive(data, max_total_bytes=100_000)


def test_every_member_has_its_ratio_checked_however_small() -> None:
    """499 deflated members of 1 MiB each once slipped through (only members over 1 MiB were checked)."""
    data = _zip([(f"{i}.png", b"\x89PNG\r\n\x1a\n" + bytes(2**20 - 8)) for i in range(3)])
    with pytest.raises(ArchiveError, match=r"^archive: member '0\.png' expands [\d,]+ times \(the limit is 100\)"):
        read_archive(data)
    small = _zip([("a.txt", b"a" * 4000)])  # 4 KB that deflate to a few dozen bytes
    with pytest.raises(ArchiveError, match=r"member 'a\.txt' expands [\d,]+ times"):
        read_archive(small)


def test_archives_of_one_upload_share_one_budget() -> None:
    data = _stored_bitmaps(3)
    budget = ExpansionBudget(max_total_bytes=3 * len(data))
    assert len(read_archive(data, budget=budget).images) == 3
    assert budget.bytes_used == len(data) + 12_000 and budget.files_seen == 3
    with pytest.raises(ArchiveError, match=r"^archive: expands to 12,000 bytes; with what the upload holds already"):
        read_archive(data, budget=budget)  # alone it would fit; after the first it does not


def test_too_many_files_is_refused() -> None:
    inner = _zip([("b.png", BLUE), ("c.png", RED)])
    data = _zip([("a.png", RED), ("more.zip", inner)])
    assert len(read_archive(data, max_files=4).images) == 3
    with pytest.raises(ArchiveError, match=r"^more\.zip: too many files: at least 4; the limit is 3$"):
        read_archive(data, max_files=3)


def test_archive_file_over_the_budget_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.zip"
    with path.open("wb") as fh:
        fh.truncate(3 * 2**20)
    with pytest.raises(ArchiveError, match=r"huge\.zip: too large: 3 MB; the limit is 2 MB$"):
        read_archive(path, max_total_bytes=2 * 2**20)


@pytest.mark.parametrize(
    ("make_bytes", "detail"),
    [
        (lambda: RED, "File is not a zip file"),
        (lambda: b"", "File is not a zip file"),
        (lambda: _zip([("a.png", RED), ("b.png", BLUE)])[:-30], ""),
        (lambda: b"PK\x03\x04" + bytes(100), ""),
    ],
    ids=["png", "empty", "truncated", "header-only"],
)
def test_non_zip_or_corrupt_zip_is_refused(make_bytes: object, detail: str) -> None:
    with pytest.raises(ArchiveError, match=rf"^archive: not a zip archive, or a corrupt one \(.*{detail}"):
        read_archive(make_bytes())  # type: ignore[operator]


def test_member_that_cannot_be_extracted_is_listed() -> None:
    data = bytearray(_zip([("a.png", RED), ("b.png", BLUE)], compression=zipfile.ZIP_STORED))
    data[data.index(BLUE) + 20] ^= 0xFF  # b.png's bytes no longer match its CRC
    corrupt_inner = b"PK\x03\x04" + bytes(60)
    contents = read_archive(_zip([("ok.zip", bytes(data)), ("broken.zip", corrupt_inner)]))
    assert contents.images == (("ok.zip/a.png", RED),)
    assert [(name, reason.split(" (")[0]) for name, reason in contents.skipped] == [
        ("ok.zip/b.png", "cannot be extracted"),
        ("broken.zip", "corrupt nested archive"),
    ]
    assert "Bad CRC-32" in contents.skipped[0][1]


def test_missing_file_and_bad_limits() -> None:
    with pytest.raises(ArchiveError, match=r"^/no/such\.zip: cannot read file"):
        read_archive("/no/such.zip")
    assert issubclass(ArchiveError, DataError)
    for option, value in (("max_files", 0), ("max_total_bytes", -1), ("max_ratio", 2.5), ("allow_nested", True)):
        with pytest.raises(ConfigError, match=rf"^{option} must be an integer"):
            read_archive(_zip([]), **{option: value})


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=150, deadline=None, database=None)
@given(
    data=st.data(),
    cuts=st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=4)), min_size=1, max_size=4),
)
def test_fuzz_damaged_archives(data: st.DataObject, cuts: list[tuple[int, bytes]]) -> None:
    """Overwritten or cut archives give contents or ArchiveError, nothing else."""
    archive = bytearray(_zip([("a.png", RED), ("more.zip", _zip([("b.jpg", GREEN)])), ("c.txt", b"x" * 300)]))
    for at, patch in cuts:
        at %= len(archive) + 1
        archive[at : at + len(patch)] = patch
    if data.draw(st.booleans()):
        del archive[data.draw(st.integers(0, len(archive))) :]
    try:
        contents = read_archive(bytes(archive))
    except ArchiveError:
        return
    assert all(isinstance(name, str) and isinstance(content, bytes) for name, content in contents.images)
    assert all(isinstance(name, str) and isinstance(reason, str) for name, reason in contents.skipped)


def test_an_archive_with_too_many_entries_is_refused_before_it_is_parsed():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i in range(60):
            zf.writestr(f"folder{i}/", b"")
    data = buffer.getvalue()
    with pytest.raises(ArchiveError, match=r"too many entries \(up to \d+ by its directory\); the limit is 5 files"):
        read_archive(data, max_files=5)
    # A record that lies about its count is bounded by its directory's size (46 bytes or more per entry).
    end = data.rfind(b"PK\x05\x06")
    lying = data[: end + 8] + (1).to_bytes(2, "little") * 2 + data[end + 12 :]
    with pytest.raises(ArchiveError, match="too many entries"):
        read_archive(lying, max_files=5)
    # The same bound holds for an archive nested in an innocent one: it is skipped with the reason.
    contents = read_archive(_zip([("a.png", RED), ("more.zip", lying)]), max_files=5)
    assert contents.images == (("a.png", RED),)
    assert contents.skipped[0][0] == "more.zip" and "too many entries" in contents.skipped[0][1]


def test_a_nested_member_named_zip_that_is_not_one_is_reported_as_a_corrupt_archive() -> None:
    contents = read_archive(_zip([("a.png", RED), ("broken.zip", b"not a zip")]))
    assert contents.images == (("a.png", RED),)
    assert contents.skipped[0][0] == "broken.zip" and contents.skipped[0][1].startswith("corrupt nested archive")
