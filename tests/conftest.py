"""Shared fixtures: a tiny synthetic smear dataset, an isolated scan cache and a private run workspace."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bcd_engine.data.synthetic import make_synthetic_dataset
from bcd_engine.store import RunStore

SYNTHETIC_CLASSES = ("Benign", "Early", "Pre", "Pro")
SYNTHETIC_PER_CLASS = 12
SYNTHETIC_SIZE = 32


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only 4 classes x 12 images (32x32 PNG) synthetic dataset folder, shared by the session."""
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic") / "dataset",
        n_per_class=SYNTHETIC_PER_CLASS,
        image_size=SYNTHETIC_SIZE,
        seed=0,
        class_names=SYNTHETIC_CLASSES,
    )


@pytest.fixture
def synthetic_dataset_copy(synthetic_dataset: Path, tmp_path: Path) -> Path:
    """A private, writable copy of ``synthetic_dataset`` for tests that add, break or change files."""
    return Path(shutil.copytree(synthetic_dataset, tmp_path / "dataset"))


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``BCD_CACHE_DIR`` at an empty per-test folder so scans never touch the project cache."""
    cache = tmp_path / "bcd_cache"
    monkeypatch.setenv("BCD_CACHE_DIR", str(cache))
    return cache


def workspace_store(root: Path, patch: pytest.MonkeyPatch) -> RunStore:
    """A new SQLite run store under ``root``, with the artifacts and cache folders there too (set on ``patch``).

    For module-scoped fixtures (``with pytest.MonkeyPatch.context() as patch``); tests use ``workspace``.
    """
    patch.setenv("BCD_ARTIFACTS_DIR", str(root / "artifacts"))
    patch.setenv("BCD_CACHE_DIR", str(root / "cache"))
    return RunStore(f"sqlite:///{root / 'results.db'}")


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunStore:
    """An empty run store with its own artifacts and cache folders under ``tmp_path``."""
    return workspace_store(tmp_path, monkeypatch)
