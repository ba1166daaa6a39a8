"""Diagnose: smear images (one, several, a zip archive, or an example) through one trained run or an ensemble."""

import plotly.express as px
import streamlit as st

from bcd_engine.data.images import MAX_JPEG_SCANS
from bcd_engine.data.regions import Region
from bcd_engine.errors import BCDError
from bcd_engine.inference import diagnosis
from bcd_engine.inference.results import Diagnosis, Reading
from bcd_engine.inference.service import STEP_IMAGES
from bcd_engine.reports import runs as run_tables
from bcd_engine.store import artifacts
from ui import common, examples, glossary, heatmap, tables

SHOWN_ERRORS = 5  # unusable files listed one by one above the results; the rest are in the table
EXAMPLES_PER_ROW = 4
UPLOADS = "diagnose.uploads"  # the files being diagnosed: the last upload, or all added on purpose
UPLOADER_ROUND = "diagnose.uploader_round"  # a new uploader (empty) after each upload is taken
READINGS = {
    Reading.OK: "ok",
    Reading.UNSURE: "unsure",
    Reading.CONFLICTING: "views conflict",
    Reading.OUT_OF_DOMAIN: "out of domain",
}
READING_ICONS = {
    Reading.OK: ":material/check_circle:",
    Reading.UNSURE: ":material/help:",
    Reading.CONFLICTING: ":material/warning:",
    Reading.OUT_OF_DOMAIN: ":material/block:",
}


def _uploader_key() -> str:
    turn = st.session_state.get(UPLOADER_ROUND, 0)
    return "diagnose_upload" if turn == 0 else f"diagnose_upload_{turn}"


def _take_upload() -> None:
    """Move the uploader's files to the images being diagnosed (replacing them unless the visitor adds on purpose)
    and give the next upload an empty uploader, so the page never shows files it is not diagnosing."""
    new = list(st.session_state.get(_uploader_key()) or [])
    if not new:
        return
    kept = st.session_state.get(UPLOADS, []) if st.session_state.get("diagnose_add") else []
    st.session_state[UPLOADS] = kept + new
    st.session_state[UPLOADER_ROUND] = st.session_state.get(UPLOADER_ROUND, 0) + 1


def _try_example(example: examples.Example) -> None:
    st.session_state[UPLOADS] = [examples.upload_of(example)]


def _clear_uploads() -> None:
    st.session_state.pop(UPLOADS, None)


def show_refusal(result: Diagnosis) -> None:
    """An image out of domain: the image itself, why there is no answer and what to do; no class, no confidence."""
    st.error(result.advice, icon=READING_ICONS[Reading.OUT_OF_DOMAIN])
    picture, next_steps = st.columns([1, 2])
    if result.image is not None:  # framed: a blank or white image is still seen
        picture.container(border=True).image(result.image, width="stretch", caption="The image as the model saw it")
    next_steps.markdown(
        "**What you can do**\n"
        "- Choose another model above, one trained on images like yours (same stain, microscope and magnification).\n"
        "- Train a model on images from your own lab (Train page; not in a hosted demo).\n"
        "- Try one of the example images above to see what this model does know."
    )
    st.caption(
        f"Out of domain: unusualness score {result.ood_score:,.0f}; this model refuses images scoring above "
        f"{result.ood_threshold:,.0f}. The score measures how far the image lies from the training images in the "
        "network's feature space."
    )


