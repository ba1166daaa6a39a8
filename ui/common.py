"""Streamlit-side glue shared by the pages: cached store/scan/model, demo mode, explainers."""

from __future__ import annotations

import ipaddress
import os
import re
import threading
import weakref
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import streamlit as st
from streamlit.runtime import Runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx

from bcd_engine import settings
from bcd_engine.data import synthetic
from bcd_engine.data.images import load_image
from bcd_engine.data.scan import ScanResult, folder_signature, scan_dataset
from bcd_engine.errors import BCDError, BusyError
from bcd_engine.inference.explain import explain_image
from bcd_engine.inference.service import InferenceQueue, Steps, shared_queue
from bcd_engine.reports import explorer as explorer_tables
from bcd_engine.store import RunStore
from bcd_engine.store.artifacts import model_identity
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
        st.error(public(f"Cannot open the run store: {exc}"))
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
    return _load_model(run_id, model_identity(run_id, store=_store(url)), url, str(settings.artifacts_dir()))


_models_in_memory: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # identity -> a model still in use
_models_lock = threading.Lock()


@st.cache_resource(show_spinner="Loading the model ...", max_entries=4)
def _load_model(run_id: int, identity: str, url: str, artifacts: str):
    """Loaded once while in use: after a cache clear (any client may ask Streamlit for one) a model that a
    queued job or another page still holds is handed out again, never loaded as a second copy."""
    from bcd_engine.inference.loading import load_run_model

    with _models_lock:
        loaded = _models_in_memory.get(identity)
        if loaded is None:
            loaded = _models_in_memory[identity] = load_run_model(run_id, store=_store(url))
        return loaded


def grad_cam(run_id: int, image: str | np.ndarray, class_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(image at the run's input size, its Grad-CAM heatmap for class ``class_name``) of an image file or of an
    image already decoded at that size; computed once, on the shared inference queue (BCDError when it cannot be)."""
    return _grad_cam(run_id, model_identity(run_id, store=store()), image, class_name)


@st.cache_data(show_spinner=False, max_entries=256)
def _grad_cam(run_id: int, identity: str, image: str | np.ndarray, class_name: str):
    loaded = load_model(run_id)
    index = loaded.class_names.index(class_name)

    def compute():
        shown = image if isinstance(image, np.ndarray) else load_image(image, image_size=loaded.config.image_size)
        return shown, explain_image(loaded, shown, class_index=index).heatmap

    job = inference_queue().call(compute, alive=_visitor_alive(), visitor=visitor())
    job.wait()
    return job.result()


def inference_queue() -> InferenceQueue:
    """The server process's one inference queue, shared by every session and kept out of Streamlit's caches, which
    any client may clear (see bcd_engine.inference.service)."""
    return shared_queue()


def visitor() -> str | None:
    """Whom this page's queued work counts against: the visitor's public IP address (an IPv6 one by its /64), so
    that many tabs share one share; this tab's session where the address is local or private (a reverse proxy's,
    or none); None outside a Streamlit session."""
    ctx = get_script_run_ctx(suppress_warning=True)
    if ctx is None:
        return None
    try:
        address = ipaddress.ip_address(st.context.ip_address or "")
    except ValueError:
        return f"session {ctx.session_id}"
    if not address.is_global:
        return f"session {ctx.session_id}"
    return f"ip {ipaddress.ip_network(f'{address}/64', strict=False) if address.version == 6 else address}"


def _visitor_alive() -> Callable[[], bool] | None:
    """Whether this page's visitor is still connected (None outside a Streamlit session)."""
    ctx = get_script_run_ctx(suppress_warning=True)
    if ctx is None or not Runtime.exists():  # a bare script run (AppTest) has no sessions to ask about
        return None
    session_id = ctx.session_id
    return lambda: Runtime.instance().is_active_session(session_id)


def run_queued(steps: Steps, *, images: int, describe: Callable[[int, int], str]) -> Any:
    """Run ``steps`` (``images`` images) on the shared inference queue with a progress bar (``describe(done,
    total)`` its text).

    A full queue, or a visitor past their share, gets the reason and the page stops; the visitor leaving, or
    starting other work on the page, drops the job.
    """
    try:
        job = inference_queue().submit(steps, alive=_visitor_alive(), visitor=visitor(), images=images)
    except BusyError as exc:
        st.warning(f"{exc}.", icon=":material/hourglass_top:")
        st.stop()
    bar = st.progress(0.0, text="Waiting for the server ...")
    shown = (0, 0)
    try:
        while not job.wait(0.1):
            if job.progress != shown:  # each update also lets Streamlit stop this run if the visitor went away
                shown = done, total = job.progress
                bar.progress(done / total, text=describe(done, total))
    finally:
        job.cancel()
    bar.empty()
    return job.result()


def load_diagnoser(run_ids: tuple[int, ...]):
    """A Diagnoser over the runs' cached models (an ensemble when there are several), answering in the words of the
    first run's classes."""
    from bcd_engine.inference.diagnosis import Diagnoser, class_guide_of_run

    models = [load_model(run_id) for run_id in run_ids]
    return Diagnoser(models, guide=class_guide_of_run(run_ids[0], store=store()))


def demo_mode() -> bool:
    """True when the app runs as a browse-and-diagnose demo (``BCD_DEMO_MODE`` or secret ``demo_mode``)."""
    try:
        secret = st.secrets.get("demo_mode")
    except Exception:  # noqa: BLE001 - no secrets.toml at all is the normal case
        secret = None
    return settings.demo_mode(secret)


_SERVER_PATH = re.compile(r"(?<![\w.~])~?(?:/[^\s'\"/:,;()\[\]]+)+/?")


def public(message: object) -> str:
    """``message`` as a visitor may see it: in demo mode every server path in it is cut to its last part."""
    text = str(message)
    if not demo_mode():
        return text
    return _SERVER_PATH.sub(lambda match: ".../" + PurePath(match.group()).name, text)


_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~:$&=^\"'])")


