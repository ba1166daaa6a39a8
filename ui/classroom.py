"""Class mode (demo mode's Train page): a student trains a classification head on a class pack in seconds.

The head trains on the host's cached features (:mod:`bcd_engine.classroom`) in the server's class worker (a child
process), driven by the process's class queue, which takes the sessions in turn, an epoch each, at most one training
per session at once. The curves grow while
it trains; then its confusion matrix and test accuracy stand beside this session's other trainings and the host's
runs on the same dataset. Results live in this session's state only: nothing is written to the store or to disk.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from streamlit.runtime import Runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx

from bcd_engine import settings
from bcd_engine.classroom import (
    ClassPack,
    ClassResult,
    HeadSettings,
    PackRef,
    RemoteTraining,
    class_queue,
    class_worker,
    host_runs,
)
from bcd_engine.classroom import pack as packs
from bcd_engine.classroom import session as bounds
from bcd_engine.errors import BCDError, BusyError
from bcd_engine.store import RunStore
from ui import charts, common, tables

LIVE = "class.live"  # the session's training in flight: a _Live
RESULTS = "class.results"  # the session's finished trainings, oldest first: (number, ClassResult)
COUNT = "class.count"  # trainings this session has started
ERROR = "class.error"  # why the last training stopped without a result
KEPT_RESULTS = 8  # a session keeps its last eight results
REFRESH_S = 1.0
DEFAULT_SOURCE = "SYNTHETIC demo set"


@dataclass(frozen=True)
class _Source:
    """A pack a student can pick: one from the host's class folder, or the SYNTHETIC default made on first use."""

    dataset: str
    backbone_label: str
    views: int
    ref: PackRef  # None: the SYNTHETIC default, computed by the class worker when it starts


@dataclass(frozen=True)
class _Live:
    training: RemoteTraining
    job: object  # bcd_engine.inference.service.Job
    number: int  # "training 3" of this session
    started: float


def render(store: RunStore) -> None:
    """The class-mode panel: pick a pack and settings, train, watch, compare."""
    st.subheader("Class mode: train a model in seconds")
    st.markdown(
        "Here you train the last part of a model, its **head**, on features the host has already computed with a "
        "**frozen backbone** (the backbone itself is not trained, which is why it takes seconds, not hours). "
        "Try what the settings do: more augmented **views** per training image, a bigger **head**, more "
        "**epochs**, another **learning rate**, another **backbone**."
    )
    st.caption(
        f"Limits, so that every student gets a turn: one training per browser tab at a time, at most "
        f"{bounds.MAX_EPOCHS} epochs and {bounds.MAX_SECONDS:.0f} s of computing each, and at most "
        f"{bounds.MAX_CLASS_JOBS} trainings waiting for the whole server, taken in turn an epoch each. "
        "Nothing is saved on the server: your results stay in this tab until you close it (download them to keep "
        "them)."
    )
    sources = _sources()
    if Runtime.exists():  # a served page (not a bare script run, AppTest): start the worker while the student reads
        _warm_worker(sources[0].ref)
    source, chosen = _settings_form(sources)
    busy = LIVE in st.session_state
    if st.button("Train this head", key="class_train", type="primary", icon=":material/school:", disabled=busy):
        _start(source, chosen)
    with st.container():  # the live panel's own place: the results below keep theirs whether it shows or not
        if LIVE in st.session_state:
            _live_panel()
    _results(store)


def _sources() -> list[_Source]:
    loaded, problems = _packs(packs.packs_signature())
    for problem in problems:
        st.caption(common.public(f"Skipped a class pack: {problem}"))
    if not loaded:
        return [_Source(DEFAULT_SOURCE, _default_label(), packs.DEFAULT_VIEWS, None)]
    root = str(settings.class_packs_dir())
    return [_Source(_dataset_label(pack), pack.label, pack.views, (root, pack.name)) for pack in loaded]


@st.cache_resource(show_spinner=False)
def _warm_worker(first: PackRef) -> None:
    """Start the class worker and have it load the first pack once per server, while the first student reads."""
    class_worker().prepare(first)


@st.cache_resource(show_spinner="Loading the class packs ...", max_entries=2)
def _packs(signature: str) -> tuple[list[ClassPack], list[str]]:
    """The host's class packs as the page lists them, read once per change of the class folder (the class worker
    loads its own copy to train on)."""
    return packs.find_packs()


def _default_label() -> str:
    return f"{packs.DEFAULT_BACKBONE}, random weights, {packs.SYNTHETIC_IMAGE_SIZE} px, {packs.DEFAULT_VIEWS} views"


