"""Streamlit-side glue shared by the pages: cached store/scan/model, demo mode, explainers."""
from __future__ import annotations

import streamlit as st

from bcd_engine import settings
from bcd_engine.data import synthetic
from bcd_engine.data.scan import ScanResult, folder_signature, scan_dataset
from bcd_engine.errors import BCDError
from bcd_engine.inference.explain import explain_source
from bcd_engine.inference.loading import model_identity
from bcd_engine.reports import explorer as explorer_tables
from bcd_engine.store import RunStore
from bcd_engine.training import queue, worker


@st.cache_resource(show_spinner=False)
def _store(url: str) -> RunStore:
    """Opened once per server process: the app's start is where the schema is upgraded and dead runs recovered."""
    return RunStore.open(url)


def store() -> RunStore:
    """The run store at ``settings.database_url()`` (one per URL); on failure an error and stop."""
    try:
        return _store(settings.database_url())
    except BCDError as exc:
        st.error(f"Cannot open the run store: {exc}")
        st.stop()


def scan(root: str) -> ScanResult:
    """The folder's scan, cached until an image in it is added, removed or changed (DataError when unusable)."""
    return _scan(root, folder_signature(root))


@st.cache_data(show_spinner="Scanning the dataset ...", max_entries=8)
def _scan(root: str, signature: str) -> ScanResult:
    return scan_dataset(root)


def load_model(run_id: int):
    """The run's model, loaded once per model: the cache key names the model itself, not only the run id,
    so a run deleted and its id reused by a new run never serves the old model (BCDError when unusable)."""
    url = settings.database_url()
    return _load_model(run_id, model_identity(run_id, store=_store(url)), url,
                       str(settings.artifacts_dir()))


@st.cache_resource(show_spinner="Loading the model ...", max_entries=4)
def _load_model(run_id: int, identity: str, url: str, artifacts: str):
    from bcd_engine.inference.loading import load_run_model

    return load_run_model(run_id, store=_store(url))


def grad_cam(run_id: int, image: str | bytes, class_name: str):
    """(image, Grad-CAM heatmap) of an image file or its bytes for the run's class ``class_name``, computed once."""
    return _grad_cam(run_id, model_identity(run_id, store=store()), image, class_name)


@st.cache_data(show_spinner=False, max_entries=256)
def _grad_cam(run_id: int, identity: str, image: str | bytes, class_name: str):
    loaded = load_model(run_id)
    shown, cam = explain_source(loaded, image, class_index=loaded.class_names.index(class_name))
    return shown, cam.heatmap


def load_diagnoser(run_ids: tuple[int, ...]):
    """A Diagnoser over the runs' cached models (an ensemble when there are several)."""
    from bcd_engine.inference.diagnosis import Diagnoser

    return Diagnoser([load_model(run_id) for run_id in run_ids])


def demo_mode() -> bool:
    """True when the app runs as a browse-and-diagnose demo (``BCD_DEMO_MODE`` or secret ``demo_mode``)."""
    try:
        secret = st.secrets.get("demo_mode")
    except Exception:  # noqa: BLE001 - no secrets.toml at all is the normal case
        secret = None
    return settings.demo_mode(secret)


def demo_banner() -> None:
    if demo_mode():
        st.info("**Demo mode**: browse and diagnose only. Training and deleting runs are switched off.",
                icon=":material/visibility:")


def explain(text: str) -> None:
    """The page's "what am I looking at" explainer."""
    with st.expander("What am I looking at?", icon=":material/school:"):
        st.markdown(text)


def no_runs_yet(key: str) -> None:
    """Say there is no completed run and offer to queue the demo model (unless in demo mode); then stop."""
    st.info("No completed runs yet — train the demo model on the Train page.", icon=":material/hourglass_empty:")
    if not demo_mode() and st.button("Train demo model", key=f"{key}_train_demo", type="primary"):
        run_id = queue.queue_demo_run(store(), demo_dataset())
        worker.ensure_worker(store())
        st.success(f"Queued demo run {run_id}; follow it on the Train page.")
    st.page_link("pages/train.py", label="Go to the Train page", icon=":material/model_training:")
    st.stop()


def image_stats(root: str):
    """Per-image colour statistics of the folder, cached like :func:`scan`."""
    return _image_stats(root, folder_signature(root))


@st.cache_data(show_spinner="Measuring image colours ...", max_entries=8)
def _image_stats(root: str, signature: str):
    return explorer_tables.image_stats(_scan(root, signature))  # the signature just computed, not a second one


@st.cache_resource(show_spinner="Drawing the SYNTHETIC demo set ...")
def demo_dataset() -> str:
    """The SYNTHETIC demo set's folder, drawn on first use (once per server process)."""
    return str(synthetic.ensure_demo_dataset())
