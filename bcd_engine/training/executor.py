"""Where the runs of a protocol (k-fold folds, LODO rounds) train: here one after another, or elsewhere.

A protocol hands its per-run work to an executor's ``map(work, items, store=store)``, which returns
``[work(store, item) for item in items]`` in order. :class:`LocalExecutor` is that loop; the Ray executor
(:mod:`bcd_engine.training.ray_executor`) runs the calls as parallel tasks, each on a store of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from bcd_engine.store import RunStore

Item = TypeVar("Item")
Result = TypeVar("Result")


class Executor(Protocol):
    """Runs ``work(store, item)`` for each item; results in the items' order."""

    def map(
        self, work: Callable[[RunStore, Item], Result], items: Sequence[Item], *, store: RunStore
    ) -> list[Result]: ...


class LocalExecutor:
    """Each item in this process, one after another, on the caller's store."""

    def map(self, work: Callable[[RunStore, Item], Result], items: Sequence[Item], *, store: RunStore) -> list[Result]:
        """``[work(store, item) for item in items]``."""
        return [work(store, item) for item in items]
