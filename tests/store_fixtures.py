"""Fixtures shared by the run-store tests: one database per test, on every available backend.

SQLite (a file under ``tmp_path``) always; PostgreSQL when ``BCD_TEST_POSTGRES_URL`` holds an admin
URL (``export BCD_TEST_POSTGRES_URL=$(bash .ci/postgres.sh)``): each test gets its own freshly
created database there, dropped afterwards. Test modules import the fixtures by name.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from bcd_engine.store import RunStore

POSTGRES_ENV = "BCD_TEST_POSTGRES_URL"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

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
    """URL of an empty database on each backend."""
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
    """A freshly migrated store on each backend."""
    with RunStore(db_url) as opened:
        yield opened


def subprocess_env() -> dict[str, str]:
    """Environment for child Python processes that import ``bcd_engine`` from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    return env
