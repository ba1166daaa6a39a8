"""Near-duplicate search: gradient hashes (dhash) of every flip and quarter turn, compared bit by bit.

A scan hashes each image in its eight dihedral views; images within :data:`NEAR_DUPLICATE_DISTANCE`
bits in some view are grouped (:func:`near_duplicate_groups`), and :func:`near_copies` tells which
images of one set are copies of images of another (leave-one-dataset-out keeps those out of training).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bcd_engine.data.scan import ImageRecord

from collections.abc import Iterable, Sequence

import imagehash
import numpy as np
from PIL import Image

DHASH_SIZE = 16
NEAR_DUPLICATE_DISTANCE = 12  # dhash bits; reproduces the ALL dataset's published near-duplicate groups
_QUARTER_TURNS = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
N_VIEWS = 8  # dihedral views hashed per image, so a flipped or turned copy is still a near-duplicate
_VIEW_BASE = 4 * (DHASH_SIZE + 1)  # pixels a side of the reduced copy the turned and mirrored views come from


def turned_and_mirrored(img: Image.Image) -> list[Image.Image]:
    """The seven other views: turned by 90, 180 and 270 degrees, and all four mirrored.

    They are made from a copy reduced to _VIEW_BASE pixels a side (the hash is 17 x 16 pixels anyway),
    so a large image costs one extra resize rather than seven full-size turns.
    """
    if max(img.size) > _VIEW_BASE:
        img = img.resize((_VIEW_BASE, _VIEW_BASE), Image.Resampling.BILINEAR)
    turns = [img, *(img.transpose(t) for t in _QUARTER_TURNS)]
    return turns[1:] + [view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for view in turns]


def gradient_hash(img: Image.Image) -> str:
    """16x16 horizontal-gradient hash (dhash) as hex, resized bilinearly.

    Bilinear rather than imagehash.dhash's Lanczos resize: it reproduces the near-duplicate groups
    published with the ALL dataset's MANIFEST exactly (Lanczos moves 4 of its 71 pairs across the
    distance threshold).
    """
    small = np.asarray(img.convert("L").resize((DHASH_SIZE + 1, DHASH_SIZE), Image.Resampling.BILINEAR), dtype=np.int16)
    return str(imagehash.ImageHash(small[:, 1:] > small[:, :-1]))


def exact_duplicate_groups(images: list[ImageRecord]) -> tuple[tuple[str, ...], ...]:
    """Paths of readable images with equal md5, in image order, groups ordered by first member."""
    by_md5: dict[str, list[str]] = {}
    for record in images:
        by_md5.setdefault(record.md5, []).append(record.path)
    return tuple(tuple(paths) for paths in by_md5.values() if len(paths) > 1)


def near_duplicate_groups(images: list[ImageRecord], max_distance: int) -> tuple[tuple[str, ...], ...]:
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


def near_copies(
    records: Sequence[ImageRecord],
    of: Sequence[ImageRecord],
    max_distance: int = NEAR_DUPLICATE_DISTANCE,
    block: int = 512,
) -> list[bool]:
    """For each readable record, whether it is an exact or near-duplicate (in some flip or turn) of one in ``of``."""
    close = np.zeros(len(records), dtype=bool)
    if records and of:
        mine, theirs = _hash_words(list(records)), _hash_words(list(of))
        for start in range(0, len(mine), block):  # a record as stored near a view of one in ``of``
            near = view_distances(mine[start : start + block], theirs) <= max_distance
            close[start : start + block] |= near.any(axis=1)
        for start in range(0, len(theirs), block):  # or one in ``of`` as stored near a view of the record
            close |= (view_distances(theirs[start : start + block], mine) <= max_distance).any(axis=0)
    return close.tolist()


def _hash_words(images: list[ImageRecord]) -> np.ndarray:
    """The readable images' view dhashes as an (n, views, words) uint64 bit array."""
    n_bytes = DHASH_SIZE * DHASH_SIZE // 8
    raw = b"".join(bytes.fromhex(r.dhash or "") for r in images)
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(images), N_VIEWS, n_bytes).view(np.uint64)


def _close_pairs(words: np.ndarray, max_distance: int, block: int = 512) -> set[tuple[int, int]]:
    """Index pairs (i < j) where i as stored is within max_distance bits of some view of j (or j of i)."""
    pairs: set[tuple[int, int]] = set()
    for start in range(0, len(words), block):
        ii, jj = np.nonzero(view_distances(words[start : start + block], words) <= max_distance)
        ii += start
        pairs.update((min(i, j), max(i, j)) for i, j in zip(ii.tolist(), jj.tolist()) if i != j)
    return pairs


def view_distances(rows: np.ndarray, words: np.ndarray) -> np.ndarray:
    """(len(rows), len(words)) uint16: bits between each of ``rows`` as stored and the nearest view of each
    of ``words``, summed word by word (far faster than one popcount-and-sum over a 3-D array)."""
    stored = rows[:, 0, :]
    nearest = np.full((len(rows), len(words)), np.iinfo(np.uint16).max, dtype=np.uint16)
    for view in range(N_VIEWS):
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
