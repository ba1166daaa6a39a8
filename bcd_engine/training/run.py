"""Fine-tuning a backbone on a folder of class subfolders, end to end: scan, split, train, evaluate, store.

Phase 1 trains the classification head on cached frozen-backbone features (see
:mod:`bcd_engine.models.features`); phase 2 (optional) unfreezes the top K backbone layers and trains on
images at a lower learning rate, with BatchNorm kept in inference mode. The scratch CNN trains end to
end on images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bcd_engine.data.images import load_images
from bcd_engine.data.regions import prepare_for_model
from bcd_engine.data.scan import ScanResult, scan_dataset
from bcd_engine.data.splits import Split, holdout_split
from bcd_engine.data.synthetic import is_synthetic
from bcd_engine.errors import BCDError, CancelledError, ConfigError, WriteError
from bcd_engine.evaluation.metrics import Evaluation, evaluate_probabilities
from bcd_engine.files import atomic_path
from bcd_engine.inference.predict import measure_latency, predict_proba
from bcd_engine.inference.trust import FEATURE_LAYER, fit_trust, save_trust
from bcd_engine.models.backbones import build_backbone, get_backbone, require_weights_file
from bcd_engine.models.batches import training_batches
from bcd_engine.models.config import TrainConfig
from bcd_engine.models.device import (
    compute_precision,
    configure_device,
    precision_policy,
    replicated,
)
from bcd_engine.models.features import (
    FeatureCache,
    build_feature_extractor,
    extract_features,
)
from bcd_engine.models.head import (
    assemble_model,
    build_head,
    class_weight_dict,
    compile_model,
    early_stopping,
    fit_head_on_features,
    unfreeze_top_layers,
)
from bcd_engine.store import TEST_EVALUATION, Protocol, RunStore, artifacts
from bcd_engine.training.estimate import record_extraction
from bcd_engine.training.masking import resolve_mask_regions
from bcd_engine.training.monitor import RunMonitor, heartbeat

LOAD_STEP = 256  # images decoded between two progress reports


@dataclass(frozen=True)
class TrainResult:
    """What ``train`` reports; everything else is in the store under ``run_id``."""

    run_id: int
    status: str
    backbone: str
    protocol: str
    n_train: int
    n_val: int
    n_test: int
    test_accuracy: float | None
    macro_auc: float | None
    seconds: float  # the stored run's seconds (see RunRecord): the same figure the store and the dashboard show
    model_path: str | None
    feature_cache: dict | None = None  # hits, misses and file of the frozen-feature cache (pretrained backbones)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def train(
    config: TrainConfig,
    data_dir: str | os.PathLike,
    *,
    store: RunStore,
    run_id: int | None = None,
    progress: bool = False,
    feature_cache_dir: Path | None = None,
    split: Split | None = None,
    scan: ScanResult | None = None,
    protocol: Protocol = Protocol.holdout(),
) -> TrainResult:
    """Train ``config`` on ``data_dir`` and store the run, its split, epochs, evaluation and model in ``store``.

    The split is the config's group-aware hold-out split unless ``split`` is given (cross-validation
    folds, with the ``scan`` of ``data_dir`` it indexes), and the run is stored under ``protocol``
    (the result's ``protocol`` is its label).
    With ``run_id`` the (already claimed) run is used; otherwise a new one is created. Bad input raises
    a ``BCDError`` before anything is written. A failure or cancellation during training leaves the
    run ``failed`` or ``cancelled`` with its epochs so far; a failed run's files without a record are removed.

    Training is the one place in bcd that seeds the process-wide generators (Python's, NumPy's and Keras'),
    with ``config.seed``, just before the model is built: a random-start backbone's weights and the
    order of the training examples follow it. Everything else draws from seeds it is given (the split,
    the augmentation, the head's initial weights, the dropout).
    """
    require_weights_file(config.weights)
    if scan is None:
        with _scanning(store, run_id, progress=progress):
            scan = scan_dataset(data_dir, progress=progress)
    elif Path(scan.root) != Path(data_dir).expanduser().resolve():
        raise ConfigError(f"the scan given is of {scan.root}, not of {Path(data_dir).expanduser().resolve()}")
    root = Path(scan.root)  # resolved, ``~`` expanded
    if split is None:
        split = holdout_split(
            scan.labels,
            scan.groups,
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            seed=config.seed,
        )
    config, mask = resolve_mask_regions(config, scan, split)  # "auto" becomes the regions the run masks
    run_config = {
        "train": config.to_dict(),
        "mask": mask.to_dict(),
        "data_dir": str(root),
        "class_names": list(scan.class_names),
        "dataset": {
            "name": root.name,
            "n_images": scan.n_images,
            "synthetic": is_synthetic(root),
            "fingerprint": scan.fingerprint,
        },
    }
    dataset_id = store.register_dataset(
        name=root.name,
        data_dir=str(root),
        n_images=scan.n_images,
        class_counts=scan.class_counts,
        synthetic=run_config["dataset"]["synthetic"],
    )
    if run_id is None:
        run_id = store.create_run(
            backbone=config.backbone, protocol=protocol, config=run_config, dataset_id=dataset_id, status="running"
        )
    else:
        store.update_run_config(run_id, {**store.get_run(run_id).config, **run_config})
        store.set_run_dataset(run_id, dataset_id)
    environment = configure_device()
    store.start_run(run_id, environment=environment)
    store.save_split(run_id, split.assignments(scan))
    import keras

    keras.utils.set_random_seed(config.seed)  # the one process-wide seeding (see above)
    try:
        with (
            heartbeat(store, run_id),
            compute_precision(precision_policy(environment)),
            replicated(environment) as replicas,
        ):
            evaluation, model_path, cache_stats = _train_and_evaluate(
                _global_batch(config, replicas),
                scan,
                split,
                store=store,
                run_id=run_id,
                progress=progress,
                feature_cache_dir=feature_cache_dir,
                replicas=replicas,
                device=environment["device"],
            )
    except CancelledError:
        store.finish_run(run_id, status="cancelled", error="cancelled by user")
        return _result(store, run_id, "cancelled", config, split, None, None, protocol=protocol)
    except BaseException as exc:
        message = str(exc) if isinstance(exc, BCDError) else f"{type(exc).__name__}: {exc}"
        store.finish_run(run_id, status="failed", error=message)
        artifacts.remove_unrecorded_files(store, run_id)
        raise
    store.finish_run(run_id, status="completed", test_accuracy=evaluation.accuracy, macro_auc=evaluation.macro_auc)
    return _result(store, run_id, "completed", config, split, evaluation, model_path, cache_stats, protocol=protocol)


@contextlib.contextmanager
def _scanning(store: RunStore, run_id: int | None, *, progress: bool) -> Iterator[None]:
    """The scanning phase of a stored run (a queued one, whose id is known before the scan)."""
    if run_id is None:
        yield
        return
    with RunMonitor(store, run_id, progress=progress).phase("scanning the dataset"):
        yield


def _load_images(paths, *, image_size: int, monitor: RunMonitor) -> np.ndarray:
    """The images as one uint8 array, loaded LOAD_STEP at a time so the loading phase reports its progress."""
    images = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    with monitor.phase("loading images", len(paths), unit="image") as phase:
        for start in range(0, len(paths), LOAD_STEP):
            images[start : start + LOAD_STEP] = load_images(paths[start : start + LOAD_STEP], image_size=image_size)
            phase.advance(len(paths[start : start + LOAD_STEP]))
            monitor.check_cancel()
    return images


def _global_batch(config: TrainConfig, replicas: int) -> TrainConfig:
    """``config`` with its batch size per device times ``replicas`` (the batch MirroredStrategy splits)."""
    return config if replicas == 1 else dataclasses.replace(config, batch_size=config.batch_size * replicas)


def _result(
    store: RunStore,
    run_id,
    status,
    config,
    split,
    evaluation: Evaluation | None,
    model_path,
    cache_stats=None,
    *,
    protocol: Protocol,
) -> TrainResult:
    return TrainResult(
        run_id=run_id,
        status=status,
        backbone=config.backbone,
        protocol=protocol.label,
        n_train=len(split.train),
        n_val=len(split.val),
        n_test=len(split.test),
        test_accuracy=None if evaluation is None else evaluation.accuracy,
        macro_auc=None if evaluation is None else evaluation.macro_auc,
        seconds=store.get_run(run_id).seconds,
        model_path=model_path,
        feature_cache=cache_stats,
    )


def _train_and_evaluate(
    config: TrainConfig,
    scan: ScanResult,
    split: Split,
    *,
    store: RunStore,
    run_id: int,
    progress: bool,
    feature_cache_dir: Path | None,
    replicas: int,
    device: str,
):
    spec = get_backbone(config.backbone)
    preprocess = spec.preprocess()
    monitor = RunMonitor(store, run_id, progress=progress)
    n_classes = len(scan.class_names)
    paths, labels = np.array(scan.paths), scan.labels
    md5s = [record.md5 for record in scan.images]
    images = prepare_for_model(_load_images(list(paths), image_size=config.image_size, monitor=monitor), config)
    monitor.check_cancel()
    weights = class_weight_dict(labels[split.train], n_classes) if config.class_weights else None

    cache_stats, test_prob, val_prob, trust_inputs = None, None, None, None
    if not spec.pretrained:  # trained end to end on images
        backbone = build_backbone(spec, image_size=config.image_size, weights=None)
        head = build_head(backbone.output_shape[-1], n_classes, config, seed=config.seed)
        model = assemble_model(backbone, head, config)
        _fit_images(
            model,
            images,
            labels,
            split,
            config=config,
            preprocess=preprocess,
            n_classes=n_classes,
            epochs=config.epochs,
            learning_rate=config.learning_rate,
            phase=1,
            monitor=monitor,
            class_weight=weights,
            replicas=replicas,
        )
    else:
        extractor, backbone = build_feature_extractor(spec, config)
        cache = FeatureCache.for_config(config, root=feature_cache_dir)
        train_idx = np.repeat(split.train, config.augment.factor)
        train_views = np.tile(np.arange(config.augment.factor), len(split.train))
        common = dict(
            preprocess=preprocess,
            augment=config.augment,
            seed=config.seed,
            cache=cache,
            batch_size=config.batch_size,
            monitor=monitor,
        )
        extracting = time.monotonic()
        train_x = _features_for(extractor, images, md5s, train_idx, train_views, "train views", common)
        val_x = _features_for(extractor, images, md5s, split.val, np.zeros(len(split.val), int), "val", common)
        record_extraction(config, views=cache.misses, seconds=time.monotonic() - extracting, device=device)
        head = fit_head_on_features(
            train_x,
            labels[train_idx],
            val_x,
            labels[split.val],
            n_classes=n_classes,
            config=config,
            callbacks=[monitor.callback(phase=1, epochs=config.epochs)],
            class_weight=weights,
        )
        model = assemble_model(backbone, head, config)
        if config.fine_tune_epochs and config.fine_tune_layers:
            unfreeze_top_layers(backbone, config.fine_tune_layers)
            _fit_images(
                model,
                images,
                labels,
                split,
                config=config,
                preprocess=preprocess,
                n_classes=n_classes,
                epochs=config.fine_tune_epochs,
                learning_rate=config.fine_tune_learning_rate,
                phase=2,
                monitor=monitor,
                class_weight=weights,
                replicas=replicas,
            )
        else:
            # The backbone is still the frozen one: test views come from the feature cache too, so
            # k-fold runs over the same images extract every (image, view) once.
            views = config.tta_views
            test_x = _features_for(
                extractor,
                images,
                md5s,
                np.repeat(split.test, views),
                np.tile(np.arange(views), len(split.test)),
                "test views",
                common,
            )
            test_prob = _mean_over_views(head, test_x, views)
            if views > 1:  # the temperature is fitted on validation answers made as the test's are
                val_views = _features_for(
                    extractor,
                    images,
                    md5s,
                    np.repeat(split.val, views),
                    np.tile(np.arange(views), len(split.val)),
                    "validation views",
                    common,
                )
                val_prob = _mean_over_views(head, val_views, views)
            view_0 = [(split.train, train_x[train_views == 0]), (split.val, val_x), (split.test, test_x[::views])]
            trust_inputs = _pooled_inputs(head, len(paths), view_0)
        cache_stats = {"hits": cache.hits, "misses": cache.misses, "file": str(cache.path)}
    if test_prob is None:
        monitor.announce(f"test-time evaluation ({config.tta_views} views of {len(split.test)} images)")
        test_prob = _answers(model, images, md5s, split.test, config=config, preprocess=preprocess)
        if config.tta_views > 1:  # the temperature is fitted on validation answers made as the test's are
            val_prob = _answers(model, images, md5s, split.val, config=config, preprocess=preprocess)
    scores = evaluate_probabilities(
        labels[split.test], test_prob, class_names=list(scan.class_names), groups=scan.groups[split.test]
    )
    monitor.check_cancel()
    monitor.announce("fitting the OOD gate and the calibration temperature")
    trust, trust_metrics = fit_trust(
        *(trust_inputs or (model, images)),
        labels,
        train=split.train,
        val=split.val,
        test=split.test,
        test_probabilities=test_prob,
        preprocess=_unchanged if trust_inputs else preprocess,
        batch_size=config.batch_size,
        val_probabilities=val_prob,
    )
    monitor.announce("saving the model and its evaluation")
    saved = save_model(model, run_id)
    save_trust(trust, run_id, store=store)
    evaluation = dataclasses.replace(
        scores,
        metrics={
            **scores.metrics,
            **trust_metrics,
            "tta_views": config.tta_views,
            "parameters": int(model.count_params()),
            "model_bytes": os.path.getsize(saved),
            "latency_ms": measure_latency(model, images[split.test[0]], preprocess=preprocess),
        },
    )
    artifacts.record_artifact(store, run_id, kind=artifacts.MODEL_KIND, path=saved)
    store.save_scored_evaluation(
        run_id,
        evaluation,
        name=TEST_EVALUATION,
        data_dir=scan.root,
        paths=paths[split.test],
        y_true=labels[split.test],
        y_prob=test_prob,
    )
    return evaluation, str(saved), cache_stats


def _pooled_inputs(head, n_images: int, view_0: list[tuple[np.ndarray, np.ndarray]]) -> tuple:
    """(model, inputs) for :func:`fit_trust` when the backbone stayed frozen: the run's model from its pooling layer
    on (an identity layer named as the pooling layer, then the head) and every image's cached pooled features of
    view 0 (the untouched image). That is what the whole model computes from the images, without running the
    backbone over them again.

    ``view_0`` pairs the split's rows (train, val, test) with their features, in the same order.
    """
    import keras

    dim = head.input_shape[-1]
    inputs = np.zeros((n_images, dim), dtype=np.float32)
    for rows, features in view_0:
        inputs[rows] = features
    pooled = keras.Input((dim,))
    model = keras.Model(pooled, head(keras.layers.Identity(name=FEATURE_LAYER)(pooled)), name="pooled_to_classes")
    return model, inputs


def _unchanged(x):
    """The identity: cached features need no preprocessing."""
    return x


def _answers(model, images: np.ndarray, md5s: list[str], rows: np.ndarray, *, config: TrainConfig, preprocess):
    """Probabilities of ``images[rows]`` with the run's test-time views, as the test evaluation makes them."""
    return predict_proba(
        model,
        images[rows],
        preprocess=preprocess,
        batch_size=config.batch_size,
        augment=config.augment,
        tta_views=config.tta_views,
        seed=config.seed,
        image_keys=[md5s[i] for i in rows],
    )


def _mean_over_views(head, features: np.ndarray, views: int) -> np.ndarray:
    """Head probabilities of features laid out image by image, ``views`` per image, averaged per image."""
    prob = np.asarray(head.predict(features, batch_size=256, verbose=0), dtype=np.float64)
    return prob.reshape(len(prob) // views, views, -1).mean(axis=1)


def _features_for(extractor, images, md5s, indices, views, description, common) -> np.ndarray:
    """Features of ``images[indices]`` seen as ``views``, reported as the phase "features (``description``)"."""
    monitor: RunMonitor = common["monitor"]
    return extract_features(
        extractor,
        images,
        indices,
        [md5s[i] for i in indices],
        np.asarray(views),
        description=f"features ({description})",
        report=monitor.reporter(),
        on_batch=monitor.check_cancel,
        progress=monitor.progress,
        **{name: value for name, value in common.items() if name != "monitor"},
    )


def _fit_images(
    model,
    images,
    labels,
    split: Split,
    *,
    config: TrainConfig,
    preprocess,
    n_classes: int,
    epochs: int,
    learning_rate: float,
    phase: int,
    monitor: RunMonitor,
    class_weight,
    replicas: int,
) -> None:
    import keras

    compile_model(model, config, learning_rate)
    one_hot = keras.utils.to_categorical(labels, n_classes)
    train_batches = training_batches(
        images[split.train],
        one_hot[split.train],
        preprocess=preprocess,
        augment=config.augment,
        seed=config.seed + phase,
        batch_size=config.batch_size,
        class_weight=class_weight,
        multiple_of=replicas,
    )
    val_batches = training_batches(
        images[split.val],
        one_hot[split.val],
        preprocess=preprocess,
        augment=None,
        seed=0,
        batch_size=config.batch_size,
        multiple_of=replicas,
    )
    model.fit(
        train_batches,
        validation_data=val_batches if len(split.val) else None,
        epochs=epochs,
        verbose=0,
        shuffle=False,  # training_batches shuffles the training images itself
        callbacks=[early_stopping(config), monitor.callback(phase=phase, epochs=epochs)],
    )


def save_model(model, run_id: int) -> Path:
    """Save the model as ``<artifacts>/run-<id>/model.keras``, whole or not at all (WriteError, e.g. a full disk)."""
    path = artifacts.model_path(run_id)
    try:
        with atomic_path(path, suffix=".keras") as tmp:  # Keras wants the .keras suffix
            model.save(tmp)
    except OSError as exc:
        raise WriteError(f"cannot save the model of run {run_id} to {path}: {exc.strerror or exc}") from exc
    return path
