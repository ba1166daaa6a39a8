"""One student's head training on a class pack: a bounded job, one epoch per step, with a typed result.

:class:`HeadTraining` fits the classification head (:func:`~bcd_engine.models.head.build_head`, compiled as
Train compiles it) on a pack's cached features, one epoch per step of a :data:`~bcd_engine.inference.service.Steps`
generator, so that :func:`class_queue` (an :class:`~bcd_engine.inference.service.InferenceQueue` with class
limits) takes the students in turn, an epoch each. Its per-epoch scores grow in :attr:`HeadTraining.history`
while it runs (for live curves); it stops at ``epochs``, when validation loss has not improved for ``patience``
epochs (early stopping, as in Train) or once its own compute passes :data:`MAX_SECONDS`, keeps the best
epoch's weights, and ends with a :class:`ClassResult`. Nothing is written anywhere.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import confusion_matrix

from bcd_engine.classroom.pack import ClassPack
from bcd_engine.errors import ConfigError
from bcd_engine.evaluation.confidence import bootstrap_ci
from bcd_engine.inference.service import InferenceQueue, Steps
from bcd_engine.models.config import AugmentConfig, TrainConfig
from bcd_engine.models.head import build_head, compile_model

MAX_EPOCHS = 40  # epochs one training may ask for
MAX_SECONDS = 30.0  # compute one training may use (checked after each epoch; the wait in the queue is not counted)
MAX_CLASS_JOBS = 12  # trainings waiting or running, all sessions together
JOBS_PER_SESSION = 1  # trainings one session may have waiting or running
HEAD_SIZES = (0, 32, 64, 128, 256, 512)  # units of the head's dense layer (0: softmax on the features directly)
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
PATIENCE = 6  # epochs without a better validation loss before training stops (Train's default)
BATCH_SIZE = 64
BOOTSTRAP_RESAMPLES = 200  # of the test accuracy's interval: a fifth of the store's 1,000, to answer in a second


@dataclass(frozen=True)
class HeadSettings:
    """What a student chooses: augmented views per training image, head size, epochs, learning rate."""

    views: int = 1
    dense_units: int = 128
    epochs: int = 20
    learning_rate: float = 1e-3

    def check(self, *, max_views: int) -> None:
        """ConfigError naming the first setting outside the class bounds or the ``max_views`` that the pack holds."""
        if not 1 <= self.views <= max_views:
            raise ConfigError(f"views must be between 1 and {max_views} (what the pack holds), got {self.views}")
        if self.dense_units not in HEAD_SIZES:
            raise ConfigError(f"head size must be one of {HEAD_SIZES}, got {self.dense_units}")
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise ConfigError(f"epochs must be between 1 and {MAX_EPOCHS}, got {self.epochs}")
        if not LEARNING_RATES[0] <= self.learning_rate <= LEARNING_RATES[-1]:
            raise ConfigError(
                f"learning rate must be between {LEARNING_RATES[0]} and {LEARNING_RATES[-1]}, got {self.learning_rate}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EpochScores:
    """Loss and accuracy of one epoch, on the training rows (all views) and on the validation images."""

    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ClassResult:
    """A finished head training: its curves, its test figures on the pack's split, and how it ended.

    ``stopped`` says why training ended ('all epochs', 'early stopping', 'time limit'); ``best_epoch`` is the
    epoch whose weights were kept (lowest validation loss) and scored on the test images. ``seconds`` is the
    compute the training used (its steps; not its wait in the queue).
    """

    pack: str
    dataset: str
    fingerprint: str  # of the dataset's images and labels (the store's runs on them carry the same)
    split_seed: int
    val_fraction: float
    test_fraction: float
    backbone: str
    weights: str
    settings: HeadSettings
    class_names: tuple[str, ...]
    history: tuple[EpochScores, ...]
    best_epoch: int
    stopped: str
    test_accuracy: float
    accuracy_interval: tuple[float, float]  # 95% bootstrap interval, duplicate groups resampled whole
    confusion_matrix: tuple[tuple[int, ...], ...]  # rows: true class, columns: predicted class
    n_train_rows: int
    n_val: int
    n_test: int
    seconds: float
    protocol: str

    def to_dict(self) -> dict:
        data = asdict(self)
        data["settings"] = self.settings.to_dict()
        data["history"] = [epoch.to_dict() for epoch in self.history]
        return data


class TrainingJob:
    """A head training with ``settings`` (checked against ``max_views``: ConfigError) whose :attr:`history` (a
    copy, safe to read from another thread) grows an epoch at a time while :meth:`steps` runs in the queue."""

    def __init__(self, settings: HeadSettings, *, max_views: int, max_seconds: float) -> None:
        settings.check(max_views=max_views)
        self.settings = settings
        self.max_seconds = max_seconds
        self._history: list[EpochScores] = []
        self._lock = threading.Lock()

    @property
    def history(self) -> list[EpochScores]:
        with self._lock:
            return list(self._history)

    def _record(self, epochs: list[EpochScores]) -> int:
        """Add ``epochs`` to the history; returns the number of epochs recorded so far."""
        with self._lock:
            self._history.extend(epochs)
            return len(self._history)


class HeadTraining(TrainingJob):
    """One bounded head training on ``pack`` with ``settings``, in this process. :meth:`steps` is the job."""

    def __init__(self, pack: ClassPack, settings: HeadSettings, *, max_seconds: float = MAX_SECONDS) -> None:
        super().__init__(settings, max_views=pack.views, max_seconds=max_seconds)
        self.pack = pack

    def steps(self) -> Steps:
        """Build the head, then train it one epoch per step (yielding (epoch, epochs)); returns a ClassResult."""
        import keras  # imported before the clock starts: the server's first import is not the student's compute

        pack, chosen = self.pack, self.settings
        config = TrainConfig(
            backbone=pack.backbone,
            image_size=pack.image_size,
            batch_size=BATCH_SIZE,
            epochs=chosen.epochs,
            learning_rate=chosen.learning_rate,
            dense_units=chosen.dense_units,
            augment=AugmentConfig(factor=chosen.views),
            patience=PATIENCE,
            seed=pack.seed,
        )
        spent = 0.0
        started = time.perf_counter()
        train_x, train_y = pack.training_data(chosen.views)
        val_x, val_y = pack.subset("val")
        n_classes = len(pack.class_names)
        head = build_head(pack.n_features, n_classes, config, seed=config.seed)
        compile_model(head, config, config.learning_rate)
        train_hot = keras.utils.to_categorical(train_y, n_classes)
        val_hot = keras.utils.to_categorical(val_y, n_classes)
        order = np.random.default_rng(config.seed)  # the order of the training rows, drawn here: nothing global
        best_loss, best_epoch, best_weights, stopped = np.inf, 0, None, "all epochs"
        for epoch in range(1, chosen.epochs + 1):
            point = _one_epoch(
                head, epoch, train_x, train_hot, val_x, val_hot, order=order, batch_size=config.batch_size
            )
            self._record([point])
            if point.val_loss < best_loss:
                best_loss, best_epoch, best_weights = point.val_loss, epoch, head.get_weights()
            spent += time.perf_counter() - started
            if epoch == chosen.epochs:
                break
            if epoch - best_epoch >= config.patience:
                stopped = f"early stopping (no better validation loss for {config.patience} epochs)"
                break
            if spent >= self.max_seconds:
                stopped = f"time limit ({self.max_seconds:.0f} s of compute)"
                break
            yield epoch, chosen.epochs
            started = time.perf_counter()  # the wait for the next turn is not this job's compute
        if best_weights is not None:
            head.set_weights(best_weights)
        test_x, test_y = pack.subset("test")
        probabilities = np.asarray(head.predict(test_x, batch_size=256, verbose=0), dtype=np.float64)
        predicted = probabilities.argmax(axis=1)
        counts = confusion_matrix(test_y, predicted, labels=np.arange(n_classes))
        interval = bootstrap_ci(
            test_y,
            probabilities,
            metric="accuracy",
            groups=pack.groups[pack.split.test],
            n_resamples=BOOTSTRAP_RESAMPLES,
        )
        spent += time.perf_counter() - started
        return ClassResult(
            pack=pack.name,
            dataset=pack.dataset.name,
            fingerprint=pack.dataset.fingerprint,
            split_seed=pack.seed,
            val_fraction=pack.split.val_fraction,
            test_fraction=pack.split.test_fraction,
            backbone=pack.backbone,
            weights=pack.weights_label,
            settings=chosen,
            class_names=pack.class_names,
            history=tuple(self.history),
            best_epoch=best_epoch,
            stopped=stopped,
            test_accuracy=float(interval["estimate"]),
            accuracy_interval=(float(interval["low"]), float(interval["high"])),
            confusion_matrix=tuple(tuple(int(v) for v in row) for row in counts),
            n_train_rows=len(train_x),
            n_val=len(val_x),
            n_test=len(test_x),
            seconds=spent,
            protocol=pack.protocol,
        )


def _one_epoch(head, epoch: int, train_x, train_hot, val_x, val_hot, *, order, batch_size: int) -> EpochScores:
    """One pass over the training rows in a new order, batch by batch (``fit`` costs a few tenths of a second more
    per call, which a one-epoch step would pay every time), then the validation images in one batch."""
    shuffled = order.permutation(len(train_x))
    totals, rows = np.zeros(2), 0
    for start in range(0, len(shuffled), batch_size):
        batch = shuffled[start : start + batch_size]
        loss, accuracy = head.train_on_batch(train_x[batch], train_hot[batch])
        totals += np.array([loss, accuracy]) * len(batch)
        rows += len(batch)
    val_loss, val_accuracy = head.test_on_batch(val_x, val_hot)
    loss, accuracy = totals / rows
    return EpochScores(epoch, float(loss), float(accuracy), float(val_loss), float(val_accuracy))


_queue: InferenceQueue | None = None
_queue_lock = threading.Lock()


def class_queue() -> InferenceQueue:
    """The process's one queue of class trainings: at most :data:`MAX_CLASS_JOBS` waiting or running, at most
    :data:`JOBS_PER_SESSION` per session, the sessions taken in turn, an epoch each (see
    :class:`~bcd_engine.inference.service.InferenceQueue`). Made on first use and kept for the life of the process."""
    global _queue
    with _queue_lock:
        if _queue is None:
            _queue = InferenceQueue(max_jobs=MAX_CLASS_JOBS, max_jobs_per_visitor=JOBS_PER_SESSION)
        return _queue
