"""Read-only deployments: a run store on a read-only folder or behind a read-only URL is read, never
written, migrated or switched to WAL; caches move to a private temporary folder when the project is read-only."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import fill_store, read_only_tree, subprocess_env, unprivileged

from bcd_engine.errors import StoreError
from bcd_engine.store import Protocol, RunStore


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def shipped_store(tmp_path: Path, synthetic_dataset: Path) -> tuple[Path, dict]:
    """A store full of runs, closed as a demo's host would ship it (WAL folded back into the file)."""
    folder = tmp_path / "shipped"
    folder.mkdir()
    store = RunStore.open(f"sqlite:///{folder / 'results.db'}")
    ids = fill_store(store, synthetic_dataset)
    store.close()
    assert sorted(p.name for p in folder.iterdir()) == ["results.db"]
    return folder / "results.db", ids


def _cli_runs(url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        unprivileged([sys.executable, "-m", "bcd_engine", "runs", "--json"]),
        env={**subprocess_env(), "BCD_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_runs_json_reads_a_store_in_a_read_only_folder_and_writes_nothing(shipped_store) -> None:
    db, ids = shipped_store
    before = _digest(db)
    with read_only_tree(db.parent):
        result = _cli_runs(f"sqlite:///{db}")
        left = sorted(p.name for p in db.parent.iterdir())
    assert result.returncode == 0, result.stderr
    listed = {run["id"] for run in json.loads(result.stdout)["runs"]}
    assert ids["holdout"] in listed and len(listed) >= 5
    assert left == ["results.db"], "no journal, WAL or lock file may be made beside a read-only store"
    assert _digest(db) == before


def test_a_store_that_cannot_be_written_refuses_writes_with_a_clear_error(shipped_store) -> None:
    db, _ = shipped_store
    script = (
        "import sys\n"
        "from bcd_engine.store import Protocol, RunStore\n"
        "from bcd_engine.errors import StoreError\n"
        "store = RunStore.open(sys.argv[1])\n"
        "print(store.read_only, len(store.list_runs()))\n"
        "try:\n"
        "    store.create_run(backbone='resnet50', protocol=Protocol.holdout(), config={})\n"
        "except StoreError as exc:\n"
        "    print(exc)\n"
    )
    with read_only_tree(db.parent):
        result = subprocess.run(
            unprivileged([sys.executable, "-c", script, f"sqlite:///{db}"]),
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first.startswith("True ")
    assert "is read-only; nothing can be saved to it" in second


@pytest.mark.parametrize("suffix", ["?mode=ro", "?immutable=1", "?mode=ro&uri=true"])
def test_read_only_urls_open_without_writing(shipped_store, suffix: str) -> None:
    db, ids = shipped_store
    before = _digest(db)
    store = RunStore.open(f"sqlite:///{db}{suffix}")
    assert store.read_only
    assert ids["holdout"] in {run.id for run in store.list_runs()}
    with pytest.raises(StoreError, match="read-only"):
        store.create_run(backbone="resnet50", protocol=Protocol.holdout(), config={})
    store.close()
    assert _digest(db) == before


def test_a_sqlite_uri_filename_is_understood(shipped_store) -> None:
    db, ids = shipped_store
    store = RunStore(f"sqlite:///file:{db}?mode=ro&uri=true")
    assert store.read_only and ids["holdout"] in {run.id for run in store.list_runs()}
    store.close()


def test_a_missing_store_behind_a_read_only_url_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"no run store .*no such file"):
        RunStore.open(f"sqlite:///{tmp_path / 'results.db'}?mode=ro")
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_store_with_an_old_schema_says_how_to_upgrade_it(tmp_path: Path) -> None:
    db = tmp_path / "results.db"
    database = sqlite3.connect(db)  # an empty database: no bcd schema at all
    database.execute("PRAGMA user_version = 0")  # writes the header (a file of 0 bytes is refused as no database)
    database.commit()
    database.close()
    with pytest.raises(StoreError, match=r"no bcd schema; it is read-only.*writable copy"):
        RunStore.open(f"sqlite:///{db}?mode=ro")
    assert db.stat().st_size == 4096


def test_caches_move_to_a_private_temporary_folder_when_the_project_is_read_only(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    script = (
        "import sys\nfrom pathlib import Path\nfrom bcd_engine import settings\n"
        "settings.PROJECT_ROOT = Path(sys.argv[1])\nprint(settings.cache_dir())\n"
    )
    env = {key: value for key, value in subprocess_env().items() if key != "BCD_CACHE_DIR"}
    with read_only_tree(project):
        result = subprocess.run(
            unprivileged([sys.executable, "-c", script, str(project)]),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    cache = Path(result.stdout.strip())
    assert cache.parent == Path(tempfile.gettempdir()) and cache.name.startswith("bcd-cache")
    assert cache.is_dir() and cache.stat().st_mode & 0o077 == 0
    writable = subprocess.run(
        [sys.executable, "-c", script, str(project)], env=env, capture_output=True, text=True, timeout=60
    )
    assert Path(writable.stdout.strip()) == project / ".bcd_cache"