def show_answer(result: Diagnosis, run_id: int) -> None:
    """One answered image: the answer in words first, then the class, its calibrated probability and the reading,
    the probabilities per class, and the Grad-CAM beside the image."""
    certainty = result.uncertainty
    st.markdown(f"### {common.plain(result.in_words)}")
    if result.class_info is not None and result.class_info.meaning:
        st.markdown(common.plain(result.class_info.meaning))
    (st.success if result.reading is Reading.OK else st.warning)(result.advice, icon=READING_ICONS[result.reading])
    left, right = st.columns(2)
    left.metric(
        "Predicted class",
        result.answer,
        f"{result.confidence:.1%} calibrated probability",
        delta_color="off",
        delta_arrow="off",
    )
    gate = (
        "The image looks like the model's training images (it passed the out-of-domain check)."
        if result.in_domain
        else "This run has no out-of-domain check: it cannot tell whether the image is like its training images."
    )
    left.caption(
        f"Reading: **{READINGS[result.reading]}**. Views that disagree with the answer: "
        f"{certainty['disagreement']:.0%} · lead over the runner-up: {certainty['margin']:.1%}. {gate}"
    )
    probabilities = result.calibrated_probabilities
    fig = px.bar(
        x=list(probabilities.values()),
        y=list(probabilities),
        orientation="h",
        range_x=[0, 1],
        labels={"x": f"calibrated probability (mean of {certainty['views']} looks)", "y": "class"},
        text=[f"{p:.1%}" for p in probabilities.values()],
        height=220,
    )
    right.plotly_chart(fig, key="diagnose_probabilities")
    st.markdown("**Where the model looked** (Grad-CAM of the first chosen model, for the answer)")
    opacity = st.slider(
        "Heatmap opacity",
        0.0,
        1.0,
        0.45,
        0.05,
        key="diagnose_opacity",
        help="How strongly the heatmap covers the image: 0 shows the image alone.",
    )
    try:
        image, cam = common.grad_cam(run_id, result.image, result.predicted_class)
    except BCDError as exc:
        st.warning(common.public(f"No heatmap for this image: {exc}"))
        return
    heatmap.show(
        image,
        cam,
        opacity=opacity,
        caption=f"{common.plain(result.name)} with Grad-CAM (run {run_id})",
        regions=masked_regions(run_id),
    )


def masked_regions(run_id: int) -> tuple[Region, ...]:
    """The regions the run masked (flagged by its dataset's audit, or asked for): heat there gets a note."""
    recorded = (store.get_run(run_id).config.get("mask") or {}).get("regions") or []
    return tuple(Region(**region) for region in recorded)


def show_detail(result: Diagnosis, run_id: int) -> None:
    st.subheader(common.plain(result.name))
    if result.reading is Reading.OUT_OF_DOMAIN:  # no class is the answer: the image, why, and what to do
        show_refusal(result)
    else:
        show_answer(result, run_id)


st.title("Diagnose images")
st.warning(
    "**Research and teaching use only — not a medical device.** Never use it to diagnose anyone.",
    icon=":material/warning:",
)
common.explain(
    "Upload peripheral blood smear images (or one zip archive of them), or try an example, and a trained model "
    "tells you which class each looks most like, in words first (what the class means: e.g. hematogones are "
    "benign B-cell precursors, pro-B ALL blasts are leukemia), then the class name and its probability. The "
    'model looks at every image 8 times — flipped and turned, since a smear has no "up" — and averages; if '
    "those looks disagree, or no class stands out, the result is flagged. Before answering, the model checks "
    "that the image looks like the images it was trained on; an image from another lab, stain or microscope, "
    "or not a smear at all, gets no answer and no probability. The probabilities are calibrated on the model's "
    "validation images (a shown 80% was right about 80% of the time there), but they are not a chance of "
    "disease, and a confident answer can still be wrong. A model trained on the SYNTHETIC demo set knows nothing "
    "about real smears. The heatmap (Grad-CAM) shows where in the image the model looked for its answer: a model "
    "that looks at the border or a label instead of the cell has learnt a shortcut. "
    '"What the classes mean" at the bottom of the page explains each class.'
)
common.demo_banner()
store = common.store()

default = examples.default_run(store)
if default is None:
    common.no_runs_yet("diagnose")
runs = store.list_runs(status="completed")
best = run_tables.best_runs_by_dataset(store)
labels = {r.id: run_tables.run_label_with_dataset(r, best) for r in runs}
wanted = common.requested_run()  # a link from the Train page's "finished" message
run_ids = st.multiselect(
    "Model (several: an ensemble, their probabilities averaged)",
    list(labels),
    default=[wanted if wanted in labels else default.id],
    format_func=labels.get,
    key="diagnose_runs",
    max_selections=4,
)
if not run_ids:
    st.info("Choose at least one model.")
    st.stop()

