"""Train: queue runs (one backbone or a sweep), watch the running one live, cancel."""

from pathlib import Path

import pandas as pd
import streamlit as st

from bcd_engine import settings
from bcd_engine.errors import BCDError, RunNotFoundError
from bcd_engine.models.backbones import BACKBONES, weights_files
from bcd_engine.models.config import MAX_AUGMENT, OPTIMIZERS, TrainConfig
from bcd_engine.reports import explorer as explorer_tables
from bcd_engine.reports import runs as run_tables
from bcd_engine.training import queue, worker
from ui import charts, common, tables

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
if not demo:  # once per page load, never in the refreshing panel: runs left queued with no live worker get one
    common.start_worker(store)

with st.expander("Backbones", icon=":material/table:"):
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "backbone": s.name,
                    "depth": s.depth,
                    "parameters (millions)": s.params_millions,
                    "input size (px)": s.native_size,
                    "smallest input (px)": s.min_size,
                    "layers unfrozen in phase 2": s.fine_tune_layers,
                    "year": s.year,
                    "paper": s.paper,
                    "notes": s.description,
                }
                for s in BACKBONES.values()
            ]
        ),
        hide_index=True,
        key="train_backbones",
        placeholder=tables.MISSING,
    )

STOPPED = ("failed", "interrupted", "cancelled")  # runs that can be queued again from the page
SMALLEST_INPUT = min(spec.min_size for spec in BACKBONES.values())  # px; each backbone checks its own minimum
WEIGHT_CHOICES = {
    "none": "none (random start)",
    "imagenet": "ImageNet (downloads; needs internet)",
    "file": "a weights file on this machine ...",
}
OFFLINE_HELP = (
    "ImageNet weights are downloaded by Keras on first use, which needs internet. On a machine without it, "
    "copy the backbone's no-top weights file (`.weights.h5` or `.h5`) into the weights folder "
    f"(`BCD_WEIGHTS_DIR`, here `{settings.weights_dir()}`): it is then offered in this list. "
    "Or choose *a weights file on this machine* and type its path."
)


def _launch(configs: list[TrainConfig], data_dir: str) -> None:
    try:
        ids = [queue.queue_run(store, config, data_dir) for config in configs]
    except BCDError as exc:
        st.error(str(exc))
        return
    common.start_worker(store)
    common.remember_runs(ids)


def _weights_choices() -> dict[str, str]:
    """Weights option value -> label: none, imagenet, the files in the weights folder, a typed path."""
    files = {str(path): f"file: {path.name}" for path in weights_files(settings.weights_dir())}
    return {
        "none": WEIGHT_CHOICES["none"],
        "imagenet": WEIGHT_CHOICES["imagenet"],
        **files,
        "file": WEIGHT_CHOICES["file"],
    }


def _default_value(config: TrainConfig, setting: str):
    """The value of one form setting in ``config`` (the augmentation as its factor)."""
    return config.augment.factor if setting == "augment" else getattr(config, setting)


def _backbone_default(name: str, setting: str) -> str:
    """``setting``'s default for one backbone, naming both values where its starting weights decide it."""
    from_none = _default_value(TrainConfig.for_backbone(name), setting)
    if not BACKBONES[name].pretrained:
        return str(from_none)
    pretrained = _default_value(TrainConfig.for_backbone(name, weights="imagenet"), setting)
    return str(from_none) if pretrained == from_none else f"{pretrained} from ImageNet or a file, {from_none} from none"


def _defaults_text(setting: str) -> str:
    """What a blank ``setting`` becomes (TrainConfig.for_backbone's value for each backbone), the commonest value
    first: 'default: 40 (scratch_cnn: 60)'."""
    backbones_by_default: dict[str, list[str]] = {}
    for name in BACKBONES:
        backbones_by_default.setdefault(_backbone_default(name, setting), []).append(name)
    commonest, *others = sorted(backbones_by_default, key=lambda value: -len(backbones_by_default[value]))
    exceptions = "; ".join(f"{', '.join(backbones_by_default[value])}: {value}" for value in others)
    return f"default: {commonest}" + (f" ({exceptions})" if exceptions else "")