def _dataset_label(pack: ClassPack) -> str:
    kind = "SYNTHETIC, not medical data" if pack.dataset.synthetic else "real images"
    return f"{pack.dataset.name} ({pack.dataset.n_images:,} images, {kind})"


def _settings_form(sources: list[_Source]) -> tuple[_Source, HeadSettings]:
    datasets = list(dict.fromkeys(source.dataset for source in sources))
    left, right = st.columns(2)
    dataset = left.selectbox("Dataset", datasets, key="class_dataset")  # options show as plain text
    mine = [source for source in sources if source.dataset == dataset]
    source = right.selectbox(
        "Backbone (features the host cached)",
        mine,
        key="class_backbone",
        format_func=lambda s: s.backbone_label,
        help="The frozen network that turned each image into a feature vector; the head learns from those.",
    )
    c1, c2, c3, c4 = st.columns(4)
    views = c1.slider(
        "Views per training image",
        1,
        source.views,
        1,
        key="class_views",
        help="1: each image as it is; more: also flipped, turned and colour-jittered copies (augmentation).",
    )
    dense = c2.select_slider(
        "Head size (units)",
        bounds.HEAD_SIZES,
        value=128,
        key="class_units",
        help="Units of the head's hidden layer; 0: a softmax straight on the features.",
    )
    epochs = c3.slider(
        "Epochs", 1, bounds.MAX_EPOCHS, 20, key="class_epochs", help="Passes over the training images (at most)."
    )
    rate = c4.select_slider(
        "Learning rate",
        bounds.LEARNING_RATES,
        value=1e-3,
        key="class_rate",
        format_func=lambda r: f"{r:g}",
        help="How big a step each batch takes: too small learns slowly, too large jumps about.",
    )
    st.caption(
        f"Training stops early when the validation loss has not improved for {bounds.PATIENCE} epochs; the epoch "
        "with the lowest validation loss is kept and tested."
    )
    return source, HeadSettings(views=views, dense_units=dense, epochs=epochs, learning_rate=rate)


def _start(source: _Source, chosen: HeadSettings) -> None:
    """Queue a training of ``chosen`` on ``source`` for this session (an error or a warning when it cannot be)."""
    try:
        training = RemoteTraining(source.ref, chosen, max_views=source.views)
    except BCDError as exc:
        st.error(common.public(exc))
        return
    visitor, alive = _this_session()
    try:
        job = class_queue().submit(training.steps(), alive=alive, visitor=visitor)
    except BusyError as exc:
        st.warning(f"{exc}.", icon=":material/hourglass_top:")
        return
    st.session_state[COUNT] = number = st.session_state.get(COUNT, 0) + 1
    st.session_state[LIVE] = _Live(training, job, number, time.monotonic())
    st.rerun()  # the button goes grey and the live panel starts refreshing


def _this_session() -> tuple[str | None, Callable[[], bool] | None]:
    """(the class queue's key for this browser tab, whether the tab is still connected). Class mode counts per tab,
    not per address: a class behind one school router is many students."""
    ctx = get_script_run_ctx(suppress_warning=True)
    if ctx is None:
        return None, None
    session_id = ctx.session_id
    if not Runtime.exists():  # a bare script run (AppTest) has no sessions to ask about
        return f"class session {session_id}", None
    return f"class session {session_id}", lambda: Runtime.instance().is_active_session(session_id)


@st.fragment(run_every=REFRESH_S)
def _live_panel() -> None:
    """Refreshed every second while a training of this session is in flight (the page shows it only then)."""
    _live()


def _live() -> None:
    """The training in flight: its place in the queue or its epoch, the curves so far; its result once done."""
    live: _Live | None = st.session_state.get(LIVE)
    if live is None:
        return
    history = live.training.history
    epochs = live.training.settings.epochs
    if not live.job.done:
        with st.container(border=True):
            if history:
                st.progress(len(history) / epochs, text=f"Training {live.number}: epoch {len(history)} of {epochs}")
                st.plotly_chart(_curves({live.number: history}), key="class_live_curves")
            else:
                waiting = class_queue().waiting
                st.progress(0.0, text=f"Training {live.number}: waiting for its turn ({waiting} in the class queue)")
        return
    del st.session_state[LIVE]
    try:
        result = live.job.result()
    except BCDError as exc:
        st.session_state[ERROR] = common.public(f"Training {live.number} stopped: {exc}")
    else:
        st.session_state[RESULTS] = [*st.session_state.get(RESULTS, []), (live.number, result)][-KEPT_RESULTS:]
    st.rerun()


