"""Issue 23's faults that lost a run or left litter: each is now survived, cleaned up or refused in one line."""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
from conftest import POSTGRES_ENV, create_postgres_database, drop_postgres_database
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from bcd_engine import cli
from bcd_engine.errors import StoreError, WriteError
from bcd_engine.models.config import AugmentConfig, TrainConfig
from bcd_engine.store import Protocol, RunStore, runs
from bcd_engine.store.artifacts import (
    MODEL_KIND,
    STALE_TEMP_FILE_S,
    TRUST_KIND,
    record_artifact,
    run_folder,
    trust_path,
)
from bcd_engine.store.engine import is_transient
from bcd_engine.training import run as training
from bcd_engine.training.run import save_model, train


def assert_one_line_refusal(code: int, capfd: pytest.CaptureFixture, fragment: str) -> None:
    """``cli.main`` refused: exit 2 and one ``bcd: error:`` line naming ``fragment``, no traceback."""
    err = capfd.readouterr().err
    assert code == cli.EXIT_BAD_INPUT, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("bcd: error:") and err.count("bcd: error:") == 1 and "Traceback" not in err, err
    assert fragment in last, last


@pytest.fixture
def cli_workspace(workspace: RunStore, monkeypatch: pytest.MonkeyPatch) -> RunStore:
    """``workspace``, which the CLI opens when ``cli.main`` runs in this process."""
    monkeypatch.setenv("BCD_DATABASE_URL", workspace.url)
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)  # main sets it; restored afterwards
    return workspace


def completed_run_with_model(store: RunStore, model) -> int:
    """A completed run whose saved and recorded model is ``model``; its id."""
    run_id = store.create_run(
        backbone="scratch_cnn",
        protocol=Protocol.holdout(),
        status="running",
        config={"train": TrainConfig(backbone="scratch_cnn").to_dict(), "class_names": ["a"]},
    )
    store.start_run(run_id, environment={})
    record_artifact(store, run_id, kind=MODEL_KIND, path=save_model(model, run_id))
    store.finish_run(run_id, status="completed")
    return run_id


# -- a PostgreSQL restart -------------------------------------------------------------------------


@pytest.fixture
def postgres_url() -> str:
    if not os.environ.get(POSTGRES_ENV):
        pytest.skip(f"{POSTGRES_ENV} is not set (export {POSTGRES_ENV}=$(bash .ci/postgres.sh))")
    url = create_postgres_database()
    yield url
    drop_postgres_database(url)


def refuse_connections(store: RunStore, times: int) -> list[int]:
    """Make the store's next ``times`` connection attempts fail as a restarting PostgreSQL refuses them (its pooled
    connections are dropped first); the list grows by one per refusal."""
    refused: list[int] = []

    def connect(*_args):
        if len(refused) < times:
            refused.append(1)
            raise psycopg.OperationalError(
                'connection failed: connection to server at "127.0.0.1", port 55432 failed: Connection refused'
            )
        return None  # the real connect

    event.listen(store._engines.reader, "do_connect", connect)
    store.close()
    return refused


def test_a_postgres_restart_of_a_few_seconds_costs_a_run_a_wait_not_the_run(postgres_url, monkeypatch) -> None:
    store = RunStore.open(postgres_url)
    run_id = store.create_run(backbone="scratch_cnn", protocol=Protocol.holdout(), config={}, status="running")
    refused = refuse_connections(store, 3)
    store.heartbeat(run_id)
    store.log_epoch(run_id, phase=1, epoch=1, train_loss=0.5, train_accuracy=0.8)
    assert len(refused) == 3 and len(store.get_epochs(run_id)) == 1

    monkeypatch.setattr(runs, "TRANSIENT_RETRY_S", 0.5)  # a server that stays down: the call fails, bounded
    refuse_connections(store, 1000)
    started = time.monotonic()
    with pytest.raises(StoreError, match="Connection refused"):
        store.finish_run(run_id, status="completed")
    assert time.monotonic() - started < 5
    store.close()


def test_only_a_lost_server_connection_is_transient_never_a_locked_sqlite_file() -> None:
    refused = psycopg.OperationalError("connection failed: Connection refused")
    assert is_transient(OperationalError("SELECT 1", {}, refused))
    assert not is_transient(OperationalError("BEGIN IMMEDIATE", {}, sqlite3.OperationalError("database is locked")))


# -- litter ---------------------------------------------------------------------------------------