def _placeholder(setting: str) -> str:
    """What a blank box shows, short enough to fit it: the default of a pretrained backbone from ImageNet weights,
    starred when it differs by backbone or starting weights."""
    starts = [
        (name, weights)
        for name, spec in BACKBONES.items()
        for weights in (("none", "imagenet") if spec.pretrained else ("none",))
    ]
    values = {_default_value(TrainConfig.for_backbone(name, weights=weights), setting) for name, weights in starts}
    shown = _default_value(TrainConfig.for_backbone("mobilenetv2", weights="imagenet"), setting)
    text = f"{shown:g}" if isinstance(shown, float) else str(shown)
    return text + ("*" if len(values) > 1 else "")


def _setting_input(column, label: str, setting: str, low, high, help: str = "", **options):
    """A number box for one TrainConfig setting, blank (None) unless the user types a value; its placeholder shows
    the default a blank box takes and its help every backbone's."""
    return column.number_input(
        label,
        low,
        high,
        None,
        key=f"train_{setting}",
        placeholder=_placeholder(setting),
        help=f"{help} Blank takes the {_defaults_text(setting)}.".strip(),
        **options,
    )


if demo:
    st.info("Training is switched off in demo mode.", icon=":material/block:")
else:
    left, right = st.columns([3, 1])
    right.write("New here?")
    if right.button(
        "Train demo model",
        key="train_demo",
        type="primary",
        help="A tiny CNN on the SYNTHETIC demo set; about a minute on a CPU.",
    ):
        _launch([queue.demo_config()], common.demo_dataset())

    with left.form("train_form"):
        choices = explorer_tables.dataset_choices(store, common.demo_dataset())
        dataset = st.selectbox("Dataset", choices, format_func=lambda c: c.label, key="train_dataset")
        folder = st.text_input("... or a local folder", key="train_folder", help="Overrides the dataset above.")
        names = st.multiselect(
            "Backbone(s)",
            list(BACKBONES),
            default=["mobilenetv2"],
            key="train_backbones_sel",
            help="Several backbones queue a sweep: one run each, same settings.",
        )
        weight_options = _weights_choices()
        w1, w2 = st.columns(2)
        weights = w1.selectbox(
            "Weights",
            list(weight_options),
            format_func=weight_options.get,
            key="train_weights",
            help="Where the backbone starts from. " + OFFLINE_HELP + " The scratch CNN always starts from none.",
        )
        weights_path = w2.text_input(
            'Weights file (when "a weights file on this machine")',
            key="train_weights_path",
            placeholder="~/weights/resnet50_imagenet_notop.weights.h5",
        )
        st.caption(
            "A setting left blank takes each backbone's default, shown in grey; * marks one that differs by "
            "backbone or starting weights (the box's ? lists them)."
        )
        given = {}  # TrainConfig field -> the value typed; None where left blank (TrainConfig.for_backbone decides)
        c1, c2, c3 = st.columns(3)
        given["image_size"] = _setting_input(
            c1, "Image size (px)", "image_size", SMALLEST_INPUT, 512, "Input size in pixels; smaller is faster."
        )
        given["epochs"] = _setting_input(
            c2, "Epochs", "epochs", 1, 500, "Phase 1 epochs (early stopping may end sooner)."
        )
        given["fine_tune_epochs"] = _setting_input(
            c3,
            "Fine-tune epochs",
            "fine_tune_epochs",
            0,
            200,
            "Phase 2 with the backbone's top layers unfrozen (how many: its row in the Backbones table); 0 skips it.",
        )
        c1, c2, c3, c4 = st.columns(4)
        given["batch_size"] = _setting_input(c1, "Batch size", "batch_size", 1, 256)
        given["learning_rate"] = _setting_input(c2, "Learning rate", "learning_rate", 1e-6, 1.0, format="%.5f")
        given["optimizer"] = c3.selectbox(
            "Optimizer",
            OPTIMIZERS,
            index=None,
            key="train_optimizer",
            placeholder=_placeholder("optimizer"),
            help=f"Blank takes the {_defaults_text('optimizer')}.",
        )
        given["augment"] = _setting_input(
            c4, "Augmentation factor", "augment", 1, MAX_AUGMENT, "Augmented views per training image."
        )
        c1, c2, c3, c4 = st.columns(4)
        given["dense_units"] = _setting_input(c1, "Head dense units", "dense_units", 0, 2048)
        given["dropout"] = _setting_input(c2, "Dropout", "dropout", 0.0, 0.9)
        given["patience"] = _setting_input(
            c3, "Patience", "patience", 1, 100, "Stop after this many epochs without a better validation loss."
        )
        given["seed"] = _setting_input(c4, "Seed", "seed", 0, 10_000)
        given["class_weights"] = st.checkbox("Weight classes by frequency", key="train_class_weights") or None
        submitted = st.form_submit_button("Queue run(s)", type="primary")
    if submitted:
        data_dir = str(Path(folder.strip()).expanduser()) if folder.strip() else dataset.root
        chosen = weights_path.strip() if weights == "file" else weights
        try:
            if not names:
                raise BCDError("choose at least one backbone")
            if weights == "file" and not chosen:
                raise BCDError("type the path of the weights file, or choose other weights")
            if chosen not in ("none", "imagenet") and len(names) > 1:
                raise BCDError("a weights file fits one backbone: choose one backbone, or ImageNet or none")
            configs = [
                TrainConfig.for_backbone(name, weights=chosen if BACKBONES[name].pretrained else None, **given)
                for name in names
            ]
        except BCDError as exc:
            st.error(str(exc))
        else:
            _launch(configs, data_dir)


