"""Fine-tuning a backbone on a folder of class subfolders, end to end: scan, split, train, evaluate, store.

Phase 1 trains the classification head on cached frozen-backbone features (see ``features``); phase 2
(optional) unfreezes the top K backbone layers and trains on images at a lower learning rate, with
BatchNorm kept in inference mode. The scratch CNN trains end to end on images.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import settings
from .augment import augment_image, view_seeds
from .backbones import build_backbone, get_backbone
from .colour import apply_colour_mode
from .config import AugmentConfig, TrainConfig
from .datasets import ScanResult, load_image, scan_dataset
from .errors import BCDError, CancelledError, ConfigError
from .evaluation import Evaluation, evaluate_probabilities
from .features import (
    FeatureCache,
    build_feature_extractor,
    extract_features,
    file_sha256,
)
from .progress import progress_bar
from .splits import Split, holdout_split
from .store import RunStore

PROTOCOL_HOLDOUT = "holdout (group-aware, stratified)"
CANCEL_POLL_SECONDS = 1.0
HEARTBEAT_SECONDS = 30.0

log = logging.getLogger("bcd.training")


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
    seconds: float
    model_path: str | None
    feature_cache: dict | None = None  # hits, misses and file of the frozen-feature cache (pretrained backbones)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def configure_device() -> dict:
    """Use the GPU with mixed precision when there is one, all CPU cores otherwise; describe the device."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        for gpu in gpus:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # already initialised in this process
                pass
        keras.mixed_precision.set_global_policy("mixed_float16")
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
        device = f"GPU: {name} x{len(gpus)}"
    else:
        keras.mixed_precision.set_global_policy("float32")
        device = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {
        "device": device,
        "mixed_precision": bool(gpus),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def load_images(paths, *, image_size: int, progress: bool = False, description: str = "loading") -> np.ndarray:
    """Decode and resize images into one uint8 array (n, size, size, 3), using all cores."""
    from concurrent.futures import ThreadPoolExecutor

    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    with progress_bar(len(paths), description, enabled=progress) as bar, ThreadPoolExecutor(os.cpu_count()) as pool:
        for i, image in enumerate(pool.map(lambda p: load_image(p, image_size=image_size), paths)):
            out[i] = image
            bar.update(1)
    return out


@contextlib.contextmanager
def _heartbeat(store: RunStore, run_id: int):
    """Refresh the run's heartbeat in the store every HEARTBEAT_SECONDS from a thread while the block runs,
    so no phase (loading, extraction, evaluation, saving) makes a live run look dead to other processes."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                store.heartbeat(run_id)
            except BCDError as exc:  # a busy database costs one beat, not the run
                log.warning("heartbeat of run %s failed: %s", run_id, exc)

    thread = threading.Thread(target=beat, name=f"bcd-heartbeat-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class _RunMonitor:
    """Keras callback glue: logs epochs to the store, polls the cancel flag, drives a progress bar."""

    def __init__(self, store: RunStore, run_id: int, *, progress: bool):
        self.store, self.run_id, self.progress = store, run_id, progress
        self._last_poll = 0.0

    def check_cancel(self) -> None:
        """Raise CancelledError when the run's cancel flag is set (the store is asked at most once a second)."""
        now = time.monotonic()
        if now - self._last_poll >= CANCEL_POLL_SECONDS:
            self._last_poll = now
            if self.store.is_cancel_requested(self.run_id):
                raise CancelledError(f"run {self.run_id} was cancelled")

    def callback(self, *, phase: int, epochs: int):
        import keras

        monitor = self

        class StoreCallback(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.cancelled = False
                self.bar = progress_bar(epochs, f"phase {phase} epochs", enabled=monitor.progress, unit="epoch")
                self.started = time.monotonic()

            def on_train_batch_end(self, batch, logs=None):
                try:
                    monitor.check_cancel()
                except CancelledError:
                    self.cancelled = True
                    self.model.stop_training = True

            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                lr = self.model.optimizer.learning_rate
                monitor.store.log_epoch(
                    monitor.run_id, phase=phase, epoch=epoch + 1,
                    train_loss=float(logs["loss"]), train_accuracy=float(logs["accuracy"]),
                    val_loss=_maybe_float(logs.get("val_loss")), val_accuracy=_maybe_float(logs.get("val_accuracy")),
                    learning_rate=float(np.asarray(lr)), seconds=time.monotonic() - self.started,
                )
                self.started = time.monotonic()
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", val_acc=f"{logs.get('val_accuracy', 0):.3f}")
                self.bar.update(1)

            def on_train_end(self, logs=None):
                self.bar.close()
                if self.cancelled:
                    raise CancelledError(f"run {monitor.run_id} was cancelled")

        return StoreCallback()


def _maybe_float(value):
    return None if value is None else float(value)


def build_head(n_features: int, n_classes: int, config: TrainConfig):
    """The classification head on pooled features: [dense + dropout] then softmax (float32 output)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(config.seed)
    inputs = keras.Input((n_features,))
    x = inputs
    if config.dense_units:
        x = layers.Dense(config.dense_units, activation=config.dense_activation, name="head_dense")(x)
    if config.dropout:
        x = layers.Dropout(config.dropout, seed=config.seed, name="head_dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name="head")


def make_optimizer(name: str, learning_rate: float):
    import keras

    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    return keras.optimizers.Adam(learning_rate)


def compile_model(model, config: TrainConfig, learning_rate: float) -> None:
    import keras

    model.compile(
        optimizer=make_optimizer(config.optimizer, learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )


def class_weight_dict(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """Balanced class weights (scikit-learn's formula) for the training labels."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    out = {k: 1.0 for k in range(n_classes)}
    out.update({int(k): float(w) for k, w in zip(present, weights)})
    return out


def fit_head_on_features(
    train_x, train_y, val_x, val_y, *, n_classes: int, config: TrainConfig, callbacks=(), class_weight=None
):
    """Phase 1 on cached features: returns the trained head (best validation-loss weights restored)."""
    import keras
    import tensorflow as tf

    head = build_head(train_x.shape[1], n_classes, config)
    compile_model(head, config, config.learning_rate)
    one_hot = lambda y: keras.utils.to_categorical(y, n_classes)  # noqa: E731
    train_ds = (
        tf.data.Dataset.from_tensor_slices((train_x, one_hot(train_y)))
        .shuffle(len(train_x), seed=config.seed, reshuffle_each_iteration=True)
        .batch(config.batch_size)
    )
    head.fit(
        train_ds,
        validation_data=(val_x, one_hot(val_y)) if len(val_x) else None,
        epochs=config.epochs,
        callbacks=[_early_stopping(config), *callbacks],
        class_weight=class_weight,
        verbose=0,
    )
    return head


def _early_stopping(config: TrainConfig):
    import keras

    return keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True)


def assemble_model(backbone, head, config: TrainConfig):
    """Backbone (BatchNorm in inference mode) + pooling + head as one Keras model on preprocessed images."""
    import keras

    pool = keras.layers.GlobalAveragePooling2D if config.pooling == "avg" else keras.layers.GlobalMaxPooling2D
    inputs = keras.Input((config.image_size, config.image_size, 3), name="image")
    # A pretrained backbone keeps BatchNorm in inference mode, also when its top layers are unfrozen;
    # the scratch CNN learns its BatchNorm statistics like any network trained from scratch.
    x = backbone(inputs) if config.is_scratch else backbone(inputs, training=False)
    x = pool(name="pool", dtype="float32")(x)
    return keras.Model(inputs, head(x), name=f"bcd_{config.backbone}")


def image_dataset(images, labels, keys_seed, *, config: TrainConfig, preprocess, n_classes: int, train: bool):
    """tf.data pipeline over in-memory uint8 images; training batches get a fresh augmented view each epoch."""
    import keras
    import tensorflow as tf

    one_hot = keras.utils.to_categorical(labels, n_classes)
    ds = tf.data.Dataset.from_tensor_slices((images, one_hot))
    if train:
        ds = ds.shuffle(len(images), seed=config.seed, reshuffle_each_iteration=True)
        seeds = tf.data.Dataset.random(seed=keys_seed).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda pair, seed: (augment_image(tf.cast(pair[0], tf.float32), tf.cast(seed % 2**31, tf.int32),
                                              config.augment), pair[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    else:
        ds = ds.map(lambda image, y: (tf.cast(image, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(lambda image, y: (preprocess(image), y)).batch(config.batch_size).prefetch(tf.data.AUTOTUNE)


def predict_proba(model, images: np.ndarray, *, preprocess, batch_size: int = 32, augment: AugmentConfig | None = None,
                  tta_views: int = 1, seed: int = 0, image_keys: list[str] | None = None,
                  progress: bool = False) -> np.ndarray:
    """Class probabilities for uint8 images (n, size, size, 3).

    With ``tta_views`` > 1 (test-time augmentation) the probabilities are averaged over the image
    itself and ``tta_views - 1`` views made by the training augmentation ``augment``. With
    ``image_keys`` (the images' md5 digests) view v of an image is the same transform that training
    and its test evaluation used (so a stored evaluation can be reproduced); without them view v is
    one fixed transform for every image.
    """
    import tensorflow as tf

    keys = image_keys if image_keys is not None else ["0" * 8] * len(images)
    # One dataset of (image, row) for every view: the images are put into the graph once.
    base = tf.data.Dataset.from_tensor_slices((images, np.arange(len(images))))
    total = 0.0
    with progress_bar(tta_views * len(images), "predicting", enabled=progress) as bar:
        for view in range(tta_views):
            if view:
                seeds = tf.constant(view_seeds(keys, np.full(len(images), view), seed=seed))
                ds = base.map(lambda x, row, s=seeds: augment_image(tf.cast(x, tf.float32), tf.gather(s, row), augment),
                              num_parallel_calls=tf.data.AUTOTUNE)
            else:
                ds = base.map(lambda x, row: tf.cast(x, tf.float32))
            ds = ds.map(preprocess).batch(batch_size).prefetch(tf.data.AUTOTUNE)
            total = total + np.asarray(model.predict(ds, verbose=0), dtype=np.float64)
            bar.update(len(images))
    return total / tta_views


def measure_latency(model, image: np.ndarray, *, preprocess, repeats: int = 10) -> float:
    """Mean warm single-image inference latency in milliseconds."""
    import tensorflow as tf

    x = preprocess(tf.cast(image[None], tf.float32))
    infer = tf.function(lambda t: model(t, training=False))
    infer(x)
    started = time.perf_counter()
    for _ in range(repeats):
        np.asarray(infer(x))
    return (time.perf_counter() - started) / repeats * 1000


def train(
    config: TrainConfig,
    data_dir: str | os.PathLike,
    *,
    store: RunStore | None = None,
    run_id: int | None = None,
    progress: bool = False,
    feature_cache_dir: Path | None = None,
    split: Split | None = None,
    scan: ScanResult | None = None,
    protocol: str = PROTOCOL_HOLDOUT,
) -> TrainResult:
    """Train ``config`` on ``data_dir`` and store the run, its split, epochs, evaluation and model.

    The split is the config's group-aware hold-out split unless ``split`` is given (cross-validation
    folds, with the ``scan`` of ``data_dir`` it indexes), and the run is labelled with ``protocol``.
    With ``run_id`` the (already claimed) run is used; otherwise a new one is created. Bad input raises
    a ``BCDError`` before anything is written. A failure or cancellation during training leaves the
    run ``failed`` or ``cancelled`` with its epochs so far.
    """
    started = time.monotonic()
    store = store or RunStore()
    if scan is None:
        scan = scan_dataset(data_dir, progress=progress)
    elif Path(scan.root) != Path(data_dir).expanduser().resolve():
        raise ConfigError(f"the scan given is of {scan.root}, not of {Path(data_dir).expanduser().resolve()}")
    root = Path(scan.root)  # resolved, ``~`` expanded
    if split is None:
        split = holdout_split(scan.labels, scan.groups, val_fraction=config.val_fraction,
                              test_fraction=config.test_fraction, seed=config.seed)
    run_config = {"train": config.to_dict(), "data_dir": str(root), "class_names": list(scan.class_names)}
    dataset_id = store.register_dataset(name=root.name, root=str(root), n_images=scan.n_images,
                                        class_counts=scan.class_counts)
    if run_id is None:
        run_id = store.create_run(backbone=config.backbone, protocol=protocol, config=run_config,
                                  dataset_id=dataset_id, status="running")
    else:
        store.update_run_config(run_id, {**store.get_run(run_id).config, **run_config})
    environment = configure_device()
    store.start_run(run_id, environment=environment)
    store.save_split(run_id, split.assignments(scan))
    try:
        with _heartbeat(store, run_id):
            evaluation, model_path, cache_stats = _train_and_evaluate(
                config, scan, split, store=store, run_id=run_id, progress=progress,
                feature_cache_dir=feature_cache_dir)
    except CancelledError:
        store.finish_run(run_id, status="cancelled", error="cancelled by user")
        return _result(run_id, "cancelled", config, split, None, started, None, protocol=protocol)
    except BaseException as exc:
        message = str(exc) if isinstance(exc, BCDError) else f"{type(exc).__name__}: {exc}"
        store.finish_run(run_id, status="failed", error=message)
        raise
    store.finish_run(run_id, status="completed", test_accuracy=evaluation.accuracy, macro_auc=evaluation.macro_auc)
    return _result(run_id, "completed", config, split, evaluation, started, model_path, cache_stats, protocol=protocol)


def _result(run_id, status, config, split, evaluation: Evaluation | None, started, model_path,
            cache_stats=None, *, protocol: str) -> TrainResult:
    return TrainResult(
        run_id=run_id, status=status, backbone=config.backbone, protocol=protocol,
        n_train=len(split.train), n_val=len(split.val), n_test=len(split.test),
        test_accuracy=None if evaluation is None else evaluation.accuracy,
        macro_auc=None if evaluation is None else evaluation.macro_auc,
        seconds=round(time.monotonic() - started, 2), model_path=model_path, feature_cache=cache_stats,
    )


def _train_and_evaluate(config: TrainConfig, scan: ScanResult, split: Split, *, store: RunStore, run_id: int,
                        progress: bool, feature_cache_dir: Path | None):
    import keras

    spec = get_backbone(config.backbone)
    preprocess = spec.preprocess()
    monitor = _RunMonitor(store, run_id, progress=progress)
    n_classes = len(scan.class_names)
    paths, labels = np.array(scan.paths), scan.labels
    md5s = [record.md5 for record in scan.images]
    images = apply_colour_mode(load_images(list(paths), image_size=config.image_size, progress=progress),
                               config.colour)
    monitor.check_cancel()
    weights = class_weight_dict(labels[split.train], n_classes) if config.class_weights else None
    keras.utils.set_random_seed(config.seed)

    cache_stats, test_prob = None, None
    if config.is_scratch:
        backbone = build_backbone(spec, image_size=config.image_size, weights=None)
        head = build_head(backbone.output_shape[-1], n_classes, config)
        model = assemble_model(backbone, head, config)
        _fit_images(model, images, labels, split, config=config, preprocess=preprocess, n_classes=n_classes,
                    epochs=config.epochs, learning_rate=config.learning_rate, phase=1, monitor=monitor,
                    class_weight=weights)
    else:
        extractor, backbone = build_feature_extractor(spec, config)
        cache = FeatureCache.for_config(config, root=feature_cache_dir)
        train_idx = np.repeat(split.train, config.augment.factor)
        train_views = np.tile(np.arange(config.augment.factor), len(split.train))
        common = dict(preprocess=preprocess, augment=config.augment, seed=config.seed, cache=cache,
                      batch_size=config.batch_size, progress=progress, on_batch=monitor.check_cancel)
        train_x = _features_for(extractor, images, md5s, train_idx, train_views, "train views", common)
        val_x = _features_for(extractor, images, md5s, split.val, np.zeros(len(split.val), int), "val", common)
        head = fit_head_on_features(
            train_x, labels[train_idx], val_x, labels[split.val], n_classes=n_classes, config=config,
            callbacks=[monitor.callback(phase=1, epochs=config.epochs)], class_weight=weights,
        )
        model = assemble_model(backbone, head, config)
        if config.fine_tune_epochs and config.fine_tune_layers:
            unfreeze_top_layers(backbone, config.fine_tune_layers)
            _fit_images(model, images, labels, split, config=config, preprocess=preprocess, n_classes=n_classes,
                        epochs=config.fine_tune_epochs, learning_rate=config.fine_tune_learning_rate, phase=2,
                        monitor=monitor, class_weight=weights)
        else:
            # The backbone is still the frozen one: test views come from the feature cache too, so
            # k-fold runs over the same images extract every (image, view) once.
            views = config.tta_views
            test_x = _features_for(extractor, images, md5s, np.repeat(split.test, views),
                                   np.tile(np.arange(views), len(split.test)), "test views", common)
            test_prob = _mean_over_views(head, test_x, views)
        cache_stats = {"hits": cache.hits, "misses": cache.misses, "file": str(cache.path)}
    if test_prob is None:
        test_prob = predict_proba(model, images[split.test], preprocess=preprocess, batch_size=config.batch_size,
                                  augment=config.augment, tta_views=config.tta_views, seed=config.seed,
                                  image_keys=[md5s[i] for i in split.test])
    evaluation = evaluate_probabilities(labels[split.test], test_prob, class_names=list(scan.class_names),
                                        groups=scan.groups[split.test])
    model_path = save_model(model, run_id)
    evaluation.metrics.update(
        tta_views=config.tta_views,
        parameters=int(model.count_params()),
        model_bytes=os.path.getsize(model_path),
        latency_ms=measure_latency(model, images[split.test[0]], preprocess=preprocess),
    )
    # Stored relative to the artifacts folder, so a results.db shipped with its artifacts/ works anywhere.
    store.save_artifact(run_id, kind="model", path=model_path.relative_to(settings.artifacts_dir()).as_posix(),
                        sha256=file_sha256(model_path),
                        size_bytes=os.path.getsize(model_path))
    store.save_evaluation(
        run_id, name="test", data_dir=str(scan.root), metrics=evaluation.metrics,
        class_names=evaluation.class_names, confusion_matrix=evaluation.confusion_matrix, roc=evaluation.roc,
        predictions=[
            {"path": str(paths[i]), "true_class": scan.class_names[labels[i]],
             "predicted_class": scan.class_names[int(pred)], "probabilities": prob.tolist()}
            for i, pred, prob in zip(split.test, evaluation.predicted, test_prob)
        ],
    )
    return evaluation, str(model_path), cache_stats


def _mean_over_views(head, features: np.ndarray, views: int) -> np.ndarray:
    """Head probabilities of features laid out image by image, ``views`` per image, averaged per image."""
    prob = np.asarray(head.predict(features, batch_size=256, verbose=0), dtype=np.float64)
    return prob.reshape(len(prob) // views, views, -1).mean(axis=1)


def _features_for(extractor, images, md5s, indices, views, description, common) -> np.ndarray:
    return extract_features(extractor, images, indices, [md5s[i] for i in indices], np.asarray(views),
                            description=f"features ({description})", **common)


def unfreeze_top_layers(backbone, k: int) -> None:
    """Make the top ``k`` layers trainable, BatchNorm excepted (it stays frozen in inference mode)."""
    import keras

    backbone.trainable = True
    for i, layer in enumerate(backbone.layers):
        top = i >= len(backbone.layers) - k
        layer.trainable = top and not isinstance(layer, keras.layers.BatchNormalization)


def _fit_images(model, images, labels, split: Split, *, config: TrainConfig, preprocess, n_classes: int,
                epochs: int, learning_rate: float, phase: int, monitor: _RunMonitor, class_weight) -> None:
    compile_model(model, config, learning_rate)
    train_ds = image_dataset(images[split.train], labels[split.train], config.seed + phase, config=config,
                             preprocess=preprocess, n_classes=n_classes, train=True)
    val_ds = image_dataset(images[split.val], labels[split.val], 0, config=config, preprocess=preprocess,
                           n_classes=n_classes, train=False)
    model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=0, class_weight=class_weight,
              callbacks=[_early_stopping(config), monitor.callback(phase=phase, epochs=epochs)])


def save_model(model, run_id: int) -> Path:
    """Save the model as ``<artifacts>/run-<id>/model.keras``."""
    folder = settings.artifacts_dir() / f"run-{int(run_id)}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.keras"
    model.save(path)
    return path
