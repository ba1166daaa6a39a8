"""Safe expansion of an uploaded zip archive of images, for batch diagnosis.

Everything happens in memory, so no member name ever becomes a filesystem path. An archive is refused
with :class:`ArchiveError` when it is not a zip or is corrupt, names a member outside itself (``../x``,
``/x``, ``C:x``), or would expand past the limits (zip bombs): the size its headers declare, the bytes
actually read and every member's compression ratio (declared and as read, whatever its size) are all
checked. Zips inside the zip are expanded ``allow_nested`` levels deep. Several archives of one upload
share one :class:`ExpansionBudget`, so many small archives cannot add up to what one may not. A member is
an image when its content starts like one (whatever its name); :func:`bcd_engine.data.images.load_image`
decodes it later.
"""

from __future__ import annotations

import io
import os
import re
import struct
import zipfile
from dataclasses import dataclass

from bcd_engine.data.images import (
    IMAGE_FORMATS,
    detect_image_format,
    format_size,
    short_reason,
)
from bcd_engine.errors import ArchiveError, ConfigError

MAX_FILES = 1000  # members read, nested archives and their members included
MAX_TOTAL_BYTES = 500 * 2**20  # the archive's size; and the bytes read from it, all levels together
# (a nested archive's own bytes and its members' bytes both count: both are held in memory at once)
MAX_RATIO = 100  # uncompressed / compressed size of one member
NESTED_LEVELS = 1  # zips inside the zip are expanded; zips inside those are not
_CHUNK_BYTES = 2**20
_MAX_ENTRIES_PER_FILE = 10  # directory entries allowed per counted file (folders and junk are entries too)
_JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
_MIN_DIRECTORY_ENTRY_BYTES = 46  # a central directory file header without name, extra or comment
_END_RECORD = struct.Struct("<4s4H2LH")  # end of central directory: signature ... entries, size, offset, comment
_ZIP64_LOCATOR = struct.Struct("<4sLQL")  # zip64 end of central directory locator, just before the end record
_ZIP64_END_RECORD = struct.Struct("<4sQ2H2L4Q")  # zip64 end of central directory record, just before the locator
_COMMENT_REACH = 2**16  # how far before the last record-sized bytes zipfile looks for a record (a comment's reach)
_DRIVE_LETTER = re.compile(r"[A-Za-z]:")


@dataclass
class ExpansionBudget:
    """Files and bytes that one upload may bring into memory, shared by all its archives (nested ones too).

    ``bytes_used`` counts the archives' own bytes, everything read from them, and whatever else the caller
    :meth:`charge` s (e.g. plain images uploaded beside the archives).
    """

    max_files: int = MAX_FILES
    max_total_bytes: int = MAX_TOTAL_BYTES
    files_seen: int = 0
    bytes_used: int = 0

    def charge(self, n_bytes: int, *, label: str, files: int = 0) -> None:
        """Count ``n_bytes`` and ``files`` more; ArchiveError naming ``label`` when that passes a limit."""
        self.check(n_bytes, label=label, files=files)
        self.files_seen += files
        self.bytes_used += n_bytes

    def check(self, n_bytes: int, *, label: str, files: int = 0) -> None:
        """ArchiveError naming ``label`` when ``n_bytes`` and ``files`` more would pass a limit; counts nothing
        (to refuse a file by its size before reading it)."""
        if self.files_seen + files > self.max_files:
            raise ArchiveError(f"{label}: the upload would hold more than {self.max_files} files; refused")
        if self.bytes_used + n_bytes > self.max_total_bytes:
            raise ArchiveError(
                f"{label}: the upload would hold more than {format_size(self.max_total_bytes)} in memory "
                f"({format_size(self.bytes_used)} already); refused"
            )


@dataclass(frozen=True)
class ArchiveContents:
    """The image members of an archive as (name, bytes), in archive order, and the members left out
    as (name, reason). A nested archive's members are named after it: ``"more.zip/cell.jpg"``."""

    images: tuple[tuple[str, bytes], ...]
    skipped: tuple[tuple[str, str], ...]


def is_zip(name: str, head: bytes) -> bool:
    """Whether a file is meant as a zip archive: its name ends in ``.zip`` or its first bytes are a zip's.

    >>> is_zip("batch.ZIP", b""), is_zip("cells.jpg", b"PK\\x03\\x04..."), is_zip("cell.jpg", b"\\xff\\xd8")
    (True, True, False)
    """
    return name.lower().endswith(".zip") or head.startswith(_ZIP_MAGIC)