def plain(text: object) -> str:
    """A visitor's text (a file or archive member name) as Markdown that shows exactly that text: every Markdown,
    HTML and Streamlit directive character backslash-escaped, line breaks as spaces."""
    return _MARKDOWN_SPECIALS.sub(r"\\\1", " ".join(str(text).splitlines()))


def public_path(path: str | os.PathLike) -> bool:
    """Whether a visitor may see the image or folder at ``path``: always outside demo mode; in demo mode only
    inside the SYNTHETIC demo set, another synthetic set, or a folder the host lists in ``BCD_DEMO_DATASETS``."""
    if not demo_mode():
        return True
    target = Path(path).resolve()
    if any(target.is_relative_to(root.resolve()) for root in (Path(demo_dataset()), *settings.demo_datasets())):
        return True
    return any(synthetic.is_synthetic(folder) for folder in (target, target.parent, target.parent.parent))


def demo_banner() -> None:
    if demo_mode():
        st.info(
            "**Demo mode**: browse, diagnose, and train small models in class mode (kept in your tab only). "
            "The stored runs cannot be trained, changed or deleted.",
            icon=":material/visibility:",
        )


def explain(text: str) -> None:
    """The page's "what am I looking at" explainer."""
    with st.expander("What am I looking at?", icon=":material/school:"):
        st.markdown(text)


def start_worker(store: RunStore) -> None:
    """Have queued runs trained: by a local background worker, or, with ``BCD_RAY_ADDRESS`` set, by a worker that
    hands them to that Ray cluster."""
    address = settings.ray_address()
    if address is None:
        worker.ensure_worker(store)
    else:
        from bcd_engine.training import ray_executor

        ray_executor.ensure_ray_worker(store, address)


@st.cache_data(show_spinner=False, ttl=10)
def cluster_status(address: str) -> dict:
    """The Ray cluster's nodes, CPUs, GPUs and runs in flight (read at most every 10 s); ClusterError when
    it cannot be reached."""
    from bcd_engine.training import ray_executor

    return ray_executor.cluster_status(address, store=store())


def no_runs_yet(key: str) -> None:
    """Say there is no completed run and offer to queue the demo model (unless in demo mode); then stop."""
    st.info("No completed runs yet — train the demo model on the Train page.", icon=":material/hourglass_empty:")
    if not demo_mode() and st.button("Train demo model", key=f"{key}_train_demo", type="primary"):
        run_id = queue.queue_demo_run(store(), demo_dataset())
        start_worker(store())
        remember_runs([run_id])
        st.success(f"Queued demo run {run_id}; follow it on the Train page.")
    st.page_link("pages/train.py", label="Go to the Train page", icon=":material/model_training:")
    st.stop()


def remember_runs(run_ids: list[int]) -> None:
    """Note runs this visitor queued, so the Train page can say what became of them."""
    st.session_state["my_runs"] = [*remembered_runs(), *run_ids]


def remembered_runs() -> list[int]:
    """The runs this visitor queued and has not dismissed, oldest first."""
    return list(st.session_state.get("my_runs", []))


def forget_run(run_id: int) -> None:
    st.session_state["my_runs"] = [i for i in remembered_runs() if i != run_id]


def requested_run() -> int | None:
    """The run a link asked for (``?run=N``, from the Train page's "finished" message), or None."""
    try:
        return int(st.query_params.get("run", ""))
    except ValueError:
        return None


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