def _curves(histories: dict[int, list]) -> go.Figure:
    """Training curves (``charts.training_curves``) of this session's trainings, by number."""
    rows = [
        {"run": number, "phase": "head", "step": point.epoch, "metric": metric, "split": split, "value": value}
        for number, history in histories.items()
        for point in history
        for metric, split, value in (
            ("accuracy", "train", point.accuracy),
            ("accuracy", "val", point.val_accuracy),
            ("loss", "train", point.loss),
            ("loss", "val", point.val_loss),
        )
    ]
    frame = pd.DataFrame(rows, columns=["run", "phase", "step", "metric", "split", "value"])
    return charts.training_curves(frame, {number: f"training {number}" for number in histories})


def _matrix(result: ClassResult) -> go.Figure:
    counts = np.asarray(result.confusion_matrix, dtype=float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    heat = go.Heatmap(
        z=counts,
        x=list(result.class_names),
        y=list(result.class_names),
        colorscale="Blues",
        customdata=share * 100,
        texttemplate="%{z}",
        hovertemplate="true %{y}, predicted %{x}<br>%{z} images (%{customdata:.1f}% of the true class)<extra></extra>",
    )
    return go.Figure(heat).update_layout(
        title=f"Confusion matrix of the {int(counts.sum())} test images",
        xaxis_title="the head's answer",
        yaxis_title="true class",
        yaxis_autorange="reversed",
        margin={"t": 60},
    )


def _results(store: RunStore) -> None:
    if ERROR in st.session_state:
        st.error(st.session_state.pop(ERROR))
    numbered: dict[int, ClassResult] = dict(st.session_state.get(RESULTS, []))
    if not numbered:
        return
    number, latest = max(numbered.items())
    st.markdown(f"#### Training {number}: {common.plain(latest.backbone)} on {common.plain(latest.dataset)}")
    low, high = latest.accuracy_interval
    left, right = st.columns([1, 2])
    left.metric("Test accuracy", f"{latest.test_accuracy:.1%}", help="Share of the test images the head got right.")
    left.caption(
        f"95% interval {low:.1%} to {high:.1%} ({latest.n_test} test images). Best epoch {latest.best_epoch} "
        f"of {len(latest.history)}; ended by {latest.stopped}; {latest.seconds:.1f} s of computing."
    )
    left.caption(f"Protocol: {latest.protocol}.")
    right.plotly_chart(_matrix(latest), key="class_matrix")
    st.plotly_chart(_curves({n: list(r.history) for n, r in numbered.items()}), key="class_curves")
    st.markdown("**Your trainings** (this tab only) **beside the host's runs on the same images**")
    st.dataframe(_comparison(store, numbered), hide_index=True, key="class_table", placeholder=tables.MISSING)
    download, clear = st.columns([1, 1])
    download.download_button(
        "Download my results (JSON)",
        json.dumps([{"training": n, **r.to_dict()} for n, r in numbered.items()], indent=2),
        file_name="class-mode-results.json",
        mime="application/json",
        key="class_download",
        icon=":material/download:",
    )
    if clear.button("Clear my results", key="class_clear"):
        del st.session_state[RESULTS]
        st.rerun()


def _comparison(store: RunStore, numbered: dict[int, ClassResult]) -> pd.DataFrame:
    rows = [
        {
            "who": f"you: training {number}",
            "test accuracy": r.test_accuracy,
            "model": f"head {r.settings.dense_units} units on frozen {r.backbone} ({r.weights} weights)",
            "views": r.settings.views,
            "epochs run": len(r.history),
            "learning rate": f"{r.settings.learning_rate:g}",
            "protocol": "holdout on the pack's split; head on frozen features",
        }
        for number, r in numbered.items()
    ]
    seen: set[int] = set()
    for result in numbered.values():
        for run in host_runs(store, result):
            if run.run_id in seen:
                continue
            seen.add(run.run_id)
            rows.append(
                {
                    "who": f"host: run {run.run_id}",
                    "test accuracy": run.test_accuracy,
                    "model": f"{run.backbone} (trained by the host)",
                    "views": None,
                    "epochs run": None,
                    "learning rate": None,
                    "protocol": run.protocol + ("; the same test images" if run.same_split else ""),
                }
            )
    frame = pd.DataFrame(rows).astype({"views": "Int64", "epochs run": "Int64"})  # whole numbers beside the host's
    return frame.style.format({"test accuracy": "{:.1%}"}, na_rep=tables.MISSING)