def read_archive(
    path_or_bytes: str | os.PathLike[str] | bytes,
    *,
    max_files: int = MAX_FILES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_ratio: int = MAX_RATIO,
    allow_nested: int = NESTED_LEVELS,
    budget: ExpansionBudget | None = None,
) -> ArchiveContents:
    """Expand a zip archive (a path or its bytes) in memory into its image members.

    ``budget`` is shared with the other archives of the same upload; without one the archive gets its own
    of ``max_files`` and ``max_total_bytes``.

    Folders, hidden files and ``__MACOSX`` entries are left out silently; other members that are not
    images, members that cannot be extracted and archives nested deeper than ``allow_nested`` levels
    are listed in ``skipped`` with the reason. Raise :class:`ArchiveError` when the archive is refused
    and :class:`ConfigError` for a bad limit.

    >>> contents = read_archive("batch.zip")  # doctest: +SKIP
    >>> [name for name, _ in contents.images]  # doctest: +SKIP
    ['cell1.jpg', 'cell2.png', 'more.zip/cell3.jpg']
    """
    for option, value, minimum in (
        ("max_files", max_files, 1),
        ("max_total_bytes", max_total_bytes, 1),
        ("max_ratio", max_ratio, 1),
        ("allow_nested", allow_nested, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{option} must be an integer >= {minimum}, got {value!r}")
    is_bytes = isinstance(path_or_bytes, (bytes, bytearray, memoryview))
    label = "archive" if is_bytes else str(path_or_bytes)
    budget = budget if budget is not None else ExpansionBudget(max_files, max_total_bytes)
    data = bytes(path_or_bytes) if is_bytes else _read_file(path_or_bytes, budget.max_total_bytes, label)
    _check_archive_size(len(data), budget.max_total_bytes, label)
    too_many = _too_many_entries(data, budget.max_files)
    if too_many:
        raise ArchiveError(f"{label}: {too_many}")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except Exception as exc:  # BadZipFile mostly; broken headers also raise OSError, ValueError, ...
        raise ArchiveError(f"{label}: not a zip archive, or a corrupt one ({short_reason(exc)})") from exc
    expander = _Expander(budget, max_ratio=max_ratio, allow_nested=allow_nested)
    budget.charge(len(data), label=label)  # the archive itself is held in memory while it is read
    expander.expand(archive, label=label, prefix="", depth=0)
    return ArchiveContents(images=tuple(expander.images), skipped=tuple(expander.skipped))


def _too_many_entries(data: bytes, max_files: int) -> str | None:
    """Why the archive has too many directory entries to parse, or None.

    ``zipfile`` builds an object per entry before any other check, so the count is bounded from the
    end-of-central-directory record it will use (:func:`_directory_record`) first: by its entry count and
    by the directory's size (``zipfile`` reads entries until that size is used up, and every entry takes at
    least 46 bytes there, whatever count the record claims).
    """
    record = _directory_record(data)
    if record is None:
        return None  # zipfile finds no record either, and refuses the archive
    count, directory_bytes = record
    entries = max(count, directory_bytes // _MIN_DIRECTORY_ENTRY_BYTES)
    if entries > _MAX_ENTRIES_PER_FILE * max_files:
        return f"too many entries (up to {entries:,} by its directory); the limit is {max_files} files"
    return None


def _directory_record(data: bytes) -> tuple[int, int] | None:
    """(entries, directory bytes) of the end-of-central-directory record found as ``zipfile`` finds it; None
    when there is none.

    As ``zipfile`` does: the last 22 bytes when they are a record without a comment (so a signature inside its
    own fields, e.g. its directory offset, is not taken for a record); otherwise the last record signature
    within a comment's reach of the end; then the zip64 record just before it, if its locator is there.
    """
    start = len(data) - _END_RECORD.size
    if not (start >= 0 and data.startswith(b"PK\x05\x06", start) and data.endswith(b"\0\0")):
        start = data.rfind(b"PK\x05\x06", max(0, len(data) - _COMMENT_REACH - _END_RECORD.size))
        if start < 0 or start + _END_RECORD.size > len(data):
            return None
    *_, count, directory_bytes, _offset, _comment_bytes = _END_RECORD.unpack_from(data, start)
    locator = start - _ZIP64_LOCATOR.size
    zip64 = locator - _ZIP64_END_RECORD.size
    if zip64 >= 0 and data.startswith(b"PK\x06\x07", locator) and data.startswith(b"PK\x06\x06", zip64):
        *_, count, directory_bytes, _offset = _ZIP64_END_RECORD.unpack_from(data, zip64)
    return count, directory_bytes


def _read_file(path: str | os.PathLike[str], limit: int, label: str) -> bytes:
    """At most limit + 1 bytes of a file; a regular file over the limit is refused before reading."""
    try:
        with open(path, "rb") as fh:
            _check_archive_size(os.fstat(fh.fileno()).st_size, limit, label)
            return fh.read(limit + 1)
    except OSError as exc:
        raise ArchiveError(f"{label}: cannot read file ({short_reason(exc)})") from exc


def _check_archive_size(n_bytes: int, limit: int, label: str) -> None:
    if n_bytes > limit:
        raise ArchiveError(f"{label}: too large: {format_size(n_bytes)}; the limit is {format_size(limit)}")


class _Expander:
    """Walks an archive and the archives nested in it, sharing one budget of files and bytes."""

    def __init__(self, budget: ExpansionBudget, *, max_ratio: int, allow_nested: int) -> None:
        self.budget = budget
        self.max_ratio = max_ratio
        self.allow_nested = allow_nested
        self.images: list[tuple[str, bytes]] = []
        self.skipped: list[tuple[str, str]] = []

    def expand(self, archive: zipfile.ZipFile, *, label: str, prefix: str, depth: int) -> None:
        """Check the headers of every entry of ``archive``, then read its members in order."""
        entries = archive.infolist()
        members = [info for info in entries if not _is_folder_or_hidden(info.filename)]
        self._check_headers(entries, members, label)
        for info in members:
            name = prefix + info.filename.replace("\\", "/")
            content = self._read(archive, info, name)
            if content is None:
                continue
            if name.lower().endswith(".zip"):  # by name: office documents and the like are zips too
                self._expand_nested(content, name, depth)
            elif detect_image_format(content):
                self.images.append((name, content))
            else:
                self.skipped.append((name, f"not a supported image ({', '.join(IMAGE_FORMATS)})"))

    def _check_headers(self, entries: list[zipfile.ZipInfo], members: list[zipfile.ZipInfo], label: str) -> None:
        """Refuse unsafe names, too many files, and sizes or ratios past the limits, before reading."""
        for info in entries:
            problem = _unsafe_path(info.filename)
            if problem:
                raise ArchiveError(f"{label}: unsafe member path {info.filename!r} ({problem}); the archive is refused")
            if info.file_size > self.max_ratio * max(info.compress_size, 1):
                ratio = info.file_size / max(info.compress_size, 1)
                raise ArchiveError(
                    f"{label}: member {info.filename!r} expands {ratio:,.0f} times "
                    f"(the limit is {self.max_ratio}); refused as a possible zip bomb"
                )
        budget = self.budget
        budget.files_seen += len(members)
        if budget.files_seen > budget.max_files:
            raise ArchiveError(
                f"{label}: too many files: at least {budget.files_seen}; the limit is {budget.max_files}"
            )
        declared = sum(info.file_size for info in entries)
        if declared <= budget.max_total_bytes < budget.bytes_used + declared:
            raise ArchiveError(
                f"{label}: expands to {format_size(declared)}; with what the upload holds already "
                f"({format_size(budget.bytes_used)}, this archive included) that is more than the "
                f"{format_size(budget.max_total_bytes)} one upload may hold in memory; refused"
            )
        if declared > budget.max_total_bytes:
            raise ArchiveError(
                f"{label}: expands to {format_size(declared)} (declared in its headers); the limit is "
                f"{format_size(budget.max_total_bytes)} in all; refused as a possible zip bomb"
            )

    def _read(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> bytes | None:
        """A member's bytes, read in chunks against the byte budget and the member's own ratio (headers may lie);
        None (and a skip) if it cannot be read."""
        chunks, size, most = [], 0, self.max_ratio * max(info.compress_size, 1)
        try:
            with archive.open(info) as member:
                while chunk := member.read(_CHUNK_BYTES):
                    size += len(chunk)
                    if size > most:
                        raise ArchiveError(
                            f"{name}: expands more than {self.max_ratio} times its compressed "
                            "size; refused as a possible zip bomb"
                        )
                    if self.budget.bytes_used + len(chunk) > self.budget.max_total_bytes:
                        raise ArchiveError(
                            f"{name}: the archive expands past {format_size(self.budget.max_total_bytes)}; "
                            "refused as a possible zip bomb"
                        )
                    self.budget.bytes_used += len(chunk)
                    chunks.append(chunk)
        except ArchiveError:
            raise
        except Exception as exc:  # noqa: BLE001 - zipfile, zlib, bz2 and lzma each raise their own types
            self.skipped.append((name, f"cannot be extracted ({short_reason(exc)})"))
            return None
        return b"".join(chunks)

    def _expand_nested(self, content: bytes, name: str, depth: int) -> None:
        if depth >= self.allow_nested:
            reason = f"nested archive not expanded: nesting is limited to {self.allow_nested} level(s)"
            self.skipped.append((name, reason))
            return
        too_many = _too_many_entries(content, self.budget.max_files)
        if too_many:
            self.skipped.append((name, f"nested archive not expanded: {too_many}"))
            return
        try:
            nested = zipfile.ZipFile(io.BytesIO(content))
        except Exception as exc:  # noqa: BLE001 - as for the outer archive
            self.skipped.append((name, f"corrupt nested archive ({short_reason(exc)})"))
            return
        self.expand(nested, label=name, prefix=name + "/", depth=depth + 1)


def _is_folder_or_hidden(filename: str) -> bool:
    """Folders, hidden files (``.x``), ``__MACOSX`` resource forks and Windows' ``Thumbs.db``."""
    path = filename.replace("\\", "/")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    return path.endswith("/") or not parts or any(part.startswith(".") or part in _JUNK_NAMES for part in parts)


def _unsafe_path(filename: str) -> str | None:
    """Why a member name points outside the archive (backslashes read as separators), or None."""
    path = filename.replace("\\", "/")
    if path.startswith("/"):
        return "absolute path"
    if _DRIVE_LETTER.match(path):
        return "drive letter"
    if ".." in path.split("/"):
        return "parent folder '..'"
    return None
