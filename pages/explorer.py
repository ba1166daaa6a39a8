"""Dataset explorer: what is in a dataset folder, before any training."""

from pathlib import Path

import plotly.express as px
import streamlit as st

from bcd_engine import settings
from bcd_engine.data import kaggle
from bcd_engine.data.images import load_image
from bcd_engine.data.scan import twin_of, twin_root
from bcd_engine.errors import BCDError
from bcd_engine.models.augment import preview_views
from bcd_engine.models.config import AugmentConfig
from bcd_engine.reports import explorer as explorer_tables
from bcd_engine.training import queue
from ui import common, glossary, tables

TRAIN_DATASET_REQUEST = "train.dataset_request"  # read once by the Train page (pages/train.py DATASET_REQUEST)

st.title("Dataset explorer")
common.explain(
    "A dataset is a folder with one subfolder of images per class. Here you see how many images each class "
    "has, sample images, their size and colour per class, duplicates (which must never be split between "
    "training and test) and what training-time augmentation does to one image.\n\n"
    "The default is a **SYNTHETIC** demo set drawn by a program — not medical data. The real ALL dataset "
    "(Aria et al., Kaggle `mehradaria/leukemia`) can be downloaded below or pointed at as a local folder."
)
common.demo_banner()
store = common.store()


@st.cache_data(show_spinner="Drawing the augmented views ...", max_entries=32)
def _augmentation_preview(path: str, cfg: AugmentConfig):
    """Eight augmented views of one image (the first call builds the augmentation graph; later ones are quick)."""
    return preview_views(load_image(path, image_size=128), cfg, n_views=8)


SOURCES = ("Built-in or registered dataset", "Local folder", "Download the ALL dataset (Kaggle)")
demo = common.demo_mode()
# A hosted demo offers no path input and no download: only the synthetic set and the host's public datasets.
source = SOURCES[0] if demo else st.radio("Dataset", SOURCES, horizontal=True, key="explorer_source")
if source == SOURCES[0]:
    public = [str(root) for root in settings.demo_datasets()] if demo else None
    choices = explorer_tables.dataset_choices(store, common.demo_dataset(), public=public)
    choice = st.selectbox("Dataset", choices, format_func=lambda c: c.label, key="explorer_dataset")
    root = choice.root
elif source == SOURCES[1]:
    root = st.text_input(
        "Folder with one subfolder per class", key="explorer_folder", placeholder="~/data/leukemia/Original"
    ).strip()
    if not root:
        st.info("Type the path of a folder on this machine, e.g. the `Original` folder of the ALL dataset.")
        st.stop()
    root = str(Path(root).expanduser())
else:
    st.caption(
        "Needs internet and Kaggle credentials (`~/.kaggle/kaggle.json` or KAGGLE_USERNAME/KAGGLE_KEY). "
        "The dataset's terms forbid redistribution, so bcd never ships it."
    )
    if st.button("Download with kagglehub", key="explorer_kaggle"):
        with st.spinner("Downloading ..."):
            folder, message = kaggle.download_kaggle_dataset()
        st.session_state["explorer_kaggle_path"] = None if folder is None else str(folder)
        (st.success if folder else st.error)(message)
    root = st.session_state.get("explorer_kaggle_path")
    if not root:
        st.stop()

try:
    scan = common.scan(root)
except BCDError as exc:
    st.error(common.public(exc))
    st.stop()

synthetic = Path(root).resolve() == Path(common.demo_dataset()).resolve()
if synthetic:
    st.warning(
        "**SYNTHETIC dataset** — images drawn by a program for demos and tests. Not medical data.",
        icon=":material/science:",
    )

cols = st.columns(4)
cols[0].metric("Images", scan.n_images)
cols[1].metric("Classes", len(scan.class_names))
cols[2].metric("Unreadable files", len(scan.unreadable))
cols[3].metric("Near-duplicate groups", len(scan.near_duplicate_groups))
if not demo and st.button(
    "Train on this dataset",
    key="explorer_train",
    type="primary",
    icon=":material/model_training:",
    help="Opens the Train page with this folder chosen as the dataset (and lists it there from now on).",
):
    try:
        queue.register_dataset(store, scan)
    except BCDError as exc:
        st.error(common.public(exc))
    else:
        st.session_state[TRAIN_DATASET_REQUEST] = scan.root
        st.switch_page("pages/train.py")

glossary.dataset_glossary(scan)  # what each class means, with a reference image
balance, samples, stats_tab, dups, twins, augment = st.tabs(
    ["Class balance", "Samples", "Size and colour", "Duplicates", "Original / Segmented", "Augmentation"]
)

with balance:
    counts = scan.class_counts
    fig = px.bar(
        x=list(counts),
        y=list(counts.values()),
        labels={"x": "class", "y": "images", "color": "class"},
        color=list(counts),
        text=list(counts.values()),
        title="Images per class",
    )
    st.plotly_chart(fig, key="explorer_balance_chart")
    if scan.unreadable:
        st.dataframe(
            [
                {"file": explorer_tables.relative_name(r.path, root), "reason": common.public(r.error)}
                for r in scan.unreadable
            ],
            key="explorer_unreadable",
            hide_index=True,
        )

