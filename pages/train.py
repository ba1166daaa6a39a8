"""Train: queue runs (one backbone or a sweep), watch the running one live, cancel."""

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from bcd_engine import settings
from bcd_engine.errors import BCDError, RunNotFoundError
from bcd_engine.models.backbones import BACKBONES, weights_files
from bcd_engine.models.config import MAX_AUGMENT, OPTIMIZERS, TrainConfig
from bcd_engine.protocols import jobs as protocol_jobs
from bcd_engine.protocols.baselines import MODELS as BASELINE_MODELS
from bcd_engine.protocols.crossval import DEFAULT_FOLDS
from bcd_engine.reports import explorer as explorer_tables
from bcd_engine.reports import jobs as job_tables
from bcd_engine.reports import runs as run_tables
from bcd_engine.store import JobQueue
from bcd_engine.training import queue, worker
from bcd_engine.training.estimate import estimate_run
from ui import charts, classroom, common, tables
from ui.progress import show_estimate, show_run_progress

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
DATASET_REQUEST = "train.dataset_request"  # the folder the Explorer's "Train on this dataset" hands over
PROTOCOLS = {"holdout": "Hold-out", "cv": "k-fold cross-validation", "lodo": "Leave one dataset out"}
SUBMIT = {"holdout": "Queue run(s)", "cv": "Queue cross-validation", "lodo": "Queue leave-one-dataset-out"}
LABEL_MAP_EXAMPLE = '{"Original": {"Benign": "benign", "Early": "malignant"}, "pbc": {"lymphocyte": "benign"}}'
SMALLEST_INPUT = min(spec.min_size for spec in BACKBONES.values())  # px; each backbone checks its own minimum
WEIGHT_CHOICES = {
    "none": "none (random start)",
    "local": "ImageNet, from the weights folder",
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


def _local_weights(names: list[str]) -> dict[str, Path | None]:
    """Each chosen pretrained backbone's ImageNet file in the weights folder (None where it has none)."""
    return {
        name: queue.local_imagenet_weights(name, settings.weights_dir()) for name in names if BACKBONES[name].pretrained
    }


def _launch_job(queue_one, configs: list[TrainConfig]) -> None:
    """Queue one protocol job per config with ``queue_one(config)`` (BCDError is the caller's) and start a worker."""
    ids = [queue_one(config) for config in configs]
    common.start_worker(store)
    st.session_state["train.my_jobs"] = [*st.session_state.get("train.my_jobs", []), *ids]
    st.toast(f"Queued job{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}; follow it under Protocol jobs.")


def _lodo_inputs(choices):
    """The LODO part of the form: datasets from the list and typed NAME=FOLDER lines, and a label map; a function
    that reads them at submit time into ``({name: folder}, label map or None)`` (BCDError when they do not parse)."""
    picked = st.multiselect(
        "Datasets (two or more)",
        choices,
        format_func=lambda c: c.label,
        key="train_lodo_datasets",
        help="Each is held out once; a dataset is named by its folder.",
    )
    typed = st.text_area(
        "... and/or folders, one NAME=FOLDER per line",
        key="train_lodo_folders",
        placeholder="pbc=~/data/pbc_lymphocytes",
    )
    mapping = st.text_area(
        "Label map (JSON; blank when the datasets share class names)",
        key="train_lodo_map",
        placeholder=LABEL_MAP_EXAMPLE,
        help="Maps each dataset's folder classes onto shared labels; a class left out keeps its name.",
    )

    def read() -> tuple[dict[str, str], dict | None]:
        datasets: dict[str, str] = {}
        for name, root in [(Path(c.root).name, c.root) for c in picked] + [
            _named_folder(line) for line in typed.splitlines() if line.strip()
        ]:
            if name in datasets:
                raise BCDError(f"two datasets are named {name!r}: type one as OTHERNAME=FOLDER instead")
            datasets[name] = root
        try:
            label_map = json.loads(mapping) if mapping.strip() else None
        except ValueError as exc:
            raise BCDError(f"the label map is not JSON: {exc}") from None
        return datasets, label_map

    return read


def _named_folder(line: str) -> tuple[str, str]:
    name, sep, folder = line.strip().partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise BCDError(f"each line must be NAME=FOLDER, got {line.strip()!r}")
    return name.strip(), str(Path(folder.strip()).expanduser())


def _weights_choices(names: list[str]) -> dict[str, str]:
    """Weights option value -> label: none, the weights folder's ImageNet file of each chosen backbone (when it has
    one), imagenet, the files in the weights folder, a typed path."""
    local = {name: path for name, path in _local_weights(names).items() if path is not None}
    files = {str(path): f"file: {path.name}" for path in weights_files(settings.weights_dir())}
    found = ", ".join(path.name for path in local.values())
    return {
        "none": WEIGHT_CHOICES["none"],
        **({"local": f"{WEIGHT_CHOICES['local']} ({found})"} if local else {}),
        "imagenet": WEIGHT_CHOICES["imagenet"],
        **files,
        "file": WEIGHT_CHOICES["file"],
    }


def _default_weights(names: list[str]) -> str:
    """The weights a fresh form offers: the weights folder's ImageNet files when every chosen pretrained backbone has
    one there, else none (a random start; the page never downloads unasked)."""
    local = _local_weights(names)
    return "local" if local and all(local.values()) else "none"


def _resolve_weights(name: str, chosen: str) -> str | None:
    """The weights option of backbone ``name`` for the form's choice (``local``: its file in the weights folder)."""
    if not BACKBONES[name].pretrained:
        return None
    if chosen != "local":
        return chosen
    path = queue.local_imagenet_weights(name, settings.weights_dir())
    if path is None:
        raise BCDError(
            f"the weights folder ({settings.weights_dir()}) has no ImageNet file for {name} "
            f"({BACKBONES[name].weights_file}): choose ImageNet (download) or none for it"
        )
    return str(path)


def _weights_file_example(names: list[str]) -> str:
    """A weights path that fits the first chosen pretrained backbone, for the path box's placeholder."""
    pretrained = [BACKBONES[name] for name in names if BACKBONES[name].pretrained]
    return f"~/weights/{pretrained[0].weights_file}" if pretrained else "~/weights/BACKBONE_notop.weights.h5"


def _preselect_dataset(choices) -> None:
    """Take the dataset the Explorer handed over ("Train on this dataset", or a ``?dataset=FOLDER`` link) once:
    choose it in the Dataset box, or type it as the local folder when the store does not list it."""
    requested = st.session_state.pop(DATASET_REQUEST, None) or st.query_params.get("dataset")
    if not requested or st.session_state.get("train.dataset_taken") == requested:
        return
    st.session_state["train.dataset_taken"] = requested  # a link's dataset is taken once, then the user's choice
    wanted = Path(requested).expanduser().resolve()
    match = next((c for c in choices if Path(c.root).resolve() == wanted), None)
    if match is not None:
        st.session_state["train_dataset"] = match
        st.session_state["train_folder"] = ""
    else:
        st.session_state["train_folder"] = str(wanted)


def _follow_weights_default(names: list[str], options: dict[str, str]) -> None:
    """Keep the Weights box on the chosen backbones' default (:func:`_default_weights`) until the user picks other
    weights; a choice the options no longer hold goes back to the default."""
    default = _default_weights(names)
    current = st.session_state.get("train_weights")
    if current is None or current == st.session_state.get("train.weights_default") or current not in options:
        st.session_state["train_weights"] = default
    st.session_state["train.weights_default"] = default


def other_protocols(column, choices) -> None:
    """Queue the classical baseline on a dataset, or the colour-robustness check of a completed run."""
    with column.expander("Classical baseline and colour robustness", icon=":material/rule:"):
        st.caption(
            "The thesis' classical baseline: colour, texture (GLCM) and shape features with an SVM or logistic "
            "regression, on the same group-aware split as training; a floor every network should clear."
        )
        with st.form("train_baseline_form"):
            b1, b2, b3 = st.columns([3, 1, 1])
            dataset = b1.selectbox("Dataset", choices, format_func=lambda c: c.label, key="train_baseline_dataset")
            model = b2.selectbox("Model", BASELINE_MODELS, key="train_baseline_model")
            folds = b3.number_input("Folds", 2, 20, None, key="train_baseline_folds", placeholder="hold-out")
            if st.form_submit_button("Queue baseline"):
                try:
                    _launch_job(
                        lambda _: protocol_jobs.queue_baseline(
                            store, dataset.root, model=model, folds=None if folds is None else int(folds)
                        ),
                        [None],
                    )
                except BCDError as exc:
                    st.error(str(exc))
        st.caption(
            "Colour robustness: a completed run's test images again in grayscale and colour-normalised (Reinhard), "
            "beside a colour-only classifier on the same images. A model that reads cells keeps its accuracy."
        )
        completed = store.list_runs(status="completed")
        with st.form("train_robustness_form"):
            run_id = st.selectbox(
                "Run",
                [run.id for run in completed],
                format_func=lambda i: next(
                    f"run {r.id} · {r.backbone} · {r.dataset.name}" for r in completed if r.id == i
                ),
                key="train_robustness_run",
                placeholder="no completed run yet",
            )
            if st.form_submit_button("Queue robustness check", disabled=not completed):
                try:
                    _launch_job(lambda _: protocol_jobs.queue_robustness(store, run_id), [None])
                except BCDError as exc:
                    st.error(str(exc))


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


if demo:  # class mode: students train heads on the host's cached features, nothing stored (ui/classroom.py)
    classroom.render(store)
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

    choices = explorer_tables.dataset_choices(store, common.demo_dataset())
    _preselect_dataset(choices)
    names = left.multiselect(
        "Backbone(s)",
        list(BACKBONES),
        default=["mobilenetv2"],
        key="train_backbones_sel",
        help="Several backbones queue a sweep: one run each, same settings.",
    )
    weight_options = _weights_choices(names)
    _follow_weights_default(names, weight_options)
    protocol = left.radio(
        "Protocol",
        list(PROTOCOLS),
        format_func=PROTOCOLS.get,
        horizontal=True,
        key="train_protocol",
        help="Hold-out: one run per backbone with one group-aware train/validation/test split. k-fold CV: one run "
        "per fold, every image tested once. Leave one dataset out: train on all datasets but one, test on that one. "
        "All go through the same queue and worker; their results show on the Compare page.",
    )
    with left.form("train_form"):
        if protocol == "lodo":
            lodo_datasets = _lodo_inputs(choices)
        else:
            dataset = st.selectbox("Dataset", choices, format_func=lambda c: c.label, key="train_dataset")
            folder = st.text_input("... or a local folder", key="train_folder", help="Overrides the dataset above.")
        if protocol == "cv":
            folds = st.number_input("Folds", 2, 20, DEFAULT_FOLDS, key="train_folds", help="One run per fold.")
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
            placeholder=_weights_file_example(names),
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
        c1, c2, c3, c4, c5 = st.columns(5)
        given["dense_units"] = _setting_input(c1, "Head dense units", "dense_units", 0, 2048)
        given["dropout"] = _setting_input(c2, "Dropout", "dropout", 0.0, 0.9)
        given["label_smoothing"] = _setting_input(
            c3,
            "Label smoothing",
            "label_smoothing",
            0.0,
            0.5,
            "Share of each label's weight spread over the other classes, so the head is not pushed to certainty.",
        )
        given["patience"] = _setting_input(
            c4, "Patience", "patience", 1, 100, "Stop after this many epochs without a better validation loss."
        )
        given["seed"] = _setting_input(c5, "Seed", "seed", 0, 10_000)
        given["class_weights"] = st.checkbox("Weight classes by frequency", key="train_class_weights") or None
        submitted = st.form_submit_button(SUBMIT[protocol], type="primary")
        estimating = st.form_submit_button("Estimate time", help="How long a run of these settings takes here.")
    if submitted or estimating:
        chosen = weights_path.strip() if weights == "file" else weights
        try:
            if not names:
                raise BCDError("choose at least one backbone")
            if weights == "file" and not chosen:
                raise BCDError("type the path of the weights file, or choose other weights")
            if chosen not in ("none", "imagenet", "local") and len(names) > 1:
                raise BCDError("a weights file fits one backbone: choose one backbone, or ImageNet or none")
            configs = [
                TrainConfig.for_backbone(name, weights=_resolve_weights(name, chosen), **given) for name in names
            ]
            if estimating:  # before queueing: one run's time on this machine, each backbone
                data_dir = str(Path(folder.strip()).expanduser()) if folder.strip() else dataset.root
                for config in configs:
                    show_estimate(estimate_run(config, common.scan(data_dir).n_images))
            elif protocol == "lodo":
                datasets, label_map = lodo_datasets()
                _launch_job(lambda config: protocol_jobs.queue_lodo(store, config, datasets, label_map), configs)
            else:
                data_dir = str(Path(folder.strip()).expanduser()) if folder.strip() else dataset.root
                if protocol == "cv":
                    _launch_job(lambda config: protocol_jobs.queue_cv(store, config, data_dir, folds=folds), configs)
                else:
                    _launch(configs, data_dir)
        except BCDError as exc:
            st.error(str(exc))
    other_protocols(left, choices)


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
        finished_curves(box, run)
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
        if run.status == "cancelled":  # the user's own choice: said plainly, not as an error
            box.info(f"{name} was cancelled; its epochs so far are kept.", icon=":material/cancel:")
        else:
            box.error(f"{name} {run.status}" + (f": {run.error}" if run.error else "."), icon=":material/error:")
        finished_curves(box, run)
        c1, c2 = box.columns(2)
        if c1.button("Run again", key=f"train_again_{run.id}", icon=":material/replay:"):
            run_again(run.id)
        if c2.button("Dismiss", key=f"train_dismiss_{run.id}"):
            common.forget_run(run.id)
            st.rerun()


def finished_curves(box, run) -> None:
    """The curves of a run that has ended, kept under its message (the live chart goes when the run stops)."""
    frame = run_tables.epochs_frame(store, [run.id])
    if not frame.empty:
        box.plotly_chart(charts.training_curves(frame, {run.id: run_name(run)}), key=f"train_final_curves_{run.id}")


def cancel_button(run) -> None:
    """Cancel a running run, asked once (its epochs so far are kept)."""
    confirmed_cancel(
        str(run.id),
        "Cancel",
        f"Stop run {run.id}? Its epochs so far are kept, and Run again reuses the features already cached.",
        lambda: store.request_cancel(run.id),
        pending=run.cancel_requested,
    )


def cancel_queued(queued) -> None:
    """Cancel every queued run, asked once like a single run's cancel."""

    def cancel() -> None:
        for run in queued:
            store.request_cancel(run.id)

    confirmed_cancel(
        "queued",
        "Cancel all queued",
        f"Cancel the {len(queued)} queued run(s)? They have not started, so nothing trained is lost.",
        cancel,
    )


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


def jobs_panel() -> None:
    """The protocol jobs (k-fold CV, LODO, baseline, robustness): where each stands, its result in one line, and
    Cancel (asked once) for a queued or running one; nothing when there are none."""
    jobs = JobQueue(store).list(limit=20)
    if not jobs:
        return
    st.markdown("**Protocol jobs**: their runs appear in the table below; results on the Compare page.")
    tables.show(
        job_tables.jobs_frame(jobs),
        key="train_jobs",
        columns={
            "id": "job",
            "job": ("what", tables.wide_text()),
            "status": ("status", tables.status()),
            "result": ("result", tables.wide_text()),
            "error": ("error (first line)", tables.wide_text()),
            "created": ("queued at", st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm")),
        },
    )
    for job in jobs:
        if job.status in ("queued", "running") and not demo:
            confirmed_cancel(
                f"job_{job.id}",
                f"Cancel {job.name}",
                f"Stop {job.name}? Its finished folds or rounds are kept; the one training now stops.",
                lambda job=job: JobQueue(store).request_cancel(job.id),
                pending=job.cancel_requested,
            )


def confirmed_cancel(key: str, label: str, question: str, cancel, *, pending: bool = False) -> None:
    """A Cancel button that asks once: ``question`` with Yes / No; Yes calls ``cancel()``. ``pending``: already asked
    to stop (a caption instead of the button). The buttons act in callbacks, so the refreshed panel shows the answer."""
    asking = f"train.confirm_cancel_{key}"

    def ask(value: bool) -> None:
        st.session_state[asking] = value

    def confirm() -> None:
        cancel()
        st.session_state[asking] = False

    if pending:
        st.caption(f"{label}: stopping at its next check ...")
    elif not st.session_state.get(asking):
        st.button(label, key=f"train_cancel_{key}", icon=":material/stop_circle:", on_click=ask, args=(True,))
    else:
        st.warning(question, icon=":material/help:")
        yes, no = st.columns(2)
        yes.button("Yes, stop it", key=f"train_cancel_yes_{key}", type="primary", on_click=confirm)
        no.button("No, keep going", key=f"train_cancel_no_{key}", on_click=ask, args=(False,))


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
    jobs_panel()
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
                "error": None if r.status == "cancelled" else (r.error or "").partition("\n")[0][:120] or None,
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
        show_run_progress(store, run.id)  # the phase it is in: scanning, features, epochs, evaluation
        cfg = run.config["train"]
        epochs = store.get_epochs(run.id)
        planned = cfg["epochs"] + cfg["fine_tune_epochs"]
        st.progress(min(1.0, len(epochs) / planned), text=f"{len(epochs)} of at most {planned} epochs")
        frame = run_tables.epochs_frame(store, [run.id])
        if not frame.empty:
            st.plotly_chart(charts.training_curves(frame, {run.id: run_name(run)}), key=f"train_curves_{run.id}")
        if not demo:
            cancel_button(run)
    queued = [r for r in runs if r.status == "queued"]
    if queued and not demo:
        cancel_queued(queued)
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