def run_name(run) -> str:
    return f"run {run.id} · {run.backbone}"


def announce(run, worker_text: str) -> None:
    """What became of a run this visitor queued: waiting (``worker_text`` says for what), running, or done with its
    result and where to look."""
    name = f"Run {run.id} ({run.backbone})"
    if run.status == "queued":
        st.info(f"{name} is queued. {worker_text}", icon=":material/hourglass_top:")
    elif run.status == "running":
        st.info(f"{name} is training: its progress is below.", icon=":material/model_training:")
    elif run.status == "completed":
        accuracy = "" if run.test_accuracy is None else f": test accuracy {run.test_accuracy:.1%}"
        box = st.container(border=True)
        box.success(
            f"{name} finished in {tables.duration(run.seconds) or 'n/a'}{accuracy}.", icon=":material/check_circle:"
        )
        c1, c2, c3 = box.columns(3)
        c1.page_link(
            "pages/compare.py", label=f"Compare run {run.id}", icon=":material/compare:", query_params={"run": run.id}
        )
        c2.page_link(
            "pages/diagnose.py",
            label=f"Diagnose with run {run.id}",
            icon=":material/stethoscope:",
            query_params={"run": run.id},
        )
        if c3.button("Dismiss", key=f"train_dismiss_{run.id}"):
            common.forget_run(run.id)
            st.rerun()
    else:
        box = st.container(border=True)
        box.error(f"{name} {run.status}" + (f": {run.error}" if run.error else "."), icon=":material/error:")
        c1, c2 = box.columns(2)
        if c1.button("Run again", key=f"train_again_{run.id}", icon=":material/replay:"):
            run_again(run.id)
        if c2.button("Dismiss", key=f"train_dismiss_{run.id}"):
            common.forget_run(run.id)
            st.rerun()


def run_again(run_id: int) -> None:
    """Queue a copy of run ``run_id`` (same settings and dataset) and follow it instead."""
    try:
        new_id = queue.queue_again(store, run_id)
    except BCDError as exc:
        st.error(str(exc))
        return
    common.forget_run(run_id)
    common.remember_runs([new_id])
    common.start_worker(store)
    st.rerun()


