"""Tables for the Dataset explorer: dataset choices, samples per class, size and colour statistics."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bcd_engine.data.images import load_image
from bcd_engine.data.scan import ScanResult
from bcd_engine.data.synthetic import DEMO_DATASET_NAME
from bcd_engine.store import RunStore


@dataclass(frozen=True)
class DatasetChoice:
    label: str
    root: str
    synthetic: bool = False


def dataset_choices(
    store: RunStore, demo_root: str | os.PathLike, *, public: Sequence[str | os.PathLike] | None = None
) -> list[DatasetChoice]:
    """The SYNTHETIC demo set at ``demo_root`` first, then the datasets registered in the store.

    With ``public`` (a hosted demo: ``settings.demo_datasets()``) the store's datasets are left out, only
    those folders follow, and no label names a server path. Listing writes nothing: the caller makes the
    demo set (``synthetic.ensure_demo_dataset``) once.
    """
    demo = str(demo_root)
    choices = [DatasetChoice(f"SYNTHETIC demo set ({DEMO_DATASET_NAME}, not medical data)", demo, True)]
    if public is not None:
        return choices + [DatasetChoice(f"{Path(root).name} (public dataset)", str(root)) for root in public]
    choices += [
        DatasetChoice(f"{d.name}: {d.n_images} images ({d.root})", d.root)
        for d in store.list_datasets()
        if d.root != demo
    ]
    return choices


def samples_by_class(scan: ScanResult) -> dict[str, list[str]]:
    """Readable image paths of each class, in scan order."""
    out: dict[str, list[str]] = {name: [] for name in scan.class_names}
    for record in scan.images:
        out[record.class_name].append(record.path)
    return out


def page_of(items: list, page: int, per_page: int) -> tuple[list, int]:
    """Items on ``page`` (1-based, clamped) and the number of pages."""
    n_pages = max(1, math.ceil(len(items) / per_page))
    page = min(max(1, page), n_pages)
    return items[(page - 1) * per_page : page * per_page], n_pages


def image_stats(scan: ScanResult, *, per_class: int = 40, seed: int = 0) -> pd.DataFrame:
    """Per-image size and colour statistics for up to ``per_class`` images of each class (a fixed sample).

    Columns: class, path, width, height, kb, mean_r/g/b, std (grey), brightness.
    """
    rng = np.random.default_rng(seed)
    records = {r.path: r for r in scan.images}
    rows = []
    for class_name, paths in samples_by_class(scan).items():
        chosen = paths if len(paths) <= per_class else sorted(rng.choice(paths, per_class, replace=False))
        for path in chosen:
            record = records[path]
            pixels = load_image(path, image_size=64).reshape(-1, 3).astype(np.float64)
            mean = pixels.mean(axis=0)
            rows.append(
                {
                    "class": class_name,
                    "path": path,
                    "width": record.width,
                    "height": record.height,
                    "kb": record.size_bytes / 1024,
                    "mean_r": mean[0],
                    "mean_g": mean[1],
                    "mean_b": mean[2],
                    "std": pixels.mean(axis=1).std(),
                    "brightness": mean.mean(),
                }
            )
    return pd.DataFrame(rows)


def class_summary(stats: pd.DataFrame) -> pd.DataFrame:
    """Mean of each statistic per class (from :func:`image_stats`)."""
    return stats.drop(columns="path").groupby("class").mean().round(1)


def relative_name(path: str | os.PathLike, data_dir: str | os.PathLike) -> str:
    """``path`` as seen from inside the dataset folder ``data_dir`` (``class/file.png``); its name when outside it."""
    try:
        return Path(path).resolve().relative_to(Path(data_dir).resolve()).as_posix()
    except ValueError:
        return Path(path).name