offered = examples.examples_for(store.get_run(run_ids[0]), store=store)
if offered:
    st.markdown("**Try an example** (one click diagnoses it)")
    by_source: dict[str, list[tuple[int, examples.Example]]] = {}
    for number, example in enumerate(offered):
        by_source.setdefault(example.source, []).append((number, example))
    for source, row in by_source.items():
        label, *columns = st.columns([2] + [1] * EXAMPLES_PER_ROW, vertical_alignment="center")
        label.markdown(common.plain(source[0].upper() + source[1:]))  # a folder's name, as text
        for column, (number, example) in zip(columns, row[:EXAMPLES_PER_ROW]):
            column.image(example.path, width=48)
            column.button(
                example.class_name,
                key=f"diagnose_example_{number}",
                on_click=_try_example,
                args=(example,),
                width="stretch",
            )

adding = st.toggle(
    "Add to the images already here",
    key="diagnose_add",
    help="Off: a new upload replaces the images diagnosed so far. On: it joins them.",
)
st.file_uploader(
    "Smear images or a zip archive",
    type=["jpg", "jpeg", "png", "bmp", "tif", "tiff", "gif", "webp", "zip"],
    accept_multiple_files=True,
    key=_uploader_key(),
    on_change=_take_upload,
    help=f"Limits per upload: an image at most {diagnosis.MAX_UPLOAD_BYTES // 2**20} MB and "
    f"{diagnosis.MAX_UPLOAD_IMAGE_PIXELS / 1e6:g} megapixels, a zip archive at most "
    f"{diagnosis.MAX_ARCHIVE_UPLOAD_BYTES // 2**20} MB (the largest file the uploader takes), "
    f"{diagnosis.MAX_UPLOAD_FILES:,} images and {diagnosis.MAX_UPLOAD_TOTAL_BYTES // 2**20} MB with archives "
    f"expanded, {diagnosis.MAX_UPLOAD_PIXELS / 1e6:g} megapixels in all, and a JPEG of at most {MAX_JPEG_SCANS} "
    "scans. A file that cannot be used is listed with the reason; the others are still diagnosed.",
)
uploads = st.session_state.get(UPLOADS, [])
if not uploads:
    glossary.run_glossary(run_ids[0], store=store)
    st.stop()
names, clear = st.columns([5, 1], vertical_alignment="center")
shown_names = ", ".join(common.plain(u.name) for u in uploads[:5]) + (" ..." if len(uploads) > 5 else "")
names.markdown(f"Diagnosing {len(uploads)} file(s): {shown_names}")
clear.button("Clear", key="diagnose_clear", on_click=_clear_uploads, icon=":material/close:")

try:
    diagnoser = common.load_diagnoser(tuple(run_ids))
except BCDError as exc:
    st.error(common.public(f"Cannot use these models: {exc}"))
    st.stop()

# Diagnose once per (models, uploads): moving the opacity slider or downloading must not redo the work.
job = (tuple(artifacts.model_identity(r, store=store) for r in run_ids), tuple(u.file_id for u in uploads))
if st.session_state.get("diagnose_job", (None,))[0] != job:
    # Each file's size is charged before it is read, and its header before any pixel is decoded.
    sources, rejected = diagnosis.upload_sources(uploads)
    st.session_state.pop("diagnose_job", None)
    # On the server's shared queue; a lone image keeps its decoded pixels for its heatmap (never a batch). The
    # steps own the sources, letting each image's bytes go once it is decoded, so the page keeps no list of them.
    # A step holds a few images, so that a large upload holds other visitors up by a small step at a time.
    count = len(sources)
    steps = diagnoser.diagnose_steps(sources, keep_images=count == 1, batch_size=STEP_IMAGES)
    del sources
    results = (
        common.run_queued(steps, images=count, describe=lambda done, total: f"Diagnosed {done} of {total} image(s)")
        if count
        else []
    )
    del steps
    st.session_state["diagnose_job"] = (job, rejected + results)  # whole files refused first
