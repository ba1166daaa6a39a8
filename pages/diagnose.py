"""Diagnose: smear images (one, several, or a zip archive) through one trained run or an ensemble."""

import plotly.express as px
import streamlit as st

from bcd_engine.data.images import MAX_JPEG_SCANS
from bcd_engine.errors import BCDError
from bcd_engine.evaluation.ood import DEFAULT_PASS_RATE
from bcd_engine.inference import diagnosis, explain
from bcd_engine.inference.results import Reading
from bcd_engine.inference.service import STEP_IMAGES
from bcd_engine.reports import runs as run_tables
from bcd_engine.store import artifacts
from ui import common, tables

SHOWN_ERRORS = 5  # unusable files listed one by one above the results; the rest are in the table
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

st.title("Diagnose images")
st.warning(
    "**Research and teaching use only — not a medical device.** Never use it to diagnose anyone.",
    icon=":material/warning:",
)
common.explain(
    "Upload peripheral blood smear images (or one zip archive of them) and a trained model tells you which "
    "class each looks most like, with a probability per class. The model looks at every image 8 times — "
    'flipped and turned, since a smear has no "up" — and averages; if those looks disagree, or no class '
    "stands out, the result is flagged. Before answering, the model checks that the image looks like the "
    "images it was trained on; an image from another lab, stain or microscope, or not a smear at all, gets "
    "no answer. The probabilities are calibrated on the model's validation images (a shown 80% was right "
    "about 80% of the time there), but they are not a chance of disease, and a confident answer can still "
    "be wrong. A model trained on the SYNTHETIC demo set knows nothing about real smears. "
    "The heatmap (Grad-CAM) shows where in the image the model looked for its answer."
)
common.demo_banner()
store = common.store()

default = run_tables.default_run(store)
if default is None:
    common.no_runs_yet("diagnose")
runs = store.list_runs(status="completed")
best = run_tables.best_runs_by_dataset(store)
labels = {r.id: run_tables.run_label_with_dataset(r, best) for r in runs}
wanted = common.requested_run()  # a link from the Train page's "finished" message
run_ids = st.multiselect(
    "Model (choose several for an ensemble: their probabilities are averaged)",
    list(labels),
    default=[wanted if wanted in labels else default.id],
    format_func=labels.get,
    key="diagnose_runs",
    max_selections=4,
)
uploads = st.file_uploader(
    "Smear images or a zip archive",
    type=["jpg", "jpeg", "png", "bmp", "tif", "tiff", "gif", "webp", "zip"],
    accept_multiple_files=True,
    key="diagnose_upload",
    help=f"At most {diagnosis.MAX_UPLOAD_BYTES // 2**20} MB per image, "
    f"{diagnosis.MAX_ARCHIVE_UPLOAD_BYTES // 2**20} MB per zip archive and "
    f"{diagnosis.MAX_UPLOAD_TOTAL_BYTES // 2**20} MB for the whole upload with its archives expanded; each "
    f"image at most {diagnosis.MAX_UPLOAD_IMAGE_PIXELS / 1e6:g} megapixels (frames included) and "
    f"{diagnosis.MAX_UPLOAD_PIXELS / 1e6:g} megapixels in all, and a JPEG of at most {MAX_JPEG_SCANS} scans. "
    "A file that cannot be used is listed with the reason; the others are still diagnosed.",
)
if not run_ids:
    st.info("Choose at least one model.")
    st.stop()
if not uploads:
    st.stop()

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
    result = good[0]
    st.subheader(common.plain(result.name))
    if result.reading is Reading.OUT_OF_DOMAIN:  # no class is the answer: only why, and the gate's figures
        st.error(result.advice, icon=READING_ICONS[Reading.OUT_OF_DOMAIN])
        st.caption(
            f"Unusualness score {result.ood_score:,.0f}; images scoring above {result.ood_threshold:,.0f} "
            f"are refused ({DEFAULT_PASS_RATE:.0%} of the model's own validation images score below it). The "
            "score measures how far the image lies from the training images in the network's feature space."
        )
        st.stop()
    (st.success if result.reading is Reading.OK else st.warning)(result.advice, icon=READING_ICONS[result.reading])
    left, right = st.columns(2)
    probabilities = result.calibrated_probabilities
    certainty = result.uncertainty
    right.metric(
        "Predicted class",
        result.predicted_class,
        f"{certainty['confidence']:.1%} confidence",
        delta_color="off",
        delta_arrow="off",
    )
    fig = px.bar(
        x=list(probabilities.values()),
        y=list(probabilities),
        orientation="h",
        range_x=[0, 1],
        labels={"x": f"calibrated probability (mean of {certainty['views']} looks)", "y": "class"},
        text=[f"{p:.1%}" for p in probabilities.values()],
    )
    right.plotly_chart(fig, key="diagnose_probabilities")
    gate = (
        "The image looks like the model's training images (it passed the out-of-domain check)."
        if result.in_domain
        else "This run has no out-of-domain check: it cannot tell whether the image is like its training images."
        if result.in_domain is None
        else ""
    )
    right.caption(
        f"Views that disagree with the answer: {certainty['disagreement']:.0%} · "
        f"lead over the runner-up: {certainty['margin']:.1%}. {gate}"
    )
    opacity = left.slider(
        "Heatmap opacity",
        0.0,
        1.0,
        0.45,
        0.05,
        key="diagnose_opacity",
        help="Grad-CAM of the first chosen model for the answer shown: red is where it looked for that class.",
    )
    try:
        image, heatmap = common.grad_cam(diagnoser.run_ids[0], result.image, result.predicted_class)
        left.image(
            explain.overlay(image, heatmap, opacity=opacity),
            width="stretch",
            caption=f"{common.plain(result.name)} with Grad-CAM (run {diagnoser.run_ids[0]})",  # Markdown
        )
    except BCDError as exc:
        left.warning(common.public(f"No heatmap for this image: {exc}"))
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
            "microscope, or not a blood smear): they get no class in the table.",
            icon=":material/block:",
        )
    shown = {
        "image": "image",
        "predicted_class": "predicted class",
        "reading": "reading",
        "confidence": ("confidence", st.column_config.ProgressColumn(min_value=0, max_value=1, format="percent")),
        "margin": ("lead over runner-up", tables.percent()),
        "disagreement": ("views that disagree", tables.percent()),
        "in_domain": ("like the training images", st.column_config.CheckboxColumn()),
        "ood_score": ("unusualness score", tables.decimals(0)),
        "error": ("why unusable", tables.wide_text()),
    }
    tables.show(
        table.assign(reading=table["reading"].map(READINGS)),
        key="diagnose_table",
        columns={
            **{c: spec for c, spec in shown.items() if c in table},
            **{c: (c, tables.percent()) for c in table if c.startswith("p(")},
        },
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
