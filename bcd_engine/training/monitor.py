"""Watching a training run: the store heartbeat, cancellation, and the Keras callback that logs epochs."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from bcd_engine.errors import BCDError, CancelledError
from bcd_engine.progress import progress_bar
from bcd_engine.store import RunStore

CANCEL_POLL_SECONDS = 1.0
HEARTBEAT_SECONDS = 30.0

log = logging.getLogger("bcd.training")


@contextlib.contextmanager
def repeating(action: Callable[[], None], *, every_s: float, name: str) -> Iterator[None]:
    """Call ``action`` every ``every_s`` seconds from a daemon thread while the block runs (not at its start)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            action()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def heartbeat(store: RunStore, run_id: int) -> Iterator[None]:
    """Refresh the run's heartbeat in the store every HEARTBEAT_SECONDS from a thread while the block runs,
    so no phase (loading, extraction, evaluation, saving) makes a live run look dead to other processes."""

    def beat() -> None:
        try:
            store.heartbeat(run_id)
        except BCDError as exc:  # a busy database costs one beat, not the run
            log.warning("heartbeat of run %s failed: %s", run_id, exc)

    with repeating(beat, every_s=HEARTBEAT_SECONDS, name=f"bcd-heartbeat-{run_id}"):
        yield


class RunMonitor:
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
                    monitor.run_id,
                    phase=phase,
                    epoch=epoch + 1,
                    train_loss=float(logs["loss"]),
                    train_accuracy=float(logs["accuracy"]),
                    val_loss=_maybe_float(logs.get("val_loss")),
                    val_accuracy=_maybe_float(logs.get("val_accuracy")),
                    learning_rate=float(np.asarray(lr)),
                    seconds=time.monotonic() - self.started,
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