_, results = st.session_state["diagnose_job"]
if not results:
    st.warning("No images found in the upload (an archive holding only folders or hidden files?).")
good = [r for r in results if r.usable]
unusable = [r for r in results if not r.usable]
for bad in unusable[:SHOWN_ERRORS]:
    name, reason = (common.plain(common.public(text)) for text in (bad.name, bad.error))  # a visitor's text, as text
    st.error(f"**{name}** cannot be used: {reason}", icon=":material/block:")
if len(unusable) > SHOWN_ERRORS:
    st.error(
        f"... and {len(unusable) - SHOWN_ERRORS} more files cannot be used: the table below gives each reason.",
        icon=":material/block:",
    )

if len(good) == 1 and len(results) == 1:
    show_detail(good[0], diagnoser.run_ids[0])
elif results:
    table = diagnosis.results_frame(results)
    flagged = int((table["reading"].isin([Reading.UNSURE, Reading.CONFLICTING])).sum())
    refused = int((table["reading"] == Reading.OUT_OF_DOMAIN).sum())
    st.metric(
        "Images diagnosed",
        len(good),
        f"{flagged} flagged, {refused} out of domain, {len(results) - len(good)} unusable",
        delta_color="off",
        delta_arrow="off",
    )
    if refused:
        st.warning(
            f"{refused} image(s) do not look like the images the model was trained on (another lab, stain or "
            "microscope, or not a blood smear): they get no class and no probability in the table.",
            icon=":material/block:",
        )
    shown = {
        "image": "image",
        "in_words": ("answer", tables.wide_text()),
        "predicted_class": "class",
        "reading": "reading",
        "confidence": (
            "calibrated probability",
            st.column_config.ProgressColumn(min_value=0, max_value=1, format="percent"),
        ),
        "margin": ("lead over runner-up", tables.percent()),
        "disagreement": ("views that disagree", tables.percent()),
        "in_domain": ("like the training images", st.column_config.CheckboxColumn()),
        "ood_score": ("unusualness score", tables.decimals(0)),
        "error": ("why unusable", tables.wide_text()),
    }
    st.caption("Select a row to see that image's answer and heatmap.")
    tables.show(
        table.assign(reading=table["reading"].map(READINGS)),
        key="diagnose_table",
        columns={
            **{c: spec for c, spec in shown.items() if c in table},
            **{c: (c, tables.percent()) for c in table if c.startswith("p(")},
        },
        on_select="rerun",
        selection_mode="single-row",
    )
    st.download_button(
        "Download results (CSV)",
        diagnosis.results_csv(results),
        "bcd_diagnosis.csv",
        "text/csv",
        key="diagnose_csv",
        icon=":material/download:",
        on_click="ignore",
    )
    selected = st.session_state.get("diagnose_table")
    rows = list(selected["selection"]["rows"]) if selected else []
    if rows and results[rows[0]].usable:
        # The chosen image is decoded again (the batch kept no pixels), once per selection.
        if st.session_state.get("diagnose_detail", (None,))[0] != (job, rows[0]):
            name = results[rows[0]].name
            again = [source for source in diagnosis.upload_sources(uploads)[0] if source.name == name][:1]
            detail = common.run_queued(
                diagnoser.diagnose_steps(again, keep_images=True),
                images=len(again),
                describe=lambda done, total: "Looking at the chosen image",
            )
            st.session_state["diagnose_detail"] = ((job, rows[0]), detail[0] if detail else None)
        _, chosen = st.session_state["diagnose_detail"]
        if chosen is not None and chosen.usable:
            st.divider()
            show_detail(chosen, diagnoser.run_ids[0])
    elif rows:
        st.info("That file could not be used: its row says why.")
glossary.run_glossary(run_ids[0], store=store)