by_class = explorer_tables.samples_by_class(scan)
with samples:
    c1, c2 = st.columns([2, 1])
    class_name = c1.selectbox("Class", scan.class_names, key="explorer_sample_class")
    per_page = 12
    items, n_pages = explorer_tables.page_of(by_class[class_name], 1, per_page)
    page = c2.number_input(f"Page (of {n_pages})", 1, n_pages, 1, key="explorer_sample_page")
    items, _ = explorer_tables.page_of(by_class[class_name], int(page), per_page)
    grid = st.columns(6)
    for i, path in enumerate(items):
        grid[i % 6].image(load_image(path), caption=Path(path).name, width="stretch")

with stats_tab:
    stats = common.image_stats(root)
    st.caption(f"Measured on up to 40 images per class ({len(stats)} images), resized to 64 px.")
    tables.show(
        explorer_tables.class_summary(stats).reset_index(),
        key="explorer_stats_table",
        columns={
            "class": "class",
            "width": "width (px)",
            "height": "height (px)",
            "kb": "file size (KB)",
            "mean_r": "mean red",
            "mean_g": "mean green",
            "mean_b": "mean blue",
            "std": "contrast (std)",
            "brightness": "brightness",
        },
    )
    channels = {"mean_r": "red", "mean_g": "green", "mean_b": "blue"}
    long = stats.rename(columns=channels).melt(
        id_vars=["class"], value_vars=list(channels.values()), var_name="channel", value_name="mean value (0-255)"
    )
    st.plotly_chart(
        px.box(
            long,
            x="class",
            y="mean value (0-255)",
            color="channel",
            title="Mean colour per class",
            color_discrete_map={"red": "#d62728", "green": "#2ca02c", "blue": "#1f77b4"},
        ),
        key="explorer_colour_chart",
    )
    st.caption(
        "Classes that differ in stain colour can be told apart without looking at cell shape — "
        "a shortcut a CNN may learn instead of morphology."
    )

with dups:
    st.write(
        f"{len(scan.duplicate_groups)} exact-duplicate groups (same bytes), "
        f"{len(scan.near_duplicate_groups)} near-duplicate groups (similar gradient hash)."
    )
    kind = st.radio("Show", ("exact", "near"), horizontal=True, key="explorer_dup_kind")
    groups = scan.duplicate_groups if kind == "exact" else scan.near_duplicate_groups
    if groups:
        group = st.number_input(f"Group (of {len(groups)})", 1, len(groups), 1, key="explorer_dup_group")
        members = groups[int(group) - 1][:6]
        for col, path in zip(st.columns(len(members)), members):
            col.image(load_image(path), caption=f"{Path(path).parent.name}/{Path(path).name}", width="stretch")
    else:
        st.success("No such groups in this dataset.")

with twins:
    other = twin_root(root)
    if other is None:
        st.info("This folder has no `Original`/`Segmented` twin next to it (the ALL dataset has both).")
    elif not common.public_path(other):
        st.info(f"This demo does not show {other.name}, the twin next to this folder: it is not a public dataset.")
    else:
        c1, c2 = st.columns([1, 2])
        twin_class = c1.selectbox("Class", scan.class_names, key="explorer_twin_class")
        path = c2.selectbox(
            f"Image ({len(by_class[twin_class])} in {twin_class})",
            by_class[twin_class],
            format_func=lambda p: Path(p).name,
            key=f"explorer_twin_{twin_class}",
        )
        twin = twin_of(path, root)
        left, right = st.columns(2)
        left.image(load_image(path), caption=f"{Path(root).name}: {Path(path).name}")
        if twin is None:
            right.info(f"No file with this name in {other.name}.")
        else:
            right.image(load_image(twin), caption=f"{other.name}: {twin.name}")

with augment:
    st.caption(
        "Training shows the network random variations of each image, so it learns what does not "
        "matter (orientation, small colour shifts). View 0 is the original."
    )
    if st.toggle("Show augmentation preview", key="explorer_aug_on"):
        c1, c2, c3, c4 = st.columns(4)
        cfg = AugmentConfig(
            rotation_degrees=c1.slider("Rotation (degrees)", 0.0, 45.0, 15.0, key="explorer_aug_rot"),
            scale=c2.slider("Zoom", 0.0, 0.4, 0.1, key="explorer_aug_scale"),
            brightness=c3.slider("Brightness", 0.0, 0.4, 0.1, key="explorer_aug_bright"),
            hue=c4.slider("Hue", 0.0, 0.2, 0.02, key="explorer_aug_hue"),
        )
        views = _augmentation_preview(by_class[scan.class_names[0]][0], cfg)
        for i, (col, view) in enumerate(zip(st.columns(8), views)):
            col.image(view, caption=f"view {i}", width="stretch")
