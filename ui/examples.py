"""Example images for Diagnose, one click away: the chosen model's own test images where a visitor may see them,
a few SYNTHETIC examples drawn for the app, and the public datasets the host lists (``BCD_DEMO_DATASETS``)."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from bcd_engine import settings
from bcd_engine.data import synthetic
from bcd_engine.data.images import SUPPORTED_EXTENSIONS
from bcd_engine.reports import runs as run_tables
from bcd_engine.store import RunStore
from bcd_engine.store.records import RunRecord
from ui import common

EXAMPLES_FOLDER = "examples"  # under the cache folder: <cache>/examples/synthetic
SYNTHETIC_EXAMPLES_SEED = 2026  # not the demo set's seed (0): drawings no demo model was trained on
PER_SOURCE = 4  # examples of one source (one per class, up to this many)


@dataclass(frozen=True)
class Example:
    """An example image: its file, its class (the folder it is in) and where it comes from."""

    path: str
    class_name: str
    source: str


@dataclass(frozen=True)
class ExampleUpload:
    """An example image as the uploader hands files to the page (``name``, ``size``, ``getvalue()``, ``file_id``)."""

    name: str
    data: bytes
    file_id: str

    @property
    def size(self) -> int:
        return len(self.data)

    def getvalue(self) -> bytes:
        return self.data


@st.cache_resource(show_spinner="Drawing example images ...")
def synthetic_examples_folder() -> str:
    """A few SYNTHETIC drawings (one per class, 96 px) for visitors to try, drawn once per server process into the
    cache folder with another seed than the demo set's."""
    target = settings.cache_dir() / EXAMPLES_FOLDER / "synthetic"
    if not (target / synthetic.DEFAULT_CLASS_NAMES[0]).is_dir():
        synthetic.make_synthetic_dataset(target, n_per_class=1, image_size=96, seed=SYNTHETIC_EXAMPLES_SEED)
    return str(target)


def examples_for(run: RunRecord | None, *, store: RunStore) -> list[Example]:
    """What a visitor may try with ``run``: first its own test images (one per class) when its dataset folder is
    there and a visitor may see it, then the SYNTHETIC examples, then the host's public datasets."""
    found: list[Example] = []
    if run is not None:
        found += _own_test_images(run, store=store)
    with contextlib.suppress(OSError):  # no writable cache folder: no drawn examples
        found += _first_per_class(synthetic_examples_folder(), "SYNTHETIC examples")
    for root in settings.demo_datasets():
        found += _first_per_class(str(root), f"public set {root.name}")
    seen: set[str] = set()
    return [e for e in found if not (e.path in seen or seen.add(e.path))]


def default_run(store: RunStore) -> RunRecord | None:
    """The model Diagnose offers first. In demo mode, one whose training data matches the examples a visitor can
    try: the best run trained on the SYNTHETIC set or on a folder the host made public (the most images first),
    else the best run overall; outside demo mode the best run on real data
    (:func:`~bcd_engine.reports.runs.default_run`)."""
    if common.demo_mode():
        best = run_tables.best_runs_by_dataset(store).values()
        matching = [r for r in best if r.dataset.synthetic or common.public_path(r.config.get("data_dir") or "/")]
        if matching:
            return max(matching, key=lambda r: (r.dataset.n_images or 0, r.test_accuracy or 0, r.id))
    return run_tables.default_run(store)


def upload_of(example: Example) -> ExampleUpload:
    """The example as an upload (its bytes read now)."""
    data = Path(example.path).read_bytes()
    return ExampleUpload(Path(example.path).name, data, "example:" + hashlib.sha256(data).hexdigest()[:16])


def _own_test_images(run: RunRecord, *, store: RunStore) -> list[Example]:
    data_dir = run.config.get("data_dir")
    evaluation = run_tables.holdout_evaluation(store, run.id)
    if not data_dir or evaluation is None or not Path(data_dir).is_dir() or not common.public_path(data_dir):
        return []
    chosen: dict[str, str] = {}
    for prediction in store.get_predictions(evaluation.id):
        if prediction.true_class not in chosen and Path(prediction.path).is_file():
            chosen[prediction.true_class] = prediction.path
    source = f"test images of {run.dataset.name}"
    return [Example(path, name, source) for name, path in list(chosen.items())[:PER_SOURCE]]


def _first_per_class(root: str, source: str) -> list[Example]:
    """The first image of each class folder of ``root``, for at most :data:`PER_SOURCE` classes."""
    firsts = list(first_image_per_class(root).items())[:PER_SOURCE]
    return [Example(path, name, source) for name, path in firsts]


def first_image_per_class(root: str | Path) -> dict[str, str]:
    """Class folder name -> the path of its first image (by name), for each class folder of ``root`` that has one;
    empty when ``root`` cannot be read."""
    found = {}
    try:
        folders = sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
        for folder in folders:
            images = sorted(
                p for p in folder.iterdir() if p.suffix.lower() in SUPPORTED_EXTENSIONS and not p.name.startswith(".")
            )
            if images:
                found[folder.name] = str(images[0])
    except OSError:
        return {}
    return found
