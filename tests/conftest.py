"""Shared fixtures: a tiny synthetic smear dataset, an isolated scan cache, a private run workspace, and
one empty database per test on every available backend (``db_url``, ``store``).

SQLite (a file under ``tmp_path``) always; PostgreSQL when ``BCD_TEST_POSTGRES_URL`` holds an admin
URL (``export BCD_TEST_POSTGRES_URL=$(bash .ci/postgres.sh)``): each test gets its own freshly
created database there, dropped afterwards. Plain helpers are in ``helpers.py``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import workspace_store
from psycopg import sql
from sqlalchemy.engine import make_url

from bcd_engine.data.synthetic import make_synthetic_dataset
from bcd_engine.store import RunStore

SYNTHETIC_CLASSES = ("Benign", "Early", "Pre", "Pro")
SYNTHETIC_PER_CLASS = 12
SYNTHETIC_SIZE = 32


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the marks (``--dist loadgroup``, pytest.ini)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Keep the tests that share a module-scoped fixture (a browser and its app, a Ray cluster, a trained model)
    on one worker process, in their module's order: one group per module. Every other test is a unit of its own,
    so the two workers stay busy to the end instead of waiting on the last long file."""
    for item in items:
        definitions = getattr(item, "_fixtureinfo", None)
        scopes = {defs[-1].scope for defs in definitions.name2fixturedefs.values()} if definitions else set()
        if scopes & {"module", "class", "package"}:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


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


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunStore:
    """An empty run store with its own artifacts and cache folders under ``tmp_path``."""
    return workspace_store(tmp_path, monkeypatch)


POSTGRES_ENV = "BCD_TEST_POSTGRES_URL"

BACKENDS = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=pytest.mark.skipif(
            not os.environ.get(POSTGRES_ENV),
            reason=f"{POSTGRES_ENV} is not set (export {POSTGRES_ENV}=$(bash .ci/postgres.sh))",
        ),
    ),
]


def _admin_dsn() -> str:
    url = make_url(os.environ[POSTGRES_ENV])
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def create_postgres_database() -> str:
    """Create a uniquely named database and return its URL."""
    name = f"bcd_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_url(os.environ[POSTGRES_ENV]).set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(url: str) -> None:
    name = make_url(url).database
    with psycopg.connect(_admin_dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty database on each backend (no file yet on SQLite)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'results.db'}"
        return
    url = create_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


@pytest.fixture
def store(db_url: str) -> Iterator[RunStore]:
    """A freshly created store on each backend."""
    with RunStore.open(db_url) as opened:
        yield opened
