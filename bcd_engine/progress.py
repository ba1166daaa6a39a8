"""Progress bars on stderr (stdout stays clean for ``--json``)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, description: str, *, enabled: bool = True, unit: str = "img") -> tqdm:
    """A tqdm bar on stderr; a silent one when ``enabled`` is false."""
    return tqdm(
        total=total, desc=description, unit=unit, file=sys.stderr, disable=not enabled, leave=False, dynamic_ncols=True
    )