def test_a_run_that_fails_on_a_full_disk_removes_the_model_it_saved(workspace, synthetic_dataset, monkeypatch) -> None:
    def full_disk(*_args, **_kwargs):
        raise WriteError(f"cannot save {trust_path(run_id)}: {os.strerror(errno.ENOSPC)}")

    monkeypatch.setattr(training, "save_trust", full_disk)
    config = TrainConfig(
        backbone="scratch_cnn",
        weights=None,
        image_size=32,
        epochs=1,
        batch_size=8,
        dense_units=8,
        dropout=0.0,
        augment=AugmentConfig(factor=1),
        patience=1,
    )
    run_id = workspace.create_run(backbone="scratch_cnn", protocol=Protocol.holdout(), config={})
    with pytest.raises(WriteError, match="No space left on device"):
        train(config, synthetic_dataset, store=workspace, run_id=run_id)
    assert workspace.get_run(run_id).status == "failed"
    assert not run_folder(run_id).exists()  # its model.keras was saved before the gate failed; it is gone


def test_opening_the_store_sweeps_old_temp_files_of_killed_saves_only_in_run_folders(workspace, tmp_path) -> None:
    def left_by_a_killed_save(folder: Path, *, age_s: float) -> Path:
        """A file named as atomic_path names its temporary file, as a process killed during a save leaves it."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ".model.keras.k1ll3d.keras"
        path.write_bytes(b"half a model")
        os.utime(path, (time.time() - age_s,) * 2)
        return path

    old = left_by_a_killed_save(run_folder(1), age_s=STALE_TEMP_FILE_S + 60)
    fresh = left_by_a_killed_save(run_folder(2), age_s=1)  # another process may be writing it now
    elsewhere = left_by_a_killed_save(tmp_path / "artifacts" / "notes", age_s=STALE_TEMP_FILE_S + 60)
    RunStore.open(workspace.url).close()
    assert not old.exists() and fresh.exists() and elsewhere.exists()


# -- refusals in one line --------------------------------------------------------------------------


def test_a_gate_holding_a_pickled_object_is_refused_in_one_line(cli_workspace, tmp_path, capfd) -> None:
    import keras

    inputs = keras.Input((4,))
    run_id = completed_run_with_model(cli_workspace, keras.Model(inputs, keras.layers.Dense(1)(inputs)))
    gate = trust_path(run_id)
    np.savez(
        gate,
        means=np.array([{"not": "an array"}], dtype=object),
        precision=np.eye(2),
        threshold=1.0,
        pass_rate=0.9,
        temperature=1.0,
    )
    record_artifact(cli_workspace, run_id, kind=TRUST_KIND, path=gate)
    image = tmp_path / "smear.png"
    image.write_bytes(b"not needed: the run is refused first")
    code = cli.main(["predict", "--run", str(run_id), str(image)])
    assert_one_line_refusal(code, capfd, f"the OOD gate {gate} is not one bcd saved (Object arrays cannot be loaded")


def test_export_refuses_a_model_that_safe_mode_refuses_and_copies_nothing(cli_workspace, tmp_path, capfd) -> None:
    import keras

    inputs = keras.Input((4,))
    run_id = completed_run_with_model(cli_workspace, keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs)))
    out = tmp_path / "export"
    code = cli.main(["export", "--run", str(run_id), "--out", str(out)])
    assert_one_line_refusal(code, capfd, f"model file of run {run_id} cannot be loaded safely")
    assert not out.exists()


def _fingerprint(path: Path) -> tuple[str, int, list[str]]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns, sorted(os.listdir(path.parent))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path: path.touch(), "results.db is empty (0 bytes): it is not a bcd run store; delete it"),
        (
            lambda path: sqlite3.connect(path).executescript(
                "CREATE TABLE runs (name TEXT); INSERT INTO runs VALUES ('x');"
            ),
            "results.db is a SQLite database with other tables (runs) and no bcd schema",
        ),
    ],
)
def test_a_file_that_is_not_a_store_is_refused_before_anything_changes(
    make, message, tmp_path, monkeypatch, capfd
) -> None:
    db = tmp_path / "results.db"
    make(db)
    before = _fingerprint(db)
    monkeypatch.setenv("BCD_DATABASE_URL", f"sqlite:///{db}")
    assert_one_line_refusal(cli.main(["runs"]), capfd, message)
    with pytest.raises(StoreError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunStore.open(f"sqlite:///{db}")
    assert _fingerprint(db) == before


def test_a_new_store_file_never_appears_empty(tmp_path) -> None:
    db = tmp_path / "results.db"
    RunStore.open(f"sqlite:///{db}").close()
    assert db.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
