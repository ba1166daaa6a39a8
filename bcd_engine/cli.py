"""``python -m bcd_engine <command>``: headless, scriptable access to the engine.

With ``--json`` a command prints exactly one JSON document on stdout; logs, warnings and progress bars
go to stderr. Bad input prints one line ``bcd: error: ...`` on stderr and exits with code 2. TensorFlow's
start-up notices are hidden unless ``TF_CPP_MIN_LOG_LEVEL`` asks for them (see :func:`_import_tensorflow`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import sys
import tempfile
import typing
from collections.abc import Callable
from dataclasses import asdict

from PIL import Image

from bcd_engine import settings
from bcd_engine.classroom.pack import DEFAULT_BACKBONE as CLASS_BACKBONE
from bcd_engine.classroom.pack import DEFAULT_VIEWS as CLASS_VIEWS
from bcd_engine.classroom.pack import SYNTHETIC_IMAGE_SIZE, prepare_pack, save_pack
from bcd_engine.data.scan import scan_dataset
from bcd_engine.data.splits import DEFAULT_FRACTION
from bcd_engine.errors import BCDError, ConfigError, WriteError
from bcd_engine.export.bundle import FORMATS, export_run
from bcd_engine.export.run_bundle import import_bundle, write_bundle
from bcd_engine.inference.calibrate import calibrate_run
from bcd_engine.inference.diagnosis import Diagnoser, results_csv, sources_from_paths
from bcd_engine.inference.evaluate import evaluate_run_on_folder, load_label_map
from bcd_engine.inference.explain import DEFAULT_OPACITY, explain_source, overlay
from bcd_engine.inference.loading import load_run_model
from bcd_engine.inference.results import Diagnosis, Reading
from bcd_engine.models.backbones import BACKBONES
from bcd_engine.models.config import TrainConfig
from bcd_engine.progress import progress_bar
from bcd_engine.protocols.audit import audit_dataset, run_leakage_audit
from bcd_engine.protocols.baselines import IMAGE_SIZE, MODELS, cross_validate_classical, train_classical_baseline
from bcd_engine.protocols.crossval import DEFAULT_FOLDS, cross_validate
from bcd_engine.protocols.jobs import run_job
from bcd_engine.protocols.lodo import leave_one_dataset_out, load_dataset_label_map
from bcd_engine.protocols.occlusion import DEFAULT_GRID, DEFAULT_HEAT_IMAGES, occlusion_audit, with_and_without
from bcd_engine.protocols.robustness import colour_robustness_of_run
from bcd_engine.reports.runs import dataset_label
from bcd_engine.store import RunStore
from bcd_engine.training.queue import queue_again, queue_run
from bcd_engine.training.run import train
from bcd_engine.training.worker import POLL_SECONDS, run_worker

EXIT_BAD_INPUT = 2
BUNDLE = "bundle"  # export --format bundle: the whole run, for the import command
EXECUTORS = ("local", "ray")
# The commands that use TensorFlow: they import it first, with its start-up notices hidden.
TENSORFLOW_COMMANDS = frozenset(
    {
        "train",
        "cv",
        "lodo",
        "evaluate",
        "calibrate",
        "robustness",
        "predict",
        "explain",
        "export",
        "import",
        "worker",
        "prepare-class",
    }
)
QUIET_TF_LOG_LEVEL = "3"  # TF_CPP_MIN_LOG_LEVEL unless set: no TensorFlow C++ INFO, WARNING or ERROR lines
_ABSL_LINE = re.compile(r"([IWEF])\d{4} ")  # an absl C++ log line starts with its severity and the date (MMDD)
_ABSL_EARLY = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"

Handler = Callable[[argparse.Namespace], tuple[object, str, int]]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of a usage dump."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"bcd: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m bcd_engine", description="bcd: blood cancer detection by transfer learning")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        sub.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        return sub

    scan = command("scan", _cmd_scan, "scan a folder of class subfolders: counts, unreadable files, duplicate groups")
    scan.add_argument("--data", required=True, help="folder with one subfolder of images per class")

    command("runs", _cmd_runs, "list the stored runs with their headline metrics")
    command("backbones", _cmd_backbones, "list the available backbones")

    training = command(
        "train", _cmd_train, "fine-tune a backbone on a folder, evaluate it on its test split and store it"
    )
    _add_train_options(training)

    cv = command("cv", _cmd_cv, "k-fold cross-validation (stratified, group-aware): one stored run per fold")
    _add_train_options(cv)
    cv.add_argument("--folds", type=int, default=DEFAULT_FOLDS, help=f"number of folds (default {DEFAULT_FOLDS})")
    _add_executor_options(cv, "where the folds train: here one after another, or as parallel tasks on a Ray cluster")

    lodo = command(
        "lodo", _cmd_lodo, "leave-one-dataset-out CV: train on all datasets but one, test on the one left out"
    )
    _add_train_options(
        lodo, data_help="NAME=DIR of one dataset; give two or more (each is held out in turn)", data_action="append"
    )
    lodo.add_argument(
        "--label-map",
        help="JSON file {dataset name: {folder class: shared label}}, e.g. "
        '{"all": {"Benign": "benign", "Early": "malignant", ...}, "pbc": {"lymphocyte": "benign"}}',
    )
    _add_executor_options(lodo, "where the rounds train: here one after another, or as parallel tasks on a Ray cluster")

    queue = command("queue", _cmd_queue, "put a run in the queue with the train options (a worker trains it)")
    _add_train_options(queue)

    baseline = command(
        "baseline",
        _cmd_baseline,
        "the classical baseline (colour, GLCM texture and shape features "
        "+ SVM or logistic regression) on the hold-out split or under k-fold CV",
    )
    baseline.add_argument("--data", required=True, help="folder with one subfolder of images per class")
    baseline.add_argument("--model", choices=MODELS, default=MODELS[0], help=f"classifier (default {MODELS[0]})")
    baseline.add_argument("--folds", type=int, help="k-fold CV with K folds (default: the hold-out split)")
    baseline.add_argument(
        "--image-size", type=int, default=IMAGE_SIZE, help=f"input size in pixels (default {IMAGE_SIZE})"
    )
    baseline.add_argument("--seed", type=int, default=0, help="seed of the split and the classifier (default 0)")
    _add_fraction_options(baseline, "of the hold-out split (the one `train` makes with the same values)")

    audit = command(
        "audit", _cmd_audit, "leakage and shortcut audit of a folder: can colour or a corner alone tell the classes?"
    )
    audit_target = audit.add_mutually_exclusive_group(required=True)
    audit_target.add_argument("--data", help="folder with one subfolder of images per class")
    audit_target.add_argument(
        "--run",
        type=int,
        action="append",
        help="leakage audit of a stored run's split instead; repeat it, e.g. for every CV fold",
    )
    audit.add_argument(
        "--seed", type=int, default=0, help="seed of the split audited and of the shortcut classifiers (default 0)"
    )
    audit.add_argument(
        "--occlusion",
        action="store_true",
        help="with one --run: occlusion audit of its test split (accuracy with each grid cell and with the flagged "
        "regions masked, Grad-CAM heat on the border and on them); stored with the run",
    )
    audit.add_argument(
        "--grid", type=int, default=DEFAULT_GRID, help=f"cells a side of the occlusion grid (default {DEFAULT_GRID})"
    )
    audit.add_argument(
        "--grid-images",
        type=int,
        help="test images the occlusion grid is measured on, evenly spread (default: all; each cell is one pass)",
    )
    audit.add_argument(
        "--heat-images",
        type=int,
        default=DEFAULT_HEAT_IMAGES,
        help=f"test images whose Grad-CAM heat the occlusion audit averages (default {DEFAULT_HEAT_IMAGES}; 0: none)",
    )
    _add_fraction_options(audit, "of the hold-out split audited (the one `train` makes with the same values)")

    evaluate = command("evaluate", _cmd_evaluate, "run a trained model on another folder with the same class names")
    evaluate.add_argument("--run", type=int, required=True, help="run id")
    evaluate.add_argument("--data", required=True, help="folder with one subfolder of images per class")
    evaluate.add_argument(
        "--label-map",
        help='JSON file {"run": {class: label}, "data": {class: label}} when '
        "class names differ (e.g. onto benign/malignant)",
    )

    calibrate = command(
        "calibrate",
        _cmd_calibrate,
        "fit a run's out-of-domain gate and calibration temperature "
        "from its recorded split (for runs trained before bcd fitted them; training does it)",
    )
    calibrate.add_argument("--run", type=int, required=True, help="run id")

    robustness = command(
        "robustness",
        _cmd_robustness,
        "colour robustness of a run: accuracy on its test split "
        "with colour taken away (grayscale, Reinhard), beside a colour-only baseline on the same "
        "images",
    )
    robustness.add_argument("--run", type=int, required=True, help="run id")

    predict = command(
        "predict", _cmd_predict, "diagnose image files, folders of images or zip archives with trained runs"
    )
    predict.add_argument(
        "--run",
        type=int,
        action="append",
        required=True,
        help="run id; repeat it for an ensemble (probabilities averaged over the runs)",
    )
    predict.add_argument(
        "--tta",
        action="store_true",
        help="average over the 8 flips and quarter turns and add an uncertainty to each result",
    )
    predict.add_argument("--csv", metavar="FILE", help="also write the results table to this CSV file")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image file, folder of images or .zip archive")

    explain = command("explain", _cmd_explain, "Grad-CAM: where in the image the model looked, as an overlay PNG")
    explain.add_argument("--run", type=int, required=True, help="run id")
    explain.add_argument("--out", required=True, metavar="FILE.png", help="where to write the overlay")
    explain.add_argument(
        "--opacity", type=float, default=DEFAULT_OPACITY, help=f"heatmap opacity, 0 to 1 (default {DEFAULT_OPACITY})"
    )
    explain.add_argument("image", metavar="IMAGE")

    export = command(
        "export",
        _cmd_export,
        "export a run's model (.keras or TensorFlow Lite) with a model card, or "
        "the whole run as a bundle another store can import",
    )
    export.add_argument("--run", type=int, required=True, help="run id")
    export.add_argument(
        "--format",
        choices=(*FORMATS, BUNDLE),
        default=FORMATS[0],
        help=f"model file format, or {BUNDLE}: one .zip with the model, its gate, labels, config, "
        f"evaluations and model card, for the import command (default {FORMATS[0]})",
    )
    export.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder for the model, labels.json and MODEL_CARD.md (or the bundle)",
    )
    export.add_argument(
        "--audit-data",
        metavar="DIR",
        help="also audit this folder for the card, on the split the run's seed and fractions make",
    )
    export.add_argument("--overwrite", action="store_true", help="replace files already in DIR")

    prepare_class = command(
        "prepare-class",
        _cmd_prepare_class,
        "cache a dataset's features through a frozen backbone as a class pack, for demo mode's class mode "
        "(students train heads on it in seconds)",
    )
    prepare_class.add_argument(
        "--data", help="folder with one subfolder of images per class (default: the SYNTHETIC demo set)"
    )
    prepare_class.add_argument(
        "--backbone", default=CLASS_BACKBONE, help=f"backbone with frozen features (default {CLASS_BACKBONE})"
    )
    prepare_class.add_argument("--weights", help="imagenet, none or a .weights.h5 file (default: none)")
    prepare_class.add_argument(
        "--image-size",
        type=int,
        help=f"input size in pixels (default: the backbone's native size; {SYNTHETIC_IMAGE_SIZE} for the demo set)",
    )
    prepare_class.add_argument(
        "--views",
        type=int,
        default=CLASS_VIEWS,
        help=f"views cached per training image: the image and views-1 augmented ones (default {CLASS_VIEWS})",
    )
    prepare_class.add_argument("--seed", type=int, default=0, help="seed of the split and the augmentation (default 0)")
    prepare_class.add_argument(
        "--out", metavar="DIR", help="folder of class packs (default: BCD_CLASS_DIR or class-packs/)"
    )

    worker = command(
        "worker", _cmd_worker, "train queued runs one after another (the dashboard starts one when needed)"
    )
    worker.add_argument("--once", action="store_true", help="stop when the queue is empty instead of polling")
    worker.add_argument(
        "--poll",
        type=float,
        default=POLL_SECONDS,
        metavar="SECONDS",
        help=f"queue poll interval (default {POLL_SECONDS:g} s)",
    )
    _add_executor_options(worker, "where the runs train: here one after another, or as parallel tasks on a Ray cluster")

    import_ = command(
        "import",
        _cmd_import,
        "add the run in a bundle (export --format bundle) to this store as a new "
        "run, after checking every member's checksum and loading its model in safe mode",
    )
    import_.add_argument("bundle", metavar="BUNDLE.zip")

    rerun = command(
        "rerun",
        _cmd_rerun,
        "queue a finished hold-out run again with its stored settings and data folder (`worker --once` trains it)",
    )
    rerun.add_argument("--run", type=int, required=True, help="run id")
    rerun.add_argument(
        "--weights",
        metavar="PATH",
        help="weights instead of the stored ones: a copy of a weights file that has moved, imagenet or none",
    )
    return parser


def _add_executor_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--executor`` and the Ray cluster's options (``worker``, ``cv``, ``lodo``)."""
    parser.add_argument("--executor", choices=EXECUTORS, default=EXECUTORS[0], help=f"{what} (default local)")
    parser.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="the Ray cluster: auto (the one started on this "
        "machine), HOST:PORT or ray://HOST:PORT; default BCD_RAY_ADDRESS, else auto",
    )
    parser.add_argument(
        "--cpus-per-run",
        type=int,
        default=1,
        metavar="N",
        help="CPUs one run takes on a cluster without GPUs (default 1)",
    )
    parser.add_argument(
        "--gpus-per-run",
        type=int,
        default=1,
        metavar="N",
        help="GPUs one run takes on a cluster with GPUs (default 1; more trains with MirroredStrategy)",
    )


