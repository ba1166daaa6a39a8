"""Files: content digests, atomic writes (a reader never sees a half-written file) and removing what a killed
writer left."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp", replace: bool = True) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; renamed onto ``path`` when the block ends, removed if it fails.

    The parent folder is created; ``suffix`` ends the temporary file's name (for writers that look at it).
    With ``replace=False`` a file already at ``path`` (another writer's) is kept and ``FileExistsError`` raised.
    Raises ``OSError`` as the file system does; callers decide what a failed write means for them.
    The temporary file is named ``.<name>.<random><suffix>``; a killed writer leaves it behind
    (:func:`remove_stale_temp_files` removes such files).

    >>> with atomic_path("cache/index.json") as tmp:  # doctest: +SKIP
    ...     tmp.write_text("{}")
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        if replace:
            os.replace(tmp, target)
        else:
            _move_unless_taken(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _move_unless_taken(tmp: str, target: Path) -> None:
    """Move ``tmp`` to ``target`` unless a file is there (FileExistsError): a hard link, which fails when the name
    is taken, or on a file system without hard links a check and a rename."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network shares)
        if target.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(target)) from None
        os.replace(tmp, target)
    else:
        os.unlink(tmp)


def remove_stale_temp_files(folder: Path, *, older_than_s: float) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` left in ``folder`` (not below it) untouched for
    ``older_than_s`` seconds (a younger one may be being written now); the files removed."""
    cutoff = time.time() - older_than_s
    removed = []
    for path in folder.glob(".?*.*"):
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove: it stays
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
