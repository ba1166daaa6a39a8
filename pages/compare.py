"""Compare runs: runs table, cross-validation, leave-one-dataset-out, shortcut audit, curves, matrices, calibration."""

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from bcd_engine.data.images import load_image
from bcd_engine.errors import BCDError
from bcd_engine.export import archive, run_bundle
from bcd_engine.inference import explain
from bcd_engine.reports import comparison
from bcd_engine.reports import jobs as job_tables
from bcd_engine.reports import runs as run_tables
from bcd_engine.store import JobQueue, artifacts, latest_evaluation
from ui import charts, common, occlusion, tables

TOP = {"t": 110}  # figure margin with room for charts.figure_title's three lines
AUDIT_DASHES = {"colour only": "dash", "corner only": "dot", "chance": "longdashdot"}
EXPORT_FORMATS = {"tflite": "TensorFlow Lite", "keras": "Keras (.keras)"}

st.title("Compare runs")
common.explain(
    "Each run is one backbone trained with one configuration and tested on images it never saw (its test "
    "split). **Accuracy** is the share of test images classified right; **AUC** (area under the ROC curve) "
    "measures how well the scores rank each class above the others, 1.0 being perfect. The numbers in brackets, "
    "like 0.996 (0.990–1.000), are **95% confidence intervals**: the test images were resampled 1,000 times and "
    "the figure stayed in that range 95% of the time. A small test set gives a wide interval, and two runs whose "
    "intervals overlap may not really differ. Every figure says which **protocol** produced it: a hold-out split, "
    "one fold of a cross-validation, or training without one dataset and testing on it. The **confusion "
    "matrix** shows which classes are mixed up (rows: true class, columns: predicted). The **shortcut audit** "
    "asks how far colour alone gets: a model near that line may be reading colour rather than cells. The "
    "thesis rows are the numbers the thesis reported, for reference — they were measured on a different split "
    "and protocol."
)
common.demo_banner()
store = common.store()


@st.cache_data(show_spinner=False, max_entries=4)
def _store_views(url: str, revision: str):
    """The runs table, the run records and the completed runs' evaluations, read once per store revision
    (which every write they show moves on, metrics added to an existing evaluation by ``calibrate`` included)."""
    runs = run_tables.runs_frame(store)
    records = {r.id: r for r in store.list_runs()}
    return runs, records, comparison.evaluations_by_run(store, runs.loc[runs["status"] == "completed", "id"])


runs, records, evaluations = _store_views(store.url, store.revision())
audits: dict[str, dict | None] = {}


def audit_of(root: str) -> dict | None:
    """The cached shortcut audit of a dataset folder (None when never run or the folder is not readable here)."""
    if root not in audits:
        try:
            audits[root] = comparison.cached_audit(common.scan(root))
        except BCDError:
            audits[root] = None
    return audits[root]


def add_audit_lines(fig: go.Figure, roots: list[str]) -> None:
    """Draw the audited datasets' colour-only, corner-only and chance accuracies as labelled horizontal lines."""
    known = {root: audit for root in roots if (audit := audit_of(root)) is not None}
    for ref in comparison.audit_references(known).itertuples():  # named in the legend, never over the bars
        fig.add_hline(y=ref.accuracy, line_dash=AUDIT_DASHES[ref.reference], line_color="grey")
        fig.add_scatter(
            x=[None],
            y=[None],
            mode="lines",
            line={"dash": AUDIT_DASHES[ref.reference], "color": "grey"},
            name=f"{ref.reference} ({ref.dataset}): {ref.accuracy:.1%}",
        )


def interval_bars(frame: pd.DataFrame, x: str, bars: dict[str, str], title: str) -> go.Figure:
    """Grouped bars of ``frame``'s interval columns (column -> legend name) with 95% CI error bars."""
    fig = go.Figure(
        [
            go.Bar(name=name, x=frame[x], y=frame[column], error_y=charts.error_bar(frame, column))
            for column, name in bars.items()
        ]
    )
    return fig.update_layout(title=title, barmode="group", yaxis_title="share of test images", yaxis_range=[0, 1.05])