def _ray_options(args: argparse.Namespace) -> dict:
    """The Ray executor's keyword arguments from ``--ray-address``, ``--cpus-per-run`` and ``--gpus-per-run``."""
    if args.cpus_per_run < 1 or args.gpus_per_run < 1:
        raise ConfigError("--cpus-per-run and --gpus-per-run must be at least 1")
    return {
        "address": args.ray_address or settings.ray_address() or "auto",
        "cpus_per_run": args.cpus_per_run,
        "gpus_per_run": args.gpus_per_run,
    }


def _executor(args: argparse.Namespace):
    """The executor ``cv`` and ``lodo`` hand their folds or rounds to (None: the local loop)."""
    if args.executor == "local":
        return None
    from bcd_engine.training.ray_executor import RayExecutor

    options = _ray_options(args)
    return RayExecutor(options.pop("address"), **options)


def _add_fraction_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--val-fraction", type=float, help=f"validation fraction {what}; default {DEFAULT_FRACTION}")
    parser.add_argument("--test-fraction", type=float, help=f"test fraction {what}; default {DEFAULT_FRACTION}")


def _fractions(args: argparse.Namespace) -> dict[str, float]:
    """The split fractions given on the command line (the engine's defaults stand for the others)."""
    given = {"val_fraction": args.val_fraction, "test_fraction": args.test_fraction}
    return {name: value for name, value in given.items() if value is not None}


