"""Train: queue runs (one backbone or a sweep), watch the running one live, cancel."""
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from bcd_engine.errors import BCDError
from bcd_engine.models.backbones import BACKBONES
from bcd_engine.models.config import OPTIMIZERS, TrainConfig
from bcd_engine.reports import explorer as explorer_tables
from bcd_engine.reports import runs as run_tables
from bcd_engine.training import queue, worker
from ui import common

st.title("Train")
common.explain(
    "Training fine-tunes an ImageNet network (the *backbone*) to tell the four classes apart. Phase 1 trains "
    "a small head on the frozen backbone's features; phase 2 (optional) unfreezes its top layers. Every run "
    "is queued in the run store and trained by a background worker, one after another, so you can close "
    "the page and come back. The curves show accuracy and loss on the training and validation images per "
    "epoch: a validation curve that falls behind the training curve means over-fitting."
)
common.demo_banner()
store = common.store()
demo = common.demo_mode()

with st.expander("Backbones", icon=":material/table:"):
    st.dataframe(pd.DataFrame([
        {"backbone": s.name, "depth": s.depth, "parameters (M)": s.params_millions, "input size": s.native_size,
         "min size": s.min_size, "year": s.year, "paper": s.paper, "notes": s.description}
        for s in BACKBONES.values()]), hide_index=True, key="train_backbones")


def _launch(configs: list[TrainConfig], data_dir: str) -> None:
    try:
        ids = [queue.queue_run(store, config, data_dir) for config in configs]
    except BCDError as exc:
        st.error(str(exc))
        return
    worker.ensure_worker(store)
    st.success(f"Queued run{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}.")


if demo:
    st.info("Training is switched off in demo mode.", icon=":material/block:")
else:
    left, right = st.columns([3, 1])
    right.write("New here?")
    if right.button("Train demo model", key="train_demo", type="primary",
                    help="A tiny CNN on the SYNTHETIC demo set; about a minute on a CPU."):
        _launch([queue.demo_config()], common.demo_dataset())

    with left.form("train_form"):
        choices = explorer_tables.dataset_choices(store, common.demo_dataset())
        dataset = st.selectbox("Dataset", choices, format_func=lambda c: c.label, key="train_dataset")
        folder = st.text_input("... or a local folder", key="train_folder", help="Overrides the dataset above.")
        names = st.multiselect("Backbone(s)", list(BACKBONES), default=["mobilenetv2"], key="train_backbones_sel",
                               help="Several backbones queue a sweep: one run each, same settings.")
        base = TrainConfig.for_backbone("mobilenetv2")
        c1, c2, c3, c4 = st.columns(4)
        weights = c1.selectbox("Weights", ("none", "imagenet"), key="train_weights",
                               help="imagenet downloads pretrained weights (internet); none = random init. "
                                    "The scratch CNN always uses none.")
        image_size = c2.number_input("Image size (0 = native)", 0, 512, 0, key="train_image_size",
                                     help="Input size in pixels; smaller is faster.")
        epochs = c3.number_input("Epochs", 1, 500, base.epochs, key="train_epochs",
                                 help="Phase 1 epochs (early stopping may end sooner).")
        fine_tune = c4.number_input("Fine-tune epochs", 0, 200, 0, key="train_fine_tune",
                                    help="Phase 2 with the top backbone layers unfrozen; 0 skips it.")
        c1, c2, c3, c4 = st.columns(4)
        batch = c1.number_input("Batch size", 1, 256, base.batch_size, key="train_batch")
        lr = c2.number_input("Learning rate", 1e-6, 1.0, base.learning_rate, format="%.5f", key="train_lr")
        optimizer = c3.selectbox("Optimizer", OPTIMIZERS, key="train_optimizer")
        augment = c4.number_input("Augmentation factor", 1, 20, 4, key="train_augment",
                                  help="Augmented views per training image.")
        c1, c2, c3, c4 = st.columns(4)
        dense = c1.number_input("Head dense units", 0, 2048, base.dense_units, key="train_dense")
        dropout = c2.number_input("Dropout", 0.0, 0.9, base.dropout, key="train_dropout")
        patience = c3.number_input("Patience", 1, 100, base.patience, key="train_patience",
                                   help="Stop after this many epochs without a better validation loss.")
        seed = c4.number_input("Seed", 0, 10_000, 0, key="train_seed")
        class_weights = st.checkbox("Weight classes by frequency", key="train_class_weights")
        submitted = st.form_submit_button("Queue run(s)", type="primary")
    if submitted:
        data_dir = str(Path(folder.strip()).expanduser()) if folder.strip() else dataset.root
        try:
            configs = [TrainConfig.for_backbone(
                name, weights=weights if BACKBONES[name].pretrained else "none", image_size=image_size or None,
                epochs=int(epochs), fine_tune_epochs=int(fine_tune),
                fine_tune_layers=BACKBONES[name].fine_tune_layers if fine_tune else None,
                batch_size=int(batch), learning_rate=float(lr), optimizer=optimizer, augment=int(augment),
                dense_units=int(dense), dropout=float(dropout), patience=int(patience), seed=int(seed),
                class_weights=class_weights) for name in names]
            if not configs:
                raise BCDError("choose at least one backbone")
        except BCDError as exc:
            st.error(str(exc))
        else:
            _launch(configs, data_dir)


@st.fragment(run_every=3)
def queue_panel() -> None:
    """The queue, the running job's progress and curves; refreshed every few seconds from the store (reads only;
    runs whose process died are marked by the worker and at the app's start)."""
    if not demo:
        worker.ensure_worker(store)
    runs = store.list_runs(limit=30)
    st.subheader("Queue and recent runs")
    if not runs:
        st.caption("No runs yet.")
        return
    st.dataframe(pd.DataFrame([{"id": r.id, "backbone": r.backbone, "dataset": run_tables.dataset_label(r),
                                "status": r.status, "test accuracy": r.test_accuracy, "seconds": r.seconds,
                                "error": r.error} for r in runs]), hide_index=True, key="train_queue")
    for run in [r for r in runs if r.status == "running"]:
        st.markdown(f"**Run {run.id}: {run.backbone}** — running")
        cfg = run.config["train"]
        epochs = store.get_epochs(run.id)
        planned = cfg["epochs"] + cfg["fine_tune_epochs"]
        st.progress(min(1.0, len(epochs) / planned), text=f"{len(epochs)} of at most {planned} epochs")
        frame = run_tables.epochs_frame(store, [run.id])
        if not frame.empty:
            fig = px.line(frame, x="step", y="value", color="split", facet_col="metric", markers=True)
            fig.update_yaxes(matches=None)
            st.plotly_chart(fig, key=f"train_curves_{run.id}")
        if not demo and st.button("Cancel", key=f"train_cancel_{run.id}", disabled=run.cancel_requested):
            store.request_cancel(run.id)
            st.toast(f"Asked run {run.id} to stop.")
    queued = [r for r in runs if r.status == "queued"]
    if queued and not demo and st.button("Cancel all queued", key="train_cancel_queued"):
        for run in queued:
            store.request_cancel(run.id)


queue_panel()
