"""Watching a training run: the store heartbeat, cancellation, each phase's progress (to the store and the log),
and the Keras callback that logs epochs."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import numpy as np

from bcd_engine.errors import BCDError, CancelledError
from bcd_engine.progress import Phase, PhaseProgress, Reporter, describe
from bcd_engine.store import RunStore

CANCEL_POLL_SECONDS = 1.0
HEARTBEAT_SECONDS = 30.0
PROGRESS_SECONDS = 2.0  # a phase's progress is written to the store at most this often (and at its start and end)
LOG_STEPS = 10  # a counted phase writes a log line each tenth of the way

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
    """Watches one run: reports its phases (store, log, bar), polls the cancel flag, logs epochs (Keras callback)."""

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

    def phase(self, name: str, total: int = 0, *, unit: str = "img", log_each_step: bool = False) -> Phase:
        """A phase of the run (``with monitor.phase("loading images", n) as phase: ... phase.advance(k)``): a bar
        when the run shows progress, the store's progress columns (:meth:`RunStore.set_progress`) and log lines on
        ``bcd.training`` at its start, each tenth (each step with ``log_each_step``) and its end. ``total`` 0 is a
        phase that is not counted."""
        return Phase(name, total, unit=unit, bar=self.progress, report=self.reporter(log_each_step=log_each_step))

    def announce(self, name: str) -> None:
        """Report the start of a phase that is not counted (fitting, saving): the store and one log line."""
        self.reporter()(PhaseProgress(name, 0, 0, "", 0.0))

    def reporter(self, *, log_each_step: bool = False) -> Reporter:
        """What :meth:`phase` hands its progress to: store writes at most every PROGRESS_SECONDS, and log lines."""
        started_at = datetime.now(UTC)
        state = {"written": -PROGRESS_SECONDS, "logged": -1}

        def report(update: PhaseProgress) -> None:
            now = time.monotonic()
            finished = update.total and update.done >= update.total
            if update.done == 0 or finished or now - state["written"] >= PROGRESS_SECONDS:
                state["written"] = now
                try:
                    self.store.set_progress(
                        self.run_id,
                        phase=update.phase,
                        done=update.done,
                        total=update.total,
                        unit=update.unit,
                        started_at=started_at,
                    )
                except BCDError as exc:  # a busy database costs one report, not the run
                    log.warning("progress of run %s not saved: %s", self.run_id, exc)
            step = update.done if log_each_step or not update.total else update.done * LOG_STEPS // update.total
            if step > state["logged"]:
                state["logged"] = step
                log.info("run %s: %s", self.run_id, describe(update))

        return report

    def callback(self, *, phase: int, epochs: int):
        import keras

        monitor = self

        class StoreCallback(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.cancelled = False
                name = f"phase {phase} epochs" if phase == 1 else f"phase {phase} (fine-tuning) epochs"
                self.phase = monitor.phase(name, epochs, unit="epoch", log_each_step=True).__enter__()
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
                self.phase.set_postfix(loss=f"{logs['loss']:.3f}", val_acc=f"{logs.get('val_accuracy', 0):.3f}")
                self.phase.advance(1)

            def on_train_end(self, logs=None):
                self.phase.__exit__(None, None, None)
                if self.cancelled:
                    raise CancelledError(f"run {monitor.run_id} was cancelled")

        return StoreCallback()


def _maybe_float(value):
    return None if value is None else float(value)