def _train_settings() -> list[dataclasses.Field]:
    """The TrainConfig fields that are options of ``train``, ``cv`` and ``lodo``: all but those with ``cli=False``."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)]


def _add_train_options(
    parser: argparse.ArgumentParser,
    *,
    data_help: str = "folder with one subfolder of images per class",
    data_action: str = "store",
) -> None:
    """The options of ``train``, ``cv`` and ``lodo``: data and one flag per TrainConfig setting.

    A flag's default is None, so that :meth:`TrainConfig.for_backbone` fills the backbone's defaults;
    a boolean setting is a switch (``--class-weights``); a field without a default (``backbone``) is required.
    """
    parser.add_argument("--data", required=True, action=data_action, help=data_help)
    hints = typing.get_type_hints(TrainConfig)
    for setting in _train_settings():
        flag = "--" + setting.name.replace("_", "-")
        options = {"dest": setting.name, "help": setting.metadata.get("help", "").format(default=setting.default)}
        if setting.default is dataclasses.MISSING and setting.default_factory is dataclasses.MISSING:
            options["required"] = True
        kind = setting.metadata.get("type", _not_none(hints[setting.name]))
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, **options)
        else:
            parser.add_argument(flag, type=kind, choices=setting.metadata.get("choices"), **options)


def _not_none(hint: type) -> type:
    """``str`` for ``str | None``; any other type as it is."""
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
    return kinds[0] if kinds else hint


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {setting.name: getattr(args, setting.name) for setting in _train_settings()}
    return TrainConfig.for_backbone(values.pop("backbone"), **values)


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send everything written to stdout (Python and C level) to stderr; yield the real stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    real_stdout = os.fdopen(saved, "w")
    os.dup2(2, 1)
    previous, sys.stdout = sys.stdout, sys.stderr
    try:
        yield real_stdout
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        sys.stdout = previous
        real_stdout.close()


@contextlib.contextmanager
def _stderr_without(hidden: Callable[[str], bool]):
    """Hold back what is written to stderr (Python and C level) in the block; then pass on the lines not ``hidden``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            sys.stderr.writelines(
                line for line in held.read().decode(errors="replace").splitlines(keepends=True) if not hidden(line)
            )
            sys.stderr.flush()