def cluster_panel(address: str) -> None:
    """The Ray cluster the runs go to (``BCD_RAY_ADDRESS``): its nodes, CPUs, GPUs and runs in flight."""
    try:
        cluster = common.cluster_status(address)
    except BCDError as exc:
        st.warning(
            f"Runs go to the Ray cluster at {address}, which cannot be reached now: {exc}", icon=":material/lan:"
        )
        return
    box = st.container(border=True)
    box.markdown(f"**Ray cluster** at `{address}`: runs are trained there, as many at once as it has room for.")
    c1, c2, c3, c4 = box.columns(4)
    c1.metric("Nodes alive", sum(node["alive"] for node in cluster["nodes"]))
    c2.metric("CPUs free", f"{cluster['available_cpus']:g} of {cluster['cpus']:g}")
    c3.metric("GPUs free", f"{cluster['available_gpus']:g} of {cluster['gpus']:g}")
    c4.metric("Runs in flight", len(cluster["running"]))


@st.fragment(run_every=3)
def queue_panel() -> None:
    """The queue, the running job's progress and curves; refreshed every few seconds from the store (reads only:
    the worker is started where runs are queued and when the page loads; runs whose process died are marked by the
    worker and at the app's start)."""
    runs = store.list_runs(limit=30)
    listed = {run.id: run for run in runs}  # the same reading as the table below, so the two never disagree
    worker_text = "" if demo else worker.worker_status(store)["text"]  # read once per refresh
    for run_id in common.remembered_runs():
        try:
            announce(listed.get(run_id) or store.get_run(run_id), worker_text)
        except RunNotFoundError:  # deleted on the Compare page meanwhile
            common.forget_run(run_id)
    st.subheader("Queue and recent runs")
    if (address := settings.ray_address()) is not None:
        cluster_panel(address)
    if not runs:
        st.caption("No runs yet.")
        return
    if worker_text:
        st.caption(worker_text)
    frame = pd.DataFrame(
        [
            {
                "id": r.id,
                "backbone": r.backbone,
                "dataset": run_tables.dataset_label(r),
                "status": r.status,
                "test_accuracy": r.test_accuracy,
                "time": tables.duration(r.seconds),
                "error": (r.error or "").partition("\n")[0][:120] or None,
            }
            for r in runs
        ]
    )
    tables.show(
        frame,
        key="train_queue",
        columns={
            "id": "run",
            "backbone": "backbone",
            "dataset": "dataset",
            "status": ("status", tables.status()),
            "test_accuracy": ("test accuracy", tables.percent()),
            "time": "training time",
            "error": ("error (first line)", tables.wide_text()),
        },
    )
    for run in [r for r in runs if r.status == "running"]:
        st.markdown(f"**Run {run.id}: {run.backbone}** — running")
        cfg = run.config["train"]
        epochs = store.get_epochs(run.id)
        planned = cfg["epochs"] + cfg["fine_tune_epochs"]
        st.progress(min(1.0, len(epochs) / planned), text=f"{len(epochs)} of at most {planned} epochs")
        frame = run_tables.epochs_frame(store, [run.id])
        if not frame.empty:
            st.plotly_chart(charts.training_curves(frame, {run.id: run_name(run)}), key=f"train_curves_{run.id}")
        if not demo and st.button("Cancel", key=f"train_cancel_{run.id}", disabled=run.cancel_requested):
            store.request_cancel(run.id)
            st.toast(f"Asked run {run.id} to stop.")
    queued = [r for r in runs if r.status == "queued"]
    if queued and not demo and st.button("Cancel all queued", key="train_cancel_queued"):
        for run in queued:
            store.request_cancel(run.id)
    stopped = [
        r for r in runs if r.status in STOPPED and r.protocol.kind == "holdout" and r.id not in common.remembered_runs()
    ]
    if stopped and not demo:
        with st.expander(f"Failed or stopped runs ({len(stopped)}): reasons, run again", icon=":material/replay:"):
            for run in stopped:
                st.markdown(f"**{run_name(run)}** {run.status}" + (f": {run.error}" if run.error else ""))
            again = st.selectbox(
                "Run",
                [r.id for r in stopped],
                key="train_again_pick",
                format_func=lambda i: next(run_name(r) for r in stopped if r.id == i),
            )
            if st.button("Run again with the same settings", key="train_again", icon=":material/replay:"):
                run_again(again)


queue_panel()
