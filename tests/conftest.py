"""Shared dataset fixtures: a tiny synthetic smear dataset and an isolated scan cache."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bcd_engine.synthetic import make_synthetic_dataset

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