def _import_tensorflow() -> None:
    """Import TensorFlow with the start-up notices below ``TF_CPP_MIN_LOG_LEVEL`` hidden (the CLI's default: 3).

    TensorFlow logs its first lines (oneDNN, CUDA driver probes) through absl before absl is initialised,
    and absl then ignores the variable: those lines are dropped here by their severity (I, W, E, F = 0 to 3),
    with absl's warning about them; everything else written during the import is passed on.
    """
    if "tensorflow" in sys.modules or os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return  # on JAX or PyTorch, Keras never imports TensorFlow
    setting = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")
    level = int(setting) if setting.isdigit() else 0
    with _stderr_without(lambda line: _below_log_level(line, level)), contextlib.suppress(ImportError):
        import tensorflow  # noqa: F401  (missing: Keras says so when it needs it)


def _below_log_level(line: str, level: int) -> bool:
    """Whether a line of stderr is an absl C++ log line of a severity below ``level`` (or absl's warning about them)."""
    absl = _ABSL_LINE.match(line)
    return "IWEF".index(absl[1]) < level if absl else level > 0 and line.startswith(_ABSL_EARLY)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_TF_LOG_LEVEL)
    with _stdout_to_stderr() as real_stdout:
        if args.command in TENSORFLOW_COMMANDS or getattr(args, "occlusion", False):
            _import_tensorflow()
        try:
            payload, text, code = _run(args)
        except BCDError as exc:
            print(f"bcd: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        output = json.dumps(payload, indent=2, default=str) if args.json else text
        real_stdout.write(output + "\n")
        real_stdout.flush()
    return code


def _run(args: argparse.Namespace) -> tuple[object, str, int]:
    """Run one command: (JSON payload, human-readable text, exit code)."""
    return args.handler(args)


def _cmd_scan(args):
    result = scan_dataset(args.data, progress=True).to_dict()
    lines = [f"{result['n_images']} images in {len(result['classes'])} classes under {result['root']}"]
    lines += [f"  {name}: {count}" for name, count in result["classes"].items()]
    lines.append(f"unreadable: {len(result['unreadable'])}")
    lines += [f"  {item['path']}: {item['reason']}" for item in result["unreadable"]]
    lines.append(f"exact-duplicate groups: {len(result['duplicate_groups'])}")
    lines.append(f"near-duplicate groups: {len(result['near_duplicate_groups'])}")
    return result, "\n".join(lines), 0


def _cmd_runs(args):
    store = RunStore.open()
    records = store.list_runs()
    runs = [
        {
            "id": r.id,
            "backbone": r.backbone,
            "dataset": asdict(r.dataset),
            "status": r.status,
            "protocol": r.protocol.label,
            "test_accuracy": r.test_accuracy,
            "macro_auc": r.macro_auc,
            "created_at": r.created_at,
            "seconds": r.seconds,
            "worker_id": r.worker_id,
            "mask_regions": r.config.get("train", {}).get("mask_regions", "none"),
            "accuracy_with_and_without": with_and_without(store.get_evaluations(r.id)).to_dict(),
        }
        for r in records
    ]
    lines = [f"{'id':>4}  {'backbone':<14} {'status':<11} {'accuracy':>8} {'AUC':>6}  {'dataset':<28} protocol"]
    for r, record in zip(runs, records):
        acc = "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
        auc = "-" if r["macro_auc"] is None else f"{r['macro_auc']:.4f}"
        lines.append(
            f"{r['id']:>4}  {r['backbone']:<14} {r['status']:<11} {acc:>8} {auc:>6}  "
            f"{dataset_label(record):<28} {r['protocol']}"
        )
    return {"runs": runs}, "\n".join(lines) if runs else "no runs yet", 0


def _cmd_backbones(args):
    rows = [asdict(spec) for spec in BACKBONES.values()]
    lines = [
        f"{s['name']:<15} {s['native_size']:>4}px  {s['params_millions']:>6.1f}M  {s['description']}" for s in rows
    ]
    return {"backbones": rows}, "\n".join(lines), 0


def _cmd_train(args):
    config = _config_from_args(args)
    store = RunStore.open()
    result = train(config, args.data, store=store, progress=True).to_dict()
    result.pop("model_path")
    text = (
        f"run {result['run_id']} {result['status']}: {result['backbone']}, test accuracy "
        f"{result['test_accuracy']}, macro AUC {result['macro_auc']} ({result['protocol']}, "
        f"{result['n_train']}/{result['n_val']}/{result['n_test']} images, {result['seconds']:.1f} s)"
    )
    mask = store.get_run(result["run_id"]).config.get("mask")
    if mask:  # what --mask-regions masked and why (auto decides from the dataset's region audit)
        text += f"\nmasked regions: {mask['mask_regions'] or 'none'} ({mask['reason']})"
    return result, text, 0 if result["status"] == "completed" else 1


def _cmd_cv(args):
    config = _config_from_args(args)
    result = cross_validate(
        config, args.data, folds=args.folds, store=RunStore.open(), progress=True, executor=_executor(args)
    )
    lines = [f"{result.protocol}, {args.backbone}:"]
    lines += [
        f"  fold {f.fold}: accuracy {f.accuracy:.4f}, macro AUC {f.macro_auc}, run {f.run_id}" for f in result.folds
    ]
    lines.append(
        f"  mean accuracy {result.mean['accuracy']:.4f} +- {result.std['accuracy']:.4f} (sample std over folds)"
    )
    return result.to_dict(), "\n".join(lines), 0


def _cmd_lodo(args):
    datasets = {}
    for item in args.data:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--data must be NAME=DIR, got {item!r}")
        if name in datasets:
            raise ConfigError(f"dataset name {name!r} is given twice")
        datasets[name] = folder
    label_map = load_dataset_label_map(args.label_map) if args.label_map else None
    config = _config_from_args(args)
    result = leave_one_dataset_out(
        config, datasets, label_map, store=RunStore.open(), progress=True, executor=_executor(args)
    )
    lines = [f"{result.protocol}, {args.backbone}, shared labels {', '.join(result.shared_labels)}:"]
    for r in result.rounds:
        if r.status != "completed":
            lines.append(f"  held out {r.held_out}: {r.status} ({r.reason})")
        else:
            lines.append(
                f"  held out {r.held_out}: held-out accuracy {r.held_out_accuracy:.4f} on "
                f"{r.n_held_out} images, in-domain {r.in_domain_accuracy:.4f}, run {r.run_id}"
            )
    return result.to_dict(), "\n".join(lines), 0


def _cmd_baseline(args):
    if args.folds is not None and _fractions(args):
        raise ConfigError(
            "--val-fraction and --test-fraction set the hold-out split; with --folds each fold is the test set"
        )
    scan = scan_dataset(args.data, progress=True)
    options = dict(seed=args.seed, image_size=args.image_size, model=args.model, progress=True)
    if args.folds is None:
        result = train_classical_baseline(scan, **options, **_fractions(args))
        return (
            result,
            (
                f"classical baseline ({args.model}), {result['protocol']}: test accuracy "
                f"{result['test_accuracy']:.4f}, macro AUC {result['macro_auc']}"
            ),
            0,
        )
    result = cross_validate_classical(scan, folds=args.folds, **options)
    lines = [f"{result['model']}, {result['protocol']}:"]
    lines += [f"  fold {f['fold']}: accuracy {f['accuracy']:.4f}, macro AUC {f['macro_auc']}" for f in result["folds"]]
    lines.append(
        f"  mean accuracy {result['mean']['accuracy']:.4f} +- {result['std']['accuracy']:.4f} (sample std over folds)"
    )
    return result, "\n".join(lines), 0


def _cmd_audit(args):
    if args.occlusion:
        if not args.run or len(args.run) != 1:
            raise ConfigError("--occlusion audits one stored run: give exactly one --run")
        occlusion = occlusion_audit(
            args.run[0],
            store=RunStore.open(),
            grid=args.grid,
            grid_images=args.grid_images,
            heat_images=args.heat_images,
        )
        return occlusion.to_dict(), occlusion.summary(), 0
    if args.run:
        if _fractions(args):
            raise ConfigError(
                "--val-fraction and --test-fraction set the split audited with --data; "
                "--run audits the run's stored split"
            )
        result = run_leakage_audit(args.run, store=RunStore.open())
        lines = [
            f"run {r['run_id']} ({r['run_protocol']}): "
            f"{'ok' if r['ok'] else 'DUPLICATE GROUPS CROSS ITS SPLIT'}; " + "; ".join(r["warnings"])
            for r in result["runs"]
        ]
        return result, "\n".join(lines), 0 if result["ok"] else 1
    result = audit_dataset(args.data, seed=args.seed, progress=True, **_fractions(args))
    short = result.shortcuts
    text = "\n".join(
        [
            f"leakage: {'ok' if result.ok else 'GROUPS CROSS THE SPLIT'}",
            *[f"  warning: {w}" for w in result.leakage["warnings"]],
            f"colour-only accuracy: {short['colour_only_accuracy']:.4f}",
            f"corner-only accuracy: {short['corner_only_accuracy']:.4f}",
            f"chance accuracy:      {short['chance_accuracy']:.4f}",
            short["interpretation"],
        ]
    )
    return result.to_dict(), text, 0


def _cmd_evaluate(args):
    label_map = load_label_map(args.label_map) if args.label_map else None
    evaluation = evaluate_run_on_folder(args.run, args.data, store=RunStore.open(), label_map=label_map, progress=True)
    payload = {
        "n_images": evaluation.metrics["n"],
        "accuracy": evaluation.accuracy,
        "macro_f1": evaluation.metrics["macro_f1"],
        "macro_auc": evaluation.macro_auc,
        "confusion_matrix": evaluation.confusion_matrix,
        "class_names": evaluation.class_names,
        "ood_flagged": evaluation.metrics.get("ood_flagged"),
    }
    text = (
        f"run {args.run} on {args.data}: {payload['n_images']} images, accuracy {payload['accuracy']:.4f}, "
        f"macro F1 {payload['macro_f1']:.4f}, macro AUC {payload['macro_auc']}"
    )
    if payload["ood_flagged"] is not None:
        text += (
            f"; the out-of-domain gate flagged {payload['ood_flagged']} of {payload['n_images']} images "
            f"({evaluation.metrics['ood_flagged_share']:.1%}): they would get no answer from predict"
        )
    return payload, text, 0


def _cmd_calibrate(args):
    result = calibrate_run(args.run, store=RunStore.open(), progress=True)
    text = (
        f"run {args.run}: temperature {result.temperature:.3f}; test ECE {result.ece:.4f} before, "
        f"{result.ece_calibrated:.4f} after; out-of-domain gate threshold {result.ood_threshold:.1f} "
        f"(set to let through at least {result.ood_pass_rate:.0%} of new in-domain images), flags "
        f"{result.ood_flagged} of {result.images['test']} test images ({result.ood_flagged_share:.1%})"
    )
    return result.to_dict(), text, 0


def _cmd_robustness(args):
    result = colour_robustness_of_run(args.run, store=RunStore.open(), progress=True)
    rows = [("original", result["original"]), *result["normalised"].items()]
    lines = [
        f"run {args.run} ({result['backbone']}, colour mode {result['colour_mode']}), {result['n_test']} test images:",
        f"  {'test images':<12} {'model':>7} {'colour-only':>12}",
    ]
    lines += [f"  {name:<12} {row['model_accuracy']:>7.4f} {row['colour_only_accuracy']:>12.4f}" for name, row in rows]
    return result, "\n".join(lines), 0


def _cmd_predict(args):
    sources = sources_from_paths(args.images)
    diagnoser = Diagnoser.for_runs(args.run, store=RunStore.open())
    with progress_bar(len(sources), "diagnosing") as bar:
        results = diagnoser.diagnose(sources, tta=args.tta, on_progress=lambda done, _: bar.update(done - bar.n))
    if args.csv:
        _write(args.csv, results_csv(results))
    lines = []
    for r in results:
        if not r.usable:
            lines.append(f"{r.name}: error: {r.error}")
        elif r.reading is Reading.OUT_OF_DOMAIN:  # no class is the answer, as on the Diagnose page
            lines.append(
                f"{r.name}: out of domain, no answer (score {r.ood_score:.1f} > threshold {r.ood_threshold:.1f})"
            )
        else:  # the answer in words first, then the class, its calibrated probability and the reading
            extra = f", disagreement {r.uncertainty['disagreement']:.2f}" if args.tta else ""
            lines.append(
                f"{r.name}: {r.in_words} ({r.answer}, calibrated probability "
                f"{r.calibrated_probabilities[r.answer]:.3f}; reading {r.reading.value}{extra})"
            )
    code = 0 if any(r.usable for r in results) else 1
    return [_prediction_row(r) for r in results], "\n".join(lines), code


def _prediction_row(diagnosis: Diagnosis) -> dict:
    """One image's entry in ``predict --json``: the diagnosis' dict with its name last, as ``path``."""
    row = diagnosis.to_dict()
    row["path"] = row.pop("name")
    return row


def _cmd_explain(args):
    if not 0 <= args.opacity <= 1:
        raise ConfigError(f"--opacity must be between 0 and 1, got {args.opacity}")
    loaded = load_run_model(args.run, store=RunStore.open())
    class_names = loaded.class_names
    image, cam = explain_source(loaded, args.image)
    buffer = io.BytesIO()
    Image.fromarray(overlay(image, cam.heatmap, opacity=args.opacity)).save(buffer, format="PNG")
    _write(args.out, buffer.getvalue())
    predicted = class_names[cam.class_index]
    payload = {
        "out": args.out,
        "class": predicted,
        "probabilities": dict(zip(class_names, (float(p) for p in cam.probabilities), strict=True)),
    }
    return payload, f"wrote {args.out} (Grad-CAM of class {predicted})", 0


def _write(path: str, data: bytes) -> None:
    """Write a file the user named; a failure is a one-line error, not a traceback."""
    try:
        with open(path, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _cmd_export(args):
    store = RunStore.open()
    if args.format == BUNDLE:
        if args.audit_data:
            raise ConfigError("--audit-data is for a model export's card; a bundle carries the run's own card")
        path = write_bundle(args.run, out_dir=args.out, store=store, overwrite=args.overwrite)
        return ({"run_id": args.run, "format": BUNDLE, "files": [str(path)], "max_abs_diff": None}, f"wrote {path}", 0)
    audit = None
    if args.audit_data:
        train_config = store.get_run(args.run).config["train"]
        audit = audit_dataset(
            args.audit_data,
            progress=True,
            seed=train_config["seed"],
            val_fraction=train_config["val_fraction"],
            test_fraction=train_config["test_fraction"],
        )
    result = export_run(
        args.run, format=args.format, out_dir=args.out, store=store, audit=audit, overwrite=args.overwrite
    )
    payload = {
        "run_id": result.run_id,
        "format": result.format,
        "files": [str(p) for p in result.paths],
        "max_abs_diff": result.max_abs_diff,
    }
    return payload, "\n".join(f"wrote {p}" for p in result.paths), 0


def _cmd_import(args):
    result = import_bundle(args.bundle, store=RunStore.open())
    payload = {
        "run_id": result.run_id,
        "source_run_id": result.source_run_id,
        "backbone": result.backbone,
        "bundle_sha256": result.bundle_sha256,
    }
    return (
        payload,
        (f"imported run {result.source_run_id} ({result.backbone}) of {args.bundle} as run {result.run_id}"),
        0,
    )


def _cmd_rerun(args):
    new_id = queue_again(RunStore.open(), args.run, weights=args.weights)
    payload = {"run_id": new_id, "status": "queued", "from_run": args.run}
    return (
        payload,
        (
            f"run {new_id} queued with the settings and data of run {args.run}; "
            "`python -m bcd_engine worker --once` trains it"
        ),
        0,
    )


def _cmd_queue(args):
    run_id = queue_run(RunStore.open(), _config_from_args(args), args.data)
    return (
        {"run_id": run_id, "status": "queued"},
        (f"run {run_id} queued; `python -m bcd_engine worker --once` trains it"),
        0,
    )


def _cmd_worker(args):
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if args.executor == "ray":
        from bcd_engine.training.ray_executor import run_ray_worker

        done = run_ray_worker(once=args.once, poll_seconds=args.poll, run_job=run_job, **_ray_options(args))
    else:
        done = run_worker(once=args.once, poll_seconds=args.poll, store=RunStore.open(), run_job=run_job)
    runs, jobs = [d for d in done if "run_id" in d], [d for d in done if "job_id" in d]
    lines = [f"run {d['run_id']}: {d['status']}" for d in runs] + [f"job {d['job_id']}: {d['status']}" for d in jobs]
    return {"runs": runs, "jobs": jobs}, "\n".join(lines) or "no queued runs", 0


def _cmd_prepare_class(args):
    pack = prepare_pack(
        args.data,
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        views=args.views,
        seed=args.seed,
        progress=True,
    )
    folder = save_pack(pack, args.out)
    result = {**pack.to_dict(), "folder": str(folder)}
    split = result["split"]
    text = (
        f"class pack {pack.name} in {folder}: {pack.dataset.n_images} images of {len(pack.class_names)} classes "
        f"through {pack.backbone} ({pack.weights_label} weights, {pack.image_size} px), {pack.views} views per "
        f"training image, split {split['train']}/{split['val']}/{split['test']}"
    )
    return result, text, 0