st.subheader("Runs")
c1, c2, c3, c4 = st.columns(4)
backbones = c1.multiselect("Backbone", sorted(runs["backbone"].unique()), key="compare_f_backbone")
statuses = c2.multiselect("Status", sorted(runs["status"].unique()), key="compare_f_status")
protocols = c3.multiselect("Protocol", sorted(runs["protocol"].unique()), key="compare_f_protocol")
datasets = c4.multiselect(
    "Dataset",
    sorted(runs["dataset"].unique()),
    key="compare_f_dataset",
    help="Accuracies are only comparable between runs on the same dataset.",
)
shown = runs
for column, wanted in (("backbone", backbones), ("status", statuses), ("protocol", protocols), ("dataset", datasets)):
    if wanted:
        shown = shown[shown[column].isin(wanted)]
SORTS = {
    "test_accuracy": "test accuracy",
    "macro_auc": "macro AUC",
    "macro_f1": "macro F1",
    "parameters_M": "parameters",
    "seconds": "training time",
    "id": "run id",
}
sort_by = st.selectbox("Sort by", list(SORTS), format_func=SORTS.get, key="compare_sort")
table = comparison.runs_table(shown, evaluations).sort_values(
    sort_by, ascending=sort_by in ("parameters_M", "seconds"), na_position="last"
)
tables.show(
    table.assign(time=table["seconds"].map(tables.duration)),
    key="compare_runs_table",
    columns={
        "id": "run",
        "backbone": "backbone",
        "dataset": "dataset",
        "status": ("status", tables.status()),
        "accuracy (95% CI)": "test accuracy (95% CI)",
        "macro AUC (95% CI)": "macro AUC (95% CI)",
        "macro_f1": ("macro F1", tables.decimals()),
        "ece": ("ECE", st.column_config.NumberColumn(format="%.3f", help=comparison.ECE_MEANING)),
        "ece_calibrated": (
            "ECE after calibration",
            st.column_config.NumberColumn(
                format="%.3f",
                help="The test ECE with the run's temperature (see Reliability below for what it did and why).",
            ),
        ),
        "protocol": ("protocol", tables.wide_text()),
        "parameters_M": ("parameters (millions)", tables.decimals(1)),
        "weights": "weights",
        "image_size": ("image size (px)", tables.decimals(0)),
        "learning_rate": ("learning rate", st.column_config.NumberColumn(format="%g")),
        "epochs": ("epochs", tables.decimals(0)),
        "views": ("training views", tables.decimals(0)),
        "tta_views": ("test-time views", tables.decimals(0)),
        "head": "head",
        "time": "training time",
        "created": ("queued at", st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm")),
        "error": ("error", tables.wide_text()),
    },
)

st.subheader("Reference: reported results (not run here)")
tables.show(
    comparison.reference_frame(),
    key="compare_reference",
    columns={
        "model": "model",
        "train_accuracy": ("training accuracy", tables.percent()),
        "val_accuracy": ("validation accuracy", tables.percent()),
        "95% CI": "95% CI",
        "source": "source",
        "protocol": ("protocol", tables.wide_text()),
    },
)
st.caption(
    "Thesis: *A Transfer Learning Approach for Blood Cancer Detection*; dataset authors: Ghaderzadeh "
    "et al. 2022. Reported numbers, copied for comparison — not reproduced by bcd, and reported without "
    "confidence intervals."
)

completed = runs[runs["status"] == "completed"].sort_values("test_accuracy", ascending=False, na_position="last")
if completed.empty:
    common.no_runs_yet("compare")

st.subheader("Cross-validation")
groups = comparison.cv_groups(records.values())
if not groups:
    st.caption(
        "No cross-validation runs yet. Queue one on the Train page (Protocol: k-fold cross-validation), or run "
        "`python -m bcd_engine cv --data FOLDER --backbone NAME --folds 5`: one run per fold."
    )
else:
    st.caption(
        "Cross-validation cuts the images into K parts (folds) and trains K times; each time another fold "
        "is the test set, so every image is tested exactly once. The bar is the mean over the folds and the "
        "error bar ± one standard deviation: how much the result moves when the split changes. The pooled "
        "confusion matrix adds up the test results of all folds."
    )
    summary = comparison.cv_summary_frame(groups, evaluations)
    fig = go.Figure(
        [
            go.Bar(
                name=name,
                x=charts.stacked(summary["group"]),
                y=summary[f"{metric}_mean"],
                error_y={"type": "data", "array": summary[f"{metric}_std"].tolist()},
            )
            for metric, name in (("accuracy", "accuracy"), ("macro_auc", "macro AUC"))
        ]
    )
    fig.update_layout(
        title="Mean over folds ± one standard deviation",
        barmode="group",
        yaxis_range=[0, 1.05],
        yaxis_title="share of test images",
    )
    add_audit_lines(fig, sorted({g.data_dir for g in groups if g.data_dir}))
    st.plotly_chart(fig, key="compare_cv_chart")
    tables.show(
        summary,
        key="compare_cv_summary",
        columns={
            "group": ("cross-validation", tables.wide_text()),
            "backbone": "backbone",
            "protocol": ("protocol", tables.wide_text()),
            "folds": "folds",
            "n": "test images",
            **{c: c for c in summary.columns if "(" in c},
        },
    )
    folds = comparison.cv_folds_frame(groups, evaluations)
    tables.show(
        folds,
        key="compare_cv_folds",
        columns={
            "group": ("cross-validation", tables.wide_text()),
            "fold": "fold",
            "run": "run",
            "status": ("status", tables.status()),
            "n": "test images",
            "accuracy (95% CI)": "accuracy (95% CI)",
            "macro AUC (95% CI)": "macro AUC (95% CI)",
            "ece": ("ECE", tables.decimals()),
        },
    )
    group = groups[
        st.selectbox(
            "Pooled confusion matrix of",
            range(len(groups)),
            format_func=lambda i: groups[i].label,
            key="compare_cv_group",
        )
    ]
    pooled = comparison.pooled_confusion(group, evaluations)
    if pooled is None:
        st.info("No fold of this cross-validation has test results yet.")
    else:
        names, counts = pooled
        fig = go.Figure(
            go.Heatmap(
                z=counts,
                x=names,
                y=names,
                colorscale="Blues",
                texttemplate="%{z}",
                hovertemplate="true %{y}, predicted %{x}: %{z} images<extra></extra>",
            )
        )
        accuracy = comparison.format_interval(*comparison.pooled_accuracy(counts))
        st.plotly_chart(
            fig.update_layout(
                title=f"{group.label}<br><sup>all folds' test images, accuracy {accuracy} (95% CI)</sup>",
                xaxis_title="predicted",
                yaxis_title="true",
                yaxis_autorange="reversed",
            ),
            key="compare_cv_cm",
        )

st.subheader("Leave one dataset out")
lodo = comparison.lodo_frame(records.values(), evaluations)
if lodo.empty:
    st.caption(
        "No leave-one-dataset-out runs yet. They train on every dataset but one and test on the one "
        "left out, to show how well a model carries over to another lab's images. Queue one on the Train page "
        "(Protocol: Leave one dataset out)."
    )
else:
    st.caption(
        "Each row trained on every dataset but one and was then tested on the one it never saw (held "
        "out). In-domain accuracy comes from test images of the training datasets. A big drop means the "
        "model learned things of one lab — stain, microscope, camera — rather than the cells."
    )
    chart = lodo.assign(x=lodo["held_out"] + " (" + lodo["backbone"] + ", run " + lodo["run"].astype(str) + ")")
    st.plotly_chart(
        interval_bars(
            chart,
            "x",
            {"in_domain": "in-domain test", "held_out_accuracy": "held-out"},
            "leave-one-dataset-out: accuracy with 95% confidence intervals",
        ),
        key="compare_lodo_chart",
    )
    tables.show(
        lodo,
        key="compare_lodo",
        columns={
            "held_out": "held-out dataset",
            "backbone": "backbone",
            "run": "run",
            "in-domain test accuracy (95% CI)": "in-domain test accuracy (95% CI)",
            "n_in_domain": "in-domain test images",
            "held-out accuracy (95% CI)": "held-out accuracy (95% CI)",
            "n_held_out": "held-out images",
            "drop": ("drop", tables.decimals()),
        },
    )

jobs = JobQueue(store).list()
baselines = job_tables.baseline_frame(jobs)
if not baselines.empty:
    st.subheader("Classical baseline")
    st.caption(
        "Colour, texture and shape features with a classical classifier, queued from the Train page: a floor a "
        "network should clear on the same dataset (k-fold rows: the mean over the folds ± one standard deviation)."
    )
    tables.show(
        baselines,
        key="compare_baselines",
        columns={
            "job": "job",
            "dataset": "dataset",
            "model": "model",
            "protocol": ("protocol", tables.wide_text()),
            "accuracy": ("test accuracy", tables.decimals()),
            "std": ("± std", tables.decimals()),
            "macro_auc": ("macro AUC", tables.decimals()),
        },
    )
robustness = job_tables.robustness_frame(jobs)
if not robustness.empty:
    st.subheader("Colour robustness")
    st.caption(
        "Each checked run's test images as they are, in grayscale and colour-normalised (Reinhard). A model that "
        "reads cells keeps its accuracy; the colour-only classifier beside it should fall."
    )
    tables.show(
        robustness,
        key="compare_robustness",
        columns={
            "run": "run",
            "backbone": "backbone",
            "test images": "test images",
            "model_accuracy": ("model accuracy", tables.decimals()),
            "colour_only_accuracy": ("colour-only accuracy", tables.decimals()),
        },
    )

st.subheader("Runs side by side")
labels = {
    int(i): comparison.run_label_with_protocol(records[int(i)], latest_evaluation(evaluations[int(i)]))
    for i in completed["id"]
}
wanted = common.requested_run()  # a link from the Train page's "finished" message
selected = st.multiselect(
    "Runs to compare",
    list(labels),
    format_func=labels.get,
    key="compare_selected",
    default=[wanted] if wanted in labels else list(labels)[:2],
)
if not selected:
    st.info("Select one or more completed runs.")
    st.stop()
tests = {run_id: ev for run_id in selected if (ev := latest_evaluation(evaluations[run_id])) is not None}
if not tests:
    st.info("The selected runs have no test results stored.")
    st.stop()
titles = {run_id: charts.figure_title(records[run_id], ev) for run_id, ev in tests.items()}

st.subheader("What differs between these runs")
diff = comparison.settings_diff(records[run_id] for run_id in selected)
if len(selected) < 2:
    st.caption("Select two or more runs to see the settings in which they differ.")
elif diff.empty:
    st.caption("The selected runs have the same settings and dataset (they differ only by chance, e.g. hardware).")
else:
    st.caption("Only the settings in which the selected runs differ; everything else is the same.")
    tables.show(diff, key="compare_settings_diff", columns={c: c for c in diff.columns})


def shortcut_audit_box(column, root: str, key: str) -> None:
    """The shortcut audit of one dataset folder: its colour-only, corner-only and chance accuracies (or a button)."""
    box = column.container(border=True)
    box.markdown(f"**{Path(root).name}**" if common.demo_mode() else f"**{Path(root).name}** (`{root}`)")
    try:
        scan = common.scan(root)
    except BCDError as exc:
        box.warning(common.public(f"This folder cannot be read here, so it cannot be audited: {exc}"))
        return
    audit = audit_of(root)
    if audit is None and common.demo_mode():  # a demo writes nothing: it shows only audits already computed
        box.caption("Not audited yet; a demo shows only audits computed beforehand.")
        return
    if audit is None:
        box.caption("Not audited yet. It takes a few seconds for a few thousand images; the result is kept.")
        if box.button("Run shortcut audit", key=f"compare_audit_{key}", icon=":material/search:"):
            try:
                with st.spinner(f"Auditing {Path(root).name} ..."):
                    comparison.run_audit(scan)
            except BCDError as exc:
                box.error(common.public(f"The audit failed: {exc}"))
            else:
                st.rerun()
        return
    shortcuts = audit["shortcuts"]
    m1, m2, m3 = box.columns(3)
    m1.metric("colour only", f"{shortcuts['colour_only_accuracy']:.1%}")
    m2.metric("corner only", f"{shortcuts['corner_only_accuracy']:.1%}")
    m3.metric("chance", f"{shortcuts['chance_accuracy']:.1%}")
    box.caption(comparison.audit_explanation(audit))


st.subheader("Accuracy with 95% confidence intervals, and the shortcut audit")
by_dataset = comparison.runs_by_dataset(records[run_id] for run_id in selected)
if (note := comparison.not_comparable_note(by_dataset)) is not None:
    st.warning(note, icon=":material/rule:")
audited = 0  # the audit buttons are numbered across the datasets' charts
for g, group_runs in enumerate(by_dataset.values()):
    chart_col, audit_col = st.columns([3, 2])
    intervals = comparison.intervals_frame(group_runs, evaluations)
    fig = interval_bars(
        intervals.assign(label=charts.stacked(intervals["label"])),
        "label",
        {"accuracy": "accuracy", "macro_auc": "macro AUC"},
        f"{group_runs[0].dataset.name}: test accuracy and macro AUC (95% CI)"
        if note
        else "Test accuracy and macro AUC (error bars: 95% confidence interval)",
    )
    roots = comparison.dataset_roots(group_runs)
    add_audit_lines(fig, roots)
    chart_col.plotly_chart(fig, key=f"compare_intervals_{g}" if g else "compare_intervals")
    audit_col.markdown("**Shortcut audit**: can colour alone tell the classes apart? Grey lines on the chart.")
    for root in roots:
        shortcut_audit_box(audit_col, root, str(audited))
        audited += 1
occlusion.occlusion_section(records, evaluations, selected)

st.subheader("Training curves")
st.plotly_chart(
    charts.training_curves(
        run_tables.epochs_frame(store, selected),
        {run_id: f"run {run_id} · {records[run_id].backbone}" for run_id in selected},
    ),
    key="compare_curves",
)

st.subheader("Confusion matrices")
normalise = st.toggle("Row-normalised (share of each true class)", key="compare_normalise")
for col, (run_id, ev) in zip(st.columns(len(tests)), tests.items()):
    counts = np.asarray(ev.confusion_matrix, dtype=float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    heat = go.Heatmap(
        z=share if normalise else counts,
        x=ev.class_names,
        y=ev.class_names,
        colorscale="Blues",
        customdata=np.dstack([counts, share * 100]),
        texttemplate="%{z:.2f}" if normalise else "%{z}",
        hovertemplate="true %{y}, predicted %{x}<br>%{customdata[0]:.0f} images "
        "(%{customdata[1]:.1f}% of the true class)<extra></extra>",
    )
    fig = go.Figure(heat).update_layout(
        title=titles[run_id], margin=TOP, xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed"
    )
    col.plotly_chart(fig, key=f"compare_cm_{run_id}")

st.subheader("ROC curves (one class against the rest)")
for col, (run_id, ev) in zip(st.columns(len(tests)), tests.items()):
    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"}, name="chance"))
    for name, curve in ev.roc.items():
        auc = "n/a" if curve.auc is None else f"{curve.auc:.3f}"
        fig.add_scatter(x=curve.fpr, y=curve.tpr, mode="lines", name=f"{name} (AUC {auc})")
    fig.update_layout(
        title=titles[run_id], margin=TOP, xaxis_title="false positive rate", yaxis_title="true positive rate"
    )
    col.plotly_chart(fig, key=f"compare_roc_{run_id}")

st.subheader("Reliability: does the model's confidence match how often it is right?")
st.caption(
    "Test images are put in bins by the model's confidence in its answer. Each bar shows how many in the "
    "bin were right; a well-calibrated model's bars reach the diagonal (of the answers given with 90% "
    "confidence, 90% are right). Bars below the diagonal mean over-confidence. **ECE** (expected calibration "
    "error) is the average gap, weighted by the number of images in each bin: 0 is perfect. A **temperature** "
    "above 1 softens every answer, below 1 sharpens it; bcd fits it on the validation images and keeps it only "
    "when it lowers both their log-loss and their ECE."
)
for col, (run_id, ev) in zip(st.columns(len(tests)), tests.items()):
    bins = comparison.reliability_frame(ev)
    if bins.empty:
        col.info(f"Run {run_id} has no stored calibration data (it was evaluated before bcd recorded it).")
        continue
    fig = go.Figure(
        [
            go.Bar(
                x=bins["centre"],
                y=bins["accuracy"],
                width=bins["width"],
                name="share right",
                customdata=bins,
                hovertemplate="confidence %{customdata[0]:.2f}–%{customdata[1]:.2f}: %{customdata[6]} images, "
                "mean confidence %{customdata[4]:.2f}, %{y:.0%} right<extra></extra>",
            ),
            go.Scatter(
                x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"}, name="perfect calibration"
            ),
        ]
    )
    fig.update_layout(
        title=titles[run_id],
        margin=TOP,
        xaxis_title="model's confidence in its answer",
        yaxis_title="share of answers right",
        xaxis_range=[0, 1],
        yaxis_range=[0, 1.05],
    )
    col.plotly_chart(fig, key=f"compare_reliability_{run_id}")
    before, after = ev.metrics.get("ece"), ev.metrics.get("ece_calibrated")
    col.metric("ECE", f"{before:.3f}" if before is not None else "n/a", help="0 is perfect; lower is better.")
    if after is not None:
        col.metric(
            "ECE after calibration",
            f"{after:.3f}",
            delta=f"{after - before:+.3f}" if before is not None else None,
            delta_color="inverse",
            help=f"With the temperature {ev.metrics['temperature']:.2f} fitted on the run's validation images "
            "(the probabilities Diagnose shows). The bars above are before calibration.",
        )
    if ev.metrics.get("ood_flagged_share") is not None:
        col.metric(
            "Own test images refused",
            f"{ev.metrics['ood_flagged_share']:.1%}",
            help="Share of the run's own test images (same source as its training images, never seen in training) "
            "that its out-of-domain gate refused: they would get no answer.",
        )
    col.caption(comparison.calibration_note(ev, tta_views=records[run_id].config.get("train", {}).get("tta_views")))

st.subheader("Risk and coverage: how right is the model when it answers only when most sure?")
st.caption(
    "Test images are ranked by the model's confidence; a point shows the accuracy on the most confident share "
    "of them. A curve that falls as more images are answered means confidence tells right from wrong, so "
    "leaving the least confident images to a specialist buys accuracy."
)
curves = pd.concat(
    [run_tables.risk_coverage_frame(store, ev).assign(run=labels[run_id]) for run_id, ev in tests.items()]
)
fig = px.line(
    curves,
    x="coverage",
    y="accuracy",
    color="run",
    hover_data={"confidence": ":.3f"},
    labels={"coverage": "share of test images answered (most confident first)", "accuracy": "accuracy"},
)
st.plotly_chart(
    fig.update_layout(xaxis_tickformat=".0%", yaxis_tickformat=".0%", legend_title_text=""), key="compare_risk_coverage"
)

st.subheader("Per-class precision, recall and F1")
per_class = pd.concat(
    [
        run_tables.per_class_frame(ev).assign(run=f"run {run_id}: {records[run_id].backbone}")
        for run_id, ev in tests.items()
    ]
)
tables.show(
    per_class,
    key="compare_per_class",
    columns={
        "run": "run",
        "class": "class",
        "precision": ("precision", tables.decimals()),
        "recall": ("recall (sensitivity)", tables.decimals()),
        "specificity": ("specificity", tables.decimals()),
        "f1": ("F1", tables.decimals()),
        "auc": ("AUC", tables.decimals()),
        "support": "test images",
    },
)

st.subheader("Images behind a confusion-matrix cell")
pick_run, pick_true, pick_predicted, pick_cam = st.columns([3, 2, 2, 2])
gallery_run = pick_run.selectbox("Run", list(tests), format_func=labels.get, key="compare_gallery_run")
cell_ev = tests[gallery_run]
worst_true, worst_predicted = run_tables.worst_cell(cell_ev)
true_class = pick_true.selectbox(
    "True class",
    cell_ev.class_names,
    key=f"compare_cell_true_{gallery_run}",
    index=cell_ev.class_names.index(worst_true),
)
predicted_class = pick_predicted.selectbox(
    "Predicted class",
    cell_ev.class_names,
    key=f"compare_cell_predicted_{gallery_run}",
    index=cell_ev.class_names.index(worst_predicted),
)
show_cam = pick_cam.toggle(
    "Grad-CAM: where it looked",
    key="compare_gradcam",
    help="Red marks the parts of the image that pushed the model towards its answer.",
)
items = run_tables.cell_images(store, cell_ev, true_class, predicted_class)
count = cell_ev.confusion_matrix[cell_ev.class_names.index(true_class)][cell_ev.class_names.index(predicted_class)]
st.caption(
    f"{count} test image(s) of class {true_class} that run {gallery_run} called {predicted_class}"
    + (f"; the {len(items)} it was most sure of." if count > len(items) else ".")
    + " The pair starts at the most frequent mistake."
)
public = [item for item in items if common.public_path(item["path"])]  # a demo shows only public datasets' images
if len(public) < len(items):
    st.info(
        f"{len(items) - len(public)} of these images are from a dataset this demo may not show.",
        icon=":material/visibility_off:",
    )
    items = public
loaded = None
if show_cam and items:
    try:
        loaded = common.load_model(gallery_run)
    except BCDError as exc:
        st.error(common.public(f"Cannot load the model of run {gallery_run}, so no heatmaps: {exc}"))
for col, item in zip(st.columns(6) * 4, items):
    caption = ", ".join(f"{name} {p:.2f}" for name, p in item["probabilities"].items())
    try:
        if loaded is None:
            col.image(load_image(item["path"]), width="stretch", caption=caption)
        else:
            image, heatmap = common.grad_cam(gallery_run, item["path"], item["predicted"])
            col.image(explain.overlay(image, heatmap), width="stretch", caption=caption)
    except BCDError as exc:
        col.warning(common.public(f"{Path(item['path']).name}: {exc}"))

if not common.demo_mode():
    with st.expander("Take a run to another store (run bundle)", icon=":material/move_item:"):
        st.caption(
            "One .zip with the run's model, out-of-domain gate, labels, settings, split, curves, evaluations "
            "and model card, each member with its sha256. On the other machine: `python -m bcd_engine import "
            "BUNDLE.zip` adds it to that store as a new run (for a hosted demo, see the README)."
        )
        chosen = st.selectbox("Run", list(labels), format_func=labels.get, key="compare_bundle_run")
        st.download_button(
            "Download bundle",
            lambda: run_bundle.bundle_bytes(chosen, store=store),
            run_bundle.bundle_name(chosen, records[chosen].backbone),
            "application/zip",
            key="compare_bundle",
            icon=":material/download:",
            on_click="ignore",
        )
    with st.expander("Export a model for an app (TensorFlow Lite or Keras)", icon=":material/phone_android:"):
        st.caption(
            "The run's model with its labels.json (class names, input size, preprocessing) and model card, in one "
            ".zip. TensorFlow Lite runs on phones and small devices; the export is checked against the Keras model "
            "on test images before it is offered. It takes from seconds to a minute."
        )
        e1, e2 = st.columns([3, 1])
        exported = e1.selectbox("Run", list(labels), format_func=labels.get, key="compare_export_run")
        export_format = e2.selectbox("Format", EXPORT_FORMATS, format_func=EXPORT_FORMATS.get, key="compare_export_fmt")
        if st.button("Export", key="compare_export", icon=":material/build:"):
            try:
                with st.spinner(f"Exporting run {exported} as {EXPORT_FORMATS[export_format]} ..."):
                    content, result = archive.export_zip(exported, format=export_format, store=store)
            except BCDError as exc:
                st.error(common.public(f"The export failed: {exc}"))
            else:
                st.session_state["compare.export"] = (exported, export_format, content, result.max_abs_diff)
        done = st.session_state.get("compare.export")
        if done is not None and done[:2] == (exported, export_format):
            run_id, fmt, content, max_diff = done
            if max_diff is not None:
                st.caption(f"Largest difference from the Keras model's probabilities: {max_diff:.2e}.")
            st.download_button(
                f"Download run {run_id} ({EXPORT_FORMATS[fmt]})",
                content,
                archive.export_name(run_id, records[run_id].backbone, fmt),
                "application/zip",
                key="compare_export_download",
                icon=":material/download:",
                on_click="ignore",
            )
    with st.expander("Delete a run", icon=":material/delete:"):
        victim = st.selectbox("Run", runs["id"].tolist(), key="compare_delete_run")
        if st.button("Delete run and everything recorded about it", key="compare_delete"):
            artifacts.delete_run(store, int(victim))
            st.rerun()
