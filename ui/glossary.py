"""The glossary: what each class means, in words, with a reference image per class (Diagnose and Explorer)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import streamlit as st

from bcd_engine.data.classes import ClassGuide, default_guide, read_class_guide
from bcd_engine.data.images import load_image
from bcd_engine.data.scan import ScanResult
from bcd_engine.data.synthetic import is_synthetic
from bcd_engine.errors import BCDError
from bcd_engine.inference.diagnosis import class_guide_of_run
from bcd_engine.reports import explorer as explorer_tables
from bcd_engine.store import RunStore
from ui import common
from ui.examples import first_image_per_class

REFERENCE_SIZE = 96  # pixels a reference image is shown at


def dataset_glossary(scan: ScanResult) -> None:
    """The glossary of a scanned dataset (Explorer): its ``classes.json`` or the built-in words, and its own first
    image of each class. A malformed file is reported and the built-in words are shown."""
    synthetic = is_synthetic(scan.root)
    try:
        guide = read_class_guide(scan.root, scan.class_names, synthetic=synthetic)
        problem = None
    except BCDError as exc:
        guide, problem = default_guide(scan.class_names, synthetic=synthetic), exc
    samples = explorer_tables.samples_by_class(scan)
    caption = "SYNTHETIC drawing" if synthetic else "from this dataset"
    references = {name: (paths[0], caption) for name, paths in samples.items() if paths}
    show(guide, references, problem=problem)


def run_glossary(run_id: int, *, store: RunStore) -> None:
    """The glossary of a run's classes (Diagnose): the words it recorded or its dataset's, and a reference image
    per class from its dataset folder when this host has it and a visitor may see it, else from the SYNTHETIC
    demo set (a drawing, said so)."""
    run = store.get_run(run_id)
    guide = class_guide_of_run(run_id, store=store)
    data_dir = run.config.get("data_dir") or ""
    own = (
        first_image_per_class(data_dir) if data_dir and Path(data_dir).is_dir() and common.public_path(data_dir) else {}
    )
    drawn = first_image_per_class(common.demo_dataset())
    drawn_by_position = list(drawn.values())
    references = {}
    for k, name in enumerate(guide.class_names):
        if name in own:
            references[name] = (own[name], "SYNTHETIC drawing" if run.dataset.synthetic else "from its dataset")
        elif name in drawn or k < len(drawn_by_position):
            references[name] = (drawn.get(name) or drawn_by_position[k], "SYNTHETIC drawing, not a real cell")
    show(guide, references)


def show(guide: ClassGuide, references: Mapping[str, tuple[str, str]], *, problem: Exception | None = None) -> None:
    """An expander with each class's folder name, plain name, kind and meaning beside its reference image
    (``references``: class -> (image path, caption))."""
    with st.expander("What the classes mean", icon=":material/menu_book:"):
        if problem is not None:
            st.warning(common.public(f"The dataset's class words cannot be used: {problem}"), icon=":material/error:")
        if guide.about:
            st.markdown(common.plain(guide.about))
        for info in guide.classes:
            picture, words = st.columns([1, 5], vertical_alignment="center")
            if info.label in references:
                path, caption = references[info.label]
                try:
                    picture.image(load_image(path, image_size=REFERENCE_SIZE), width=REFERENCE_SIZE, caption=caption)
                except BCDError:
                    picture.caption("no reference image")
            kind = f" ({common.plain(info.kind)})" if info.kind else ""
            meaning = f"  \n{common.plain(info.meaning)}" if info.meaning else ""
            words.markdown(f"**{common.plain(info.label)}**: {common.plain(info.name)}{kind}{meaning}")
        st.caption(f"Source of these words: {guide.source}.")
