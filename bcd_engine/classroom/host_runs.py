"""The host's runs that a class result stands beside: the store's completed runs on the pack's dataset, read-only."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from bcd_engine.classroom.session import ClassResult
from bcd_engine.store import RunStore


@dataclass(frozen=True)
class HostRun:
    """One completed run of the store on the same images as a class result (matched by the dataset's fingerprint)."""

    run_id: int
    backbone: str
    protocol: str
    test_accuracy: float | None
    same_split: bool  # trained with the pack's seed and fractions, so tested on the same images

    def to_dict(self) -> dict:
        return asdict(self)


def host_runs(store: RunStore, result: ClassResult) -> list[HostRun]:
    """The store's completed runs trained on the dataset of ``result``'s pack, best test accuracy first (reads only).

    ``same_split``: a hold-out run with the pack's seed and fractions, so tested on the same images."""
    found = []
    for run in store.list_runs(status="completed"):
        if run.config.get("dataset", {}).get("fingerprint") != result.fingerprint:
            continue
        train = run.config.get("train", {})
        same_split = run.protocol.kind == "holdout" and (
            train.get("seed"),
            train.get("val_fraction"),
            train.get("test_fraction"),
        ) == (result.split_seed, result.val_fraction, result.test_fraction)
        found.append(HostRun(run.id, run.backbone, run.protocol.label, run.test_accuracy, same_split))
    return sorted(found, key=lambda run: (run.test_accuracy is None, -(run.test_accuracy or 0), run.run_id))
