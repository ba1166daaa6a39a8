"""Compare runs: the runs table, curves, confusion matrices, ROC curves, per-class metrics, mistakes."""
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from bcd_engine import dashboard
from bcd_engine.datasets import load_image
from bcd_engine.errors import BCDError
from ui import common

st.title("Compare runs")
common.explain(
    "Each run is one backbone trained with one configuration and tested on images it never saw (its test "
    "split). **Accuracy** is the share of test images classified right; **AUC** (area under the ROC curve) "
    "measures how well the scores rank each class above the others, 1.0 being perfect. The **confusion "
    "matrix** shows which classes are mixed up (rows: true class, columns: predicted). The thesis rows are "
    "the numbers the thesis reported, for reference — they were measured on a different split and protocol."
)
common.demo_banner()
store = common.store()
runs = dashboard.runs_frame(store)

st.subheader("Runs")
c1, c2, c3 = st.columns(3)
backbones = c1.multiselect("Backbone", sorted(runs["backbone"].unique()), key="compare_f_backbone")
statuses = c2.multiselect("Status", sorted(runs["status"].unique()), key="compare_f_status")
protocols = c3.multiselect("Protocol", sorted(runs["protocol"].unique()), key="compare_f_protocol")
shown = runs
for column, wanted in (("backbone", backbones), ("status", statuses), ("protocol", protocols)):
    if wanted:
        shown = shown[shown[column].isin(wanted)]
sort_by = st.selectbox("Sort by", ["test_accuracy", "macro_auc", "macro_f1", "parameters_M", "seconds", "id"],
                       key="compare_sort")
st.dataframe(shown.sort_values(sort_by, ascending=sort_by in ("parameters_M", "seconds"), na_position="last"),
             hide_index=True, key="compare_runs_table",
             column_config={"test_accuracy": st.column_config.NumberColumn(format="%.3f"),
                            "macro_auc": st.column_config.NumberColumn(format="%.3f"),
                            "macro_f1": st.column_config.NumberColumn(format="%.3f")})

st.subheader("Reference: reported results (not run here)")
st.dataframe(pd.DataFrame(dashboard.THESIS_REFERENCE), hide_index=True, key="compare_reference",
             column_config={"train_accuracy": st.column_config.NumberColumn("train accuracy", format="percent"),
                            "val_accuracy": st.column_config.NumberColumn("validation accuracy", format="percent")})
st.caption("Thesis: *A Transfer Learning Approach for Blood Cancer Detection*; dataset authors: Ghaderzadeh "
           "et al. 2022. Reported numbers, copied for comparison — not reproduced by bcd.")

completed = runs[runs["status"] == "completed"].sort_values("test_accuracy", ascending=False)
if completed.empty:
    common.no_runs_yet("compare")
labels = {int(r.id): f"run {r.id}: {r.backbone} ({r.test_accuracy:.3f})" for r in completed.itertuples()}
selected = st.multiselect("Runs to compare", list(labels), default=list(labels)[:2], format_func=labels.get,
                          key="compare_selected")
if not selected:
    st.info("Select one or more completed runs.")
    st.stop()
evaluations = {run_id: dashboard.holdout_evaluation(store, run_id) for run_id in selected}
evaluations = {k: v for k, v in evaluations.items() if v is not None}

st.subheader("Training curves")
frame = dashboard.epochs_frame(store, selected)
fig = px.line(frame, x="step", y="value", color="run", line_dash="split", facet_col="metric", markers=True,
              labels={"step": "epoch (all phases)"})
fig.update_yaxes(matches=None)
st.plotly_chart(fig, key="compare_curves")

st.subheader("Confusion matrices")
normalise = st.toggle("Row-normalised (share of each true class)", key="compare_normalise")
for col, (run_id, ev) in zip(st.columns(len(evaluations)), evaluations.items()):
    counts = np.asarray(ev.confusion_matrix, dtype=float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    heat = go.Heatmap(z=share if normalise else counts, x=ev.class_names, y=ev.class_names, colorscale="Blues",
                      customdata=np.dstack([counts, share * 100]), texttemplate="%{z:.2f}" if normalise else "%{z}",
                      hovertemplate="true %{y}, predicted %{x}<br>%{customdata[0]:.0f} images "
                                    "(%{customdata[1]:.1f}% of the true class)<extra></extra>")
    fig = go.Figure(heat).update_layout(title=labels[run_id], xaxis_title="predicted", yaxis_title="true",
                                        yaxis_autorange="reversed")
    col.plotly_chart(fig, key=f"compare_cm_{run_id}")

st.subheader("ROC curves (one class against the rest)")
for col, (run_id, ev) in zip(st.columns(len(evaluations)), evaluations.items()):
    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"},
                               name="chance"))
    for name, curve in ev.roc.items():
        auc = "n/a" if curve.auc is None else f"{curve.auc:.3f}"
        fig.add_scatter(x=curve.fpr, y=curve.tpr, mode="lines", name=f"{name} (AUC {auc})")
    fig.update_layout(title=labels[run_id], xaxis_title="false positive rate", yaxis_title="true positive rate")
    col.plotly_chart(fig, key=f"compare_roc_{run_id}")

st.subheader("Per-class precision, recall and F1")
per_class = pd.concat([dashboard.per_class_frame(ev).assign(run=labels[run_id])
                       for run_id, ev in evaluations.items()])
st.dataframe(per_class.set_index(["run", "class"]).round(3), key="compare_per_class")

st.subheader("Misclassified test images")
gallery_run = st.selectbox("Run", list(evaluations), format_func=labels.get, key="compare_gallery_run")
wrong = dashboard.misclassified(store, evaluations[gallery_run])
if not wrong:
    st.success("No misclassified test images.")
for col, item in zip(st.columns(6) * 4, wrong):
    try:
        col.image(load_image(item["path"]), width="stretch",
                  caption=f"true {item['true']} → predicted {item['predicted']} ({item['confidence']:.2f})")
    except BCDError as exc:
        col.warning(f"{Path(item['path']).name}: {exc}")

if not common.demo_mode():
    with st.expander("Delete a run", icon=":material/delete:"):
        victim = st.selectbox("Run", runs["id"].tolist(), key="compare_delete_run")
        if st.button("Delete run and everything recorded about it", key="compare_delete"):
            store.delete_run(int(victim))
            st.rerun()
