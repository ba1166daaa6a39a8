"""Tests of the run store (bcd_engine.store) on SQLite and, when configured, PostgreSQL."""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from helpers import subprocess_env

from bcd_engine.errors import RecordError, RunNotFoundError, StoreError
from bcd_engine.store import (
    ArtifactRecord,
    DatasetRecord,
    EpochRecord,
    PredictionRecord,
    Protocol,
    RocCurve,
    RunDataset,
    RunRecord,
    RunStore,
)
from bcd_engine.store.engine import ALEMBIC_INI, make_engine, migration_transaction, normalize_url, schema_script
from bcd_engine.store.models import Base, SqlRun

TABLES = {
    "datasets",
    "runs",
    "epochs",
    "split_assignments",
    "evaluations",
    "roc_points",
    "predictions",
    "artifacts",
    "store_revision",
}
CLASSES = ["ALL", "AML", "normal"]


def _engine(url: str) -> sa.Engine:
    return make_engine(normalize_url(url))


def _new_run(store: RunStore, **kwargs: object) -> int:
    return store.create_run(backbone="efficientnetb0", protocol=Protocol.holdout(), config={}, **kwargs)


def _migrate(url: str, revision: str, direction: str = "upgrade") -> None:
    """Move the schema at ``url`` to ``revision`` with Alembic, as ``RunStore.open`` migrates."""
    engine = _engine(url)
    try:
        with engine.connect() as conn, migration_transaction(conn):
            config = Config(str(ALEMBIC_INI))
            config.attributes["connection"] = conn
            getattr(command, direction)(config, revision)
    finally:
        engine.dispose()


def _sqlite_file(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite") else None


def _write_statements(url: str, action) -> list[str]:
    """The statements that write (or take the write lock) while ``action()`` runs."""
    statements: list[str] = []

    def record(conn, cursor, statement, *args) -> None:
        statements.append(statement)

    sa.event.listen(sa.Engine, "before_cursor_execute", record)
    try:
        action()
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", record)
    assert statements, "opening should at least read the schema revision"
    write = re.compile(r"\s*(INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|BEGIN IMMEDIATE|PRAGMA journal_mode)", re.I)
    return [s for s in statements if write.match(s)]


# Protocol strings as revision 0001 stored them, with what they read back as after 0002.
OLD_PROTOCOLS = [
    ("holdout (group-aware, stratified)", Protocol.holdout()),
    ("5-fold CV (group-aware, stratified), fold 2/5", Protocol.kfold(2, folds=5)),
    ("3-fold CV (group-aware, stratified), fold 3/3", Protocol.kfold(3, folds=3)),
    ("leave-one-dataset-out, held out pbc", Protocol.lodo("pbc")),
    ("leave-one-dataset-out, held out C-NMC 2019, ALL-IDB2 and pbc", Protocol.lodo("C-NMC 2019, ALL-IDB2 and pbc")),
]


def _started_run(store: RunStore) -> int:
    run_id = _new_run(store)
    store.start_run(run_id, environment={"tensorflow": "2.16.1"})
    return run_id


def _evaluation_kwargs() -> dict:
    return {
        "name": "test",
        "data_dir": "/data/test",
        "metrics": {"accuracy": 0.9, "loss": 0.3, "macro_auc": 0.95, "per_class": {"ALL": {"f1": 0.8}}},
        "class_names": CLASSES,
        "confusion_matrix": [[5, 1, 0], [0, 6, 0], [1, 0, 7]],
        "roc": {
            "ALL": {"fpr": [0.0, 0.1, 1.0], "tpr": [0.0, 0.9, 1.0], "thresholds": [math.inf, 0.5, 0.0], "auc": 0.93},
            "AML": {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0], "thresholds": [math.inf, 0.0], "auc": 0.5},
            "normal": {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0], "thresholds": [math.inf, 0.0], "auc": math.nan},
        },
        "predictions": [
            {"path": "a/1.png", "true_class": "ALL", "predicted_class": "ALL", "probabilities": [0.7, 0.2, 0.1]},
            {"path": "b/2.png", "true_class": "AML", "predicted_class": "ALL", "probabilities": [0.5, 0.4, 0.1]},
        ],
    }


# -- opening, migrating ------------------------------------------------------------------------


def test_fresh_database_is_migrated_to_head_and_matches_the_models(store: RunStore) -> None:
    with store._engines.reader.connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) >= TABLES
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert context.get_current_revision() == schema_script().get_current_head()
        assert compare_metadata(context, Base.metadata) == []


def test_database_at_initial_revision_upgrades_and_keeps_its_rows(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    _migrate(db_url, "0001")
    engine = _engine(db_url)
    old = [*OLD_PROTOCOLS, ("my own protocol", Protocol.holdout())]  # not one bcd wrote: a holdout
    with engine.begin() as conn:
        for text, _ in old:
            conn.execute(
                sa.text(
                    "INSERT INTO runs (backbone, protocol, config, status, created_at, cancel_requested) "
                    "VALUES ('resnet50', :protocol, '{}', 'completed', :now, false)"
                ),
                {"protocol": text, "now": datetime(2025, 1, 1)},
            )
        first = conn.execute(sa.text("SELECT min(id) FROM runs")).scalar()
        conn.execute(sa.text("INSERT INTO epochs (run_id, phase, epoch) VALUES (:id, 0, 0)"), {"id": first})
        conn.execute(
            sa.text("INSERT INTO split_assignments (run_id, path, class_name, subset) VALUES (:id, 'a', 'b', 'test')"),
            {"id": first},
        )
    engine.dispose()
    with pytest.raises(StoreError, match=r"schema revision '0001', older .*RunStore\.open"):
        RunStore(db_url)
    with caplog.at_level(logging.WARNING, logger="bcd_engine.store.migrations"):
        store = RunStore.open(db_url)
    with store, store._engines.reader.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == schema_script().get_current_head()
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        checks = {c["name"] for t in ("runs", "split_assignments") for c in sa.inspect(conn).get_check_constraints(t)}
        assert checks == {"ck_runs_status", "ck_runs_protocol_kind", "ck_split_assignments_subset"}
        runs = sorted(store.list_runs(), key=lambda r: r.id)
        assert [(r.protocol, r.protocol.label) for r in runs[:-1]] == [(p, text) for text, p in OLD_PROTOCOLS]
        assert runs[-1].protocol == Protocol.holdout()
        assert all((r.backbone, r.status) == ("resnet50", "completed") for r in runs)
        assert len(store.get_epochs(first)) == 1 and len(store.get_split(first)) == 1  # not cascade-deleted
    assert [r.getMessage() for r in caplog.records] == [
        f"run {runs[-1].id}: protocol 'my own protocol' is not one bcd wrote; "
        "it is now 'holdout (group-aware, stratified)'"
    ]


def test_downgrade_to_the_initial_revision_restores_the_protocol_strings(store: RunStore, db_url: str) -> None:
    ids = [store.create_run(backbone="b", protocol=p, config={}) for _, p in OLD_PROTOCOLS]
    store.close()
    _migrate(db_url, "0001", "downgrade")
    engine = _engine(db_url)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT id, protocol FROM runs ORDER BY id")).all()
    engine.dispose()
    assert stored == [(run_id, text) for run_id, (text, _) in zip(ids, OLD_PROTOCOLS, strict=True)]
    with RunStore.open(db_url) as reopened:
        assert [reopened.get_run(i).protocol for i in ids] == [p for _, p in OLD_PROTOCOLS]


def test_migrating_sqlite_with_foreign_keys_on_is_refused_before_anything_is_deleted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'results.db'}"
    _migrate(url, "0001")
    engine = _engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO runs (id, backbone, protocol, config, status, created_at, cancel_requested) "
                "VALUES (1, 'b', 'p', '{}', 'queued', '2025-01-01 00:00:00', 0)"
            )
        )
        conn.execute(sa.text("INSERT INTO epochs (run_id, phase, epoch) VALUES (1, 0, 0)"))
    with pytest.raises(RuntimeError, match="foreign keys off"), engine.begin() as conn:  # foreign keys on
        config = Config(str(ALEMBIC_INI))
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM epochs")).scalar() == 1
    engine.dispose()


def test_opening_a_database_at_head_does_not_write(db_url: str) -> None:
    def counts(store: RunStore) -> dict[str, int]:
        with store._engines.reader.connect() as conn:
            return {table: conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() for table in TABLES}

    with RunStore.open(db_url) as store:
        dead = _started_run(store)
        with store._engines.reader.begin() as conn:
            conn.execute(sa.text("UPDATE runs SET pid = 999999999 WHERE id = :id"), {"id": dead})  # no such process
        rows = counts(store)
    path = _sqlite_file(db_url)
    before = os.stat(path) if path else None
    opened: list[RunStore] = []
    assert _write_statements(db_url, lambda: opened.append(RunStore(db_url))) == []
    with opened[0] as store:
        assert store.get_run(dead).status == "running"  # recovery is RunStore.open's job
        assert counts(store) == rows
    if path:
        after = os.stat(path)
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with RunStore.open(db_url) as store:
        assert store.get_run(dead).status == "interrupted"


def test_opening_a_store_that_is_missing_or_empty_asks_for_run_store_open(db_url: str) -> None:
    path = _sqlite_file(db_url)
    if path:
        with pytest.raises(StoreError, match=r"no run store at .*\(no such file\); RunStore\.open"):
            RunStore(db_url)
        assert not path.exists()
        database = sqlite3.connect(path)  # an empty SQLite database (a file of 0 bytes is refused as none)
        database.execute("PRAGMA user_version = 0")
        database.commit()
        database.close()
        size = path.stat().st_size

    def refused() -> None:
        with pytest.raises(StoreError, match=r"has no bcd schema; open it once with RunStore\.open\(url\)"):
            RunStore(db_url)

    assert _write_statements(db_url, refused) == []
    if path:
        assert path.stat().st_size == size
    with RunStore.open(db_url) as store:
        assert store.list_runs() == []
    RunStore(db_url).close()


def test_database_newer_than_the_code_is_refused(db_url: str) -> None:
    RunStore.open(db_url).close()
    engine = _engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    with pytest.raises(StoreError, match="'9999_future', newer than this version of bcd knows"):
        RunStore(db_url)
    with pytest.raises(StoreError, match="'9999_future', newer than this version of bcd knows"):
        RunStore.open(db_url)


def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new-folder' / 'results.db'}"
    with RunStore.open(url) as store, store._engines.reader.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert (tmp_path / "new-folder" / "results.db").is_file()


def test_default_url_comes_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BCD_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    with RunStore.open() as store:
        assert store.url == f"sqlite:///{tmp_path / 'env.db'}"
    assert (tmp_path / "env.db").is_file()
    with RunStore() as store:
        assert store.url == f"sqlite:///{tmp_path / 'env.db'}"


def test_postgresql_urls_get_the_psycopg_driver() -> None:
    assert normalize_url("postgresql://u:p@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u:p@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u:p@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:secret@127.0.0.1:1/x", "postgresql://u:***@127.0.0.1:1/x"),
        ("sqlite:////nonexistent-dir/x/y.db", "sqlite:////nonexistent-dir/x/y.db"),
        ("not a url", "not a url"),
        ("nosuchdialect://u:secret@host/db", "nosuchdialect://u:***@host/db"),
    ],
)
@pytest.mark.parametrize("opener", [RunStore, RunStore.open])
def test_unusable_url_raises_one_line_store_error(url: str, shown: str, opener) -> None:
    with pytest.raises(StoreError, match=r"cannot open the run store at|no run store at") as caught:
        opener(url)
    message = str(caught.value)
    assert "\n" not in message
    assert shown in message
    assert "secret" not in message
    assert not Path("/nonexistent-dir").exists()


# -- records round-trip ------------------------------------------------------------------------


def test_dataset_round_trip_and_reregistration(store: RunStore) -> None:
    first = store.register_dataset(name="C-NMC", data_dir="/data/cnmc", n_images=10, class_counts={"ALL": 6, "hem": 4})
    other = store.register_dataset(name="ALL-IDB", data_dir=Path("/data/allidb"), n_images=3, class_counts={"ALL": 3})
    again = store.register_dataset(
        name="C-NMC v2", data_dir="/data/cnmc", n_images=12, class_counts={"ALL": 7, "hem": 5}
    )
    assert again == first != other
    records = {d.id: d for d in store.list_datasets()}
    assert len(records) == 2
    cnmc = records[first]
    assert isinstance(cnmc, DatasetRecord)
    assert (cnmc.name, cnmc.root, cnmc.n_images) == ("C-NMC v2", "/data/cnmc", 12)
    assert cnmc.class_counts == {"ALL": 7, "hem": 5}
    assert cnmc.created_at.tzinfo is not None
    run_id = _new_run(store, dataset_id=first)
    assert store.get_run(run_id).dataset_id == first


def test_a_run_carries_its_registered_dataset_and_an_old_run_what_its_config_says(store: RunStore) -> None:
    demo = store.register_dataset(
        name="synthetic-demo",
        data_dir="/cache/synthetic-demo",
        n_images=240,
        class_counts={"Benign": 240},
        synthetic=True,
    )
    queued = _new_run(store, dataset_id=demo)
    later = _new_run(store)
    store.set_run_dataset(later, demo)
    summary = {"dataset": {"name": "Original", "n_images": 3256, "synthetic": False}, "data_dir": "/data/Original"}
    recorded = store.create_run(backbone="b", protocol=Protocol.holdout(), config=summary)
    bare = store.create_run(backbone="b", protocol=Protocol.holdout(), config={"data_dir": "/data/Segmented"})
    expected = {
        queued: RunDataset("synthetic-demo", 240, True),
        later: RunDataset("synthetic-demo", 240, True),
        recorded: RunDataset("Original", 3256, False),
        bare: RunDataset("Segmented", None, False),
    }
    assert {r.id: r.dataset for r in store.list_runs()} == expected
    assert store.get_run(later).dataset_id == demo
    assert store.claim_next_queued(worker_id="w").dataset == expected[queued]
    (registered,) = store.list_datasets()
    assert registered.synthetic
    with pytest.raises(RunNotFoundError):
        store.set_run_dataset(4242, demo)


def test_upgrading_to_revision_3_names_the_dataset_of_runs_that_recorded_only_their_folder(db_url: str) -> None:
    _migrate(db_url, "0002")
    engine = _engine(db_url)
    insert_run = sa.text(
        "INSERT INTO runs (backbone, protocol_kind, config, status, created_at, cancel_requested) "
        "VALUES ('b', 'holdout', :config, 'completed', :now, false)"
    )
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO datasets (name, root, n_images, class_counts, created_at) "
                "VALUES ('synthetic-demo', '/cache/synthetic-demo', 240, '{}', :now)"
            ),
            {"now": datetime(2025, 1, 1)},
        )
        demo_config = (
            '{"data_dir": "/cache/synthetic-demo", "dataset": {"name": "synthetic-demo", '
            '"n_images": 240, "synthetic": true}}'
        )
        for config in (demo_config, '{"data_dir": "/data/unregistered"}'):
            conn.execute(insert_run, {"config": config, "now": datetime(2025, 1, 1)})
    engine.dispose()
    with RunStore.open(db_url) as store:
        demo_run, unregistered = sorted(store.list_runs(), key=lambda r: r.id)
        assert demo_run.dataset_id is not None and demo_run.dataset == RunDataset("synthetic-demo", 240, True)
        assert unregistered.dataset_id is None and unregistered.dataset == RunDataset("unregistered", None, False)
        assert [d.synthetic for d in store.list_datasets()] == [True]


def test_run_lifecycle_round_trip(store: RunStore) -> None:
    config = {"backbone": "efficientnetb0", "image_size": 224, "lr": [1e-3, 1e-5], "nested": {"seed": 7}}
    run_id = store.create_run(backbone="efficientnetb0", protocol=Protocol.holdout(), config=config)
    queued = store.get_run(run_id)
    assert isinstance(queued, RunRecord)
    assert (queued.status, queued.config, queued.started_at, queued.cancel_requested) == ("queued", config, None, False)

    store.start_run(run_id, environment={"tensorflow": "2.16.1", "device": "CPU"}, worker_id="w1")
    running = store.get_run(run_id)
    assert running.status == "running"
    assert (running.host, running.pid, running.worker_id) == (socket.gethostname(), os.getpid(), "w1")
    assert running.environment == {"tensorflow": "2.16.1", "device": "CPU"}
    assert running.started_at is not None and running.heartbeat_at is not None
    assert running.started_at.tzinfo == UTC

    store.heartbeat(run_id)
    assert store.get_run(run_id).heartbeat_at >= running.heartbeat_at
    store.finish_run(run_id, status="completed", test_accuracy=0.91, macro_auc=0.97)
    done = store.get_run(run_id)
    assert (done.status, done.test_accuracy, done.macro_auc, done.error) == ("completed", 0.91, 0.97, None)
    assert done.finished_at >= done.started_at
    assert done.seconds == pytest.approx((done.finished_at - done.started_at).total_seconds())

    with pytest.raises(StoreError, match="completed"):
        store.start_run(run_id, environment={})
    with pytest.raises(RecordError, match=r"finish_run needs one of completed, .*not 'running'"):
        store.finish_run(run_id, status="running")


def test_start_run_accepts_runs_created_running_or_claimed_here_only(store: RunStore) -> None:
    created_running = _new_run(store, status="running")
    store.start_run(created_running, environment={"device": "CPU"})
    assert store.get_run(created_running).pid == os.getpid()
    store.start_run(created_running, environment={"device": "CPU"})  # again, same process

    _new_run(store)
    claimed = store.claim_next_queued(worker_id="w")
    store.start_run(claimed.id, environment={"device": "GPU"}, worker_id="w")
    assert store.get_run(claimed.id).environment == {"device": "GPU"}

    elsewhere = _started_run(store)
    with store._engines.reader.begin() as conn:
        conn.execute(sa.text("UPDATE runs SET host = 'other-host' WHERE id = :id"), {"id": elsewhere})
    with pytest.raises(StoreError, match=r"running .*other-host"):
        store.start_run(elsewhere, environment={})


def test_list_runs_newest_first_and_by_status(store: RunStore) -> None:
    ids = [_new_run(store) for _ in range(3)]
    store.finish_run(ids[1], status="failed", error="boom")
    assert [r.id for r in store.list_runs()] == ids[::-1]
    assert [r.id for r in store.list_runs(status="queued")] == [ids[2], ids[0]]
    assert [r.id for r in store.list_runs(status="failed")] == [ids[1]]
    assert store.get_run(ids[1]).error == "boom"
    assert [r.id for r in store.list_runs(limit=1)] == [ids[2]]


def test_epochs_round_trip(store: RunStore) -> None:
    run_id = _started_run(store)
    store.log_epoch(
        run_id,
        phase=1,
        epoch=0,
        train_loss=0.4,
        train_accuracy=0.85,
        val_loss=0.5,
        val_accuracy=0.8,
        learning_rate=1e-5,
        seconds=12.5,
    )
    store.log_epoch(run_id, phase=0, epoch=1, train_loss=math.nan, train_accuracy=0.7)
    store.log_epoch(run_id, phase=0, epoch=0, train_loss=0.9, train_accuracy=0.6)
    epochs = store.get_epochs(run_id)
    assert all(isinstance(e, EpochRecord) for e in epochs)
    assert [(e.phase, e.epoch) for e in epochs] == [(0, 0), (0, 1), (1, 0)]
    assert epochs[1].train_loss is None
    assert epochs[2] == EpochRecord(run_id, 1, 0, 0.4, 0.85, 0.5, 0.8, 1e-5, 12.5)
    with pytest.raises(RecordError, match="epochs"):  # (run_id, phase, epoch) is unique
        store.log_epoch(run_id, phase=0, epoch=0, train_loss=1.0, train_accuracy=0.5)
    assert len(store.get_epochs(run_id)) == 3


def test_split_round_trip_replaces_previous_split(store: RunStore) -> None:
    run_id = _new_run(store)
    assignments = [
        {"path": f"img/{i}.png", "class_name": CLASSES[i % 3], "subset": subset, "group_id": f"patient{i // 2}"}
        for i, subset in enumerate(["train", "train", "val", "test", "fold0", "fold11"])
    ]
    assignments.append({"path": "img/x.png", "class_name": "ALL", "subset": "train", "group_id": None})
    store.save_split(run_id, assignments)
    assert store.get_split(run_id) == assignments
    store.save_split(run_id, assignments[:2])
    assert store.get_split(run_id) == assignments[:2]
    with pytest.raises(RecordError, match="subset must be train, val, test or foldN, not 'holdout'"):
        store.save_split(run_id, [{"path": "p", "class_name": "ALL", "subset": "holdout", "group_id": None}])
    assert store.get_split(run_id) == assignments[:2]


def test_evaluation_round_trip(store: RunStore) -> None:
    run_id = _started_run(store)
    kwargs = _evaluation_kwargs()
    eval_id = store.save_evaluation(run_id, **kwargs)
    external_id = store.save_evaluation(run_id, **{**kwargs, "name": "external", "predictions": []})
    first, external = store.get_evaluations(run_id)
    assert (first.id, external.id, external.name) == (eval_id, external_id, "external")
    assert (first.name, first.data_dir, first.run_id) == ("test", "/data/test", run_id)
    assert first.metrics == kwargs["metrics"]
    assert first.class_names == CLASSES
    assert first.confusion_matrix == kwargs["confusion_matrix"]
    assert list(first.roc) == CLASSES
    assert first.roc["ALL"] == RocCurve(
        fpr=[0.0, 0.1, 1.0], tpr=[0.0, 0.9, 1.0], thresholds=[math.inf, 0.5, 0.0], auc=0.93
    )
    assert first.roc["normal"].auc is None  # NaN AUC (class absent) is kept as None
    predictions = store.get_predictions(eval_id)
    assert all(isinstance(p, PredictionRecord) for p in predictions)
    assert [(p.path, p.true_class, p.predicted_class, p.probabilities) for p in predictions] == [
        (p["path"], p["true_class"], p["predicted_class"], p["probabilities"]) for p in kwargs["predictions"]
    ]
    assert store.get_predictions(external_id) == []
    with pytest.raises(StoreError, match="no evaluation with id 999"):
        store.get_predictions(999)


def test_evaluation_is_never_half_written(store: RunStore) -> None:
    run_id = _started_run(store)
    kwargs = _evaluation_kwargs()
    kwargs["predictions"] = [*kwargs["predictions"], {"path": "c/3.png", "true_class": "ALL"}]
    with pytest.raises(RecordError, match="save_evaluation: missing 'predicted_class'"):
        store.save_evaluation(run_id, **kwargs)
    kwargs = _evaluation_kwargs()
    kwargs["roc"]["AML"]["tpr"] = [0.0]
    with pytest.raises(RecordError, match="ROC curve of 'AML' has 2, 1, 2 values of fpr, tpr and thresholds"):
        store.save_evaluation(run_id, **kwargs)
    assert store.get_evaluations(run_id) == []
    with store._engines.reader.connect() as conn:
        for table in ("evaluations", "roc_points", "predictions"):
            assert conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() == 0


def test_artifact_round_trip(store: RunStore) -> None:
    run_id = _started_run(store)
    artifact_id = store.save_artifact(
        run_id, kind="model", path=Path("/artifacts/1/model.keras"), sha256="ab" * 32, size_bytes=5_000_000_000
    )
    [artifact] = store.get_artifacts(run_id)
    assert isinstance(artifact, ArtifactRecord)
    assert (artifact.id, artifact.run_id, artifact.kind, artifact.path, artifact.sha256, artifact.size_bytes) == (
        artifact_id,
        run_id,
        "model",
        "/artifacts/1/model.keras",
        "ab" * 32,
        5_000_000_000,
    )


def test_protocols_round_trip_as_data_with_their_labels(store: RunStore) -> None:
    long_name = "a dataset with a name far longer than the sixty-four characters a String(64) column holds"
    protocols = [Protocol.holdout(), Protocol.kfold(4, folds=5), Protocol.lodo(long_name), Protocol.external()]
    ids = [store.create_run(backbone="b", protocol=p, config={}) for p in protocols]
    runs = [store.get_run(i) for i in ids]
    assert [r.protocol for r in runs] == protocols
    assert [r.protocol.label for r in runs] == [
        "holdout (group-aware, stratified)",
        "5-fold CV (group-aware, stratified), fold 4/5",
        f"leave-one-dataset-out, held out {long_name}",
        "external test set",
    ]
    with store._engines.reader.connect() as conn:
        assert conn.execute(
            sa.select(SqlRun.protocol_kind, SqlRun.protocol_fold, SqlRun.protocol_folds).where(SqlRun.id == ids[1])
        ).one() == ("kfold", 4, 5)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Protocol("cv"), "protocol kind must be one of holdout, kfold, lodo, external, not 'cv'"),
        (lambda: Protocol.kfold(6, folds=5), "fold must be 1 to 5"),
        (lambda: Protocol.kfold(0, folds=5), "fold must be 1 to 5"),
        (lambda: Protocol.kfold(1, folds=1), "needs folds >= 2, not 1"),
        (lambda: Protocol.kfold(True, folds=2), "fold must be 1 to 2"),
        (lambda: Protocol("holdout", fold=1), "a holdout protocol has no fold"),
        (lambda: Protocol("lodo", folds=3), "a lodo protocol has no folds"),
        (lambda: Protocol.lodo(""), "held_out must name a dataset"),
    ],
)
def test_a_protocol_that_does_not_fit_its_kind_is_refused(make, message) -> None:
    with pytest.raises(RecordError, match=message):
        make()


def test_a_protocol_as_a_whole_names_no_round() -> None:
    assert Protocol.kfold(folds=5).label == "5-fold CV (group-aware, stratified)"
    assert Protocol.lodo().label == "leave-one-dataset-out"


def test_bad_values_raise_record_error_before_anything_is_written(store: RunStore) -> None:
    run_id = _started_run(store)
    calls = [
        (lambda: store.create_run(backbone="b", protocol="holdout", config={}), "protocol must be a Protocol"),
        (lambda: store.create_run(backbone="b", protocol=Protocol.holdout(), config=[1]), "create_run config"),
        (lambda: store.list_runs(status="done"), "status must be one of"),
        (
            lambda: store.register_dataset(name="d", data_dir="/d", n_images=1, class_counts={"a": "many"}),
            "register_dataset: invalid literal",
        ),
        (
            lambda: store.log_epoch(run_id, phase="first", epoch=0, train_loss=1.0, train_accuracy=0.5),
            "log_epoch: invalid literal",
        ),
        (lambda: store.finish_run(run_id, status="completed", test_accuracy="high"), "finish_run: could not convert"),
        (
            lambda: store.save_split(run_id, [{"path": "p", "subset": "train"}]),
            "save_split assignment: missing 'class_name'",
        ),
        (lambda: store.save_artifact(run_id, kind="model", path="m", sha256="0", size_bytes=None), "save_artifact"),
        (lambda: store.start_run(run_id, environment=["cpu"]), "environment"),
    ]
    for call, message in calls:
        with pytest.raises(RecordError, match=message):
            call()
    assert [r.id for r in store.list_runs()] == [run_id] and store.list_datasets() == []
    assert store.get_run(run_id).status == "running" and store.get_epochs(run_id) == []


def test_naive_datetimes_are_refused_with_record_error(store: RunStore) -> None:
    run_id = _new_run(store)
    with pytest.raises(RecordError, match="naive datetime"), store._session(write=True) as s:
        s.execute(sa.update(SqlRun).where(SqlRun.id == run_id).values(heartbeat_at=datetime(2025, 1, 1)))
    assert store.get_run(run_id).heartbeat_at is None


# -- constraints, deletion, errors -------------------------------------------------------------


def test_status_constraint_rejects_unknown_status(store: RunStore) -> None:
    with pytest.raises(RecordError, match=r"status must be one of queued, .*not 'exploded'"):
        _new_run(store, status="exploded")
    assert store.list_runs() == []
    run_id = _new_run(store)
    with pytest.raises(sa.exc.IntegrityError, match="ck_runs_status"), store._engines.reader.begin() as conn:
        conn.execute(sa.text("UPDATE runs SET status = 'paused' WHERE id = :id"), {"id": run_id})
    assert store.get_run(run_id).status == "queued"


def test_delete_run_cascades_to_everything_about_it(store: RunStore) -> None:
    keep = _started_run(store)
    store.log_epoch(keep, phase=0, epoch=0, train_loss=1.0, train_accuracy=0.5)
    doomed = _started_run(store)
    store.log_epoch(doomed, phase=0, epoch=0, train_loss=1.0, train_accuracy=0.5)
    store.save_split(doomed, [{"path": "p", "class_name": "ALL", "subset": "train", "group_id": "g"}])
    store.save_evaluation(doomed, **_evaluation_kwargs())
    store.save_artifact(doomed, kind="model", path="m.keras", sha256="0" * 64, size_bytes=1)
    store.delete_run(doomed)
    with pytest.raises(RunNotFoundError, match=f"no run with id {doomed}"):
        store.get_run(doomed)
    with store._engines.reader.connect() as conn:
        for table in ("split_assignments", "evaluations", "roc_points", "predictions", "artifacts"):
            assert conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() == 0, table
        assert conn.execute(sa.text("SELECT count(*) FROM epochs")).scalar() == 1
    assert len(store.get_epochs(keep)) == 1
    with pytest.raises(RunNotFoundError, match=f"no run with id {doomed}"):
        store.delete_run(doomed)


def test_unknown_run_id_raises_run_not_found(store: RunStore) -> None:
    calls = [
        lambda: store.get_run(4242),
        lambda: store.start_run(4242, environment={}),
        lambda: store.heartbeat(4242),
        lambda: store.request_cancel(4242),
        lambda: store.is_cancel_requested(4242),
        lambda: store.log_epoch(4242, phase=0, epoch=0, train_loss=1.0, train_accuracy=0.5),
        lambda: store.finish_run(4242, status="failed"),
        lambda: store.save_split(4242, []),
        lambda: store.get_split(4242),
        lambda: store.save_evaluation(4242, **_evaluation_kwargs()),
        lambda: store.get_evaluations(4242),
        lambda: store.save_artifact(4242, kind="model", path="m", sha256="0" * 64, size_bytes=1),
        lambda: store.get_artifacts(4242),
        lambda: store.get_epochs(4242),
        lambda: store.delete_run(4242),
    ]
    for call in calls:
        with pytest.raises(RunNotFoundError, match="no run with id 4242"):
            call()


# -- queue, cancellation, recovery -------------------------------------------------------------


def test_cancel_flow(store: RunStore) -> None:
    queued = _new_run(store)
    store.request_cancel(queued)
    run = store.get_run(queued)
    assert (run.status, run.cancel_requested) == ("cancelled", True)
    assert run.finished_at is not None
    assert store.is_cancel_requested(queued)
    with pytest.raises(StoreError, match="cancelled"):
        store.start_run(queued, environment={})
    assert store.claim_next_queued(worker_id="w") is None

    running = _started_run(store)
    assert not store.is_cancel_requested(running)
    store.request_cancel(running)
    assert store.is_cancel_requested(running)
    assert store.get_run(running).status == "running"  # the training loop stops it
    store.finish_run(running, status="cancelled")
    assert store.get_run(running).status == "cancelled"

    finished = _started_run(store)
    store.finish_run(finished, status="completed")
    store.request_cancel(finished)
    assert store.get_run(finished).status == "completed"
    assert not store.is_cancel_requested(finished)


def test_claim_next_queued_takes_oldest_first(store: RunStore) -> None:
    first, second = _new_run(store), _new_run(store)
    claimed = store.claim_next_queued(worker_id="w1", environment={"device": "GPU"})
    assert claimed is not None
    assert (claimed.id, claimed.status, claimed.worker_id, claimed.pid) == (first, "running", "w1", os.getpid())
    assert claimed.environment == {"device": "GPU"}
    assert store.claim_next_queued(worker_id="w2").id == second
    assert store.claim_next_queued(worker_id="w3") is None


def test_claim_next_queued_from_many_threads_never_duplicates(store: RunStore) -> None:
    run_ids = {_new_run(store) for _ in range(40)}
    claimed: list[int] = []
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            while (run := store.claim_next_queued(worker_id=f"thread{n}")) is not None:
                claimed.append(run.id)
        except BaseException as exc:  # noqa: BLE001 - the thread reports every failure to the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(claimed) == sorted(run_ids)


def test_stale_heartbeat_is_recovered_as_interrupted(store: RunStore) -> None:
    stale = _started_run(store)
    fresh = _started_run(store)
    with store._engines.reader.begin() as conn:
        old = datetime.now(UTC) - timedelta(hours=2)
        if conn.dialect.name == "sqlite":
            old = old.replace(tzinfo=None)
        conn.execute(sa.text("UPDATE runs SET heartbeat_at = :old WHERE id = :id"), {"old": old, "id": stale})
    assert store.recover_interrupted(stale_after_s=3600) == [stale]
    run = store.get_run(stale)
    assert run.status == "interrupted"
    assert "no heartbeat" in run.error
    assert run.finished_at is not None
    assert store.get_run(fresh).status == "running"
    assert store.recover_interrupted(stale_after_s=3600) == []


def test_killed_worker_is_marked_interrupted_when_an_entry_point_opens_the_store(store: RunStore, db_url: str) -> None:
    alive_here = _started_run(store)
    code = (
        "import sys, time\n"
        "from bcd_engine.store import Protocol, RunStore\n"
        "store = RunStore(sys.argv[1])\n"
        "run_id = store.create_run(backbone='b', protocol=Protocol.holdout(), config={})\n"
        "store.start_run(run_id, environment={})\n"
        "print(run_id, flush=True)\n"
        "time.sleep(300)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, db_url], stdout=subprocess.PIPE, text=True, env=subprocess_env()
    )
    try:
        run_id = int(child.stdout.readline())
        assert store.get_run(run_id).status == "running"
        assert store.get_run(run_id).pid == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    with RunStore(db_url) as reopened:
        assert reopened.get_run(run_id).status == "running"  # only RunStore.open recovers
    with RunStore.open(db_url) as reopened:
        run = reopened.get_run(run_id)
    assert run.status == "interrupted"
    assert f"pid {child.pid}" in run.error
    assert store.get_run(alive_here).status == "running"


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_sqlite_store_deleted_or_replaced_under_a_running_process_says_so(tmp_path: Path, how: str) -> None:
    url = f"sqlite:///{tmp_path / 'results.db'}"
    store = RunStore.open(url)
    run_id = _new_run(store, status="running")
    store.log_epoch(run_id, phase=1, epoch=1, train_loss=1.0, train_accuracy=0.5)
    for path in tmp_path.glob("results.db*"):
        path.unlink()
    if how == "replaced":
        RunStore.open(url).close()  # e.g. the dashboard started again and made a new, empty store
    with pytest.raises(StoreError, match="was deleted or replaced while this process was using it"):
        store.log_epoch(run_id, phase=1, epoch=2, train_loss=0.5, train_accuracy=0.7)
    with pytest.raises(StoreError, match="deleted or replaced"):
        store.list_runs()


def test_revision_changes_with_every_write_a_view_shows(store: RunStore, tmp_path: Path) -> None:
    from helpers import scored_evaluation

    seen = [store.revision()]

    def changed() -> bool:
        seen.append(store.revision())
        return seen[-1] != seen[-2]

    run_id = store.create_run(backbone="resnet50", protocol=Protocol.holdout(), config={"data_dir": str(tmp_path)})
    assert changed()
    assert store.revision() == seen[-1]  # reading does not change it
    store.start_run(run_id, environment={})
    assert changed()
    store.heartbeat(run_id)
    assert not changed()  # no view shows a heartbeat
    store.log_epoch(run_id, phase=0, epoch=1, train_loss=0.5, train_accuracy=0.8)
    assert changed()
    store.update_run_config(run_id, {"data_dir": str(tmp_path), "class_names": ["Benign"]})
    assert changed()
    dataset_id = store.register_dataset(name="d", data_dir=tmp_path, n_images=4, class_counts={"Benign": 4})
    assert changed()
    store.set_run_dataset(run_id, dataset_id)
    assert changed()
    evaluation_id = store.save_evaluation(
        run_id, **scored_evaluation("test", [f"{tmp_path}/Benign/a.png"] * 4, str(tmp_path), right=1.0, seed=0)
    )
    assert changed()
    store.finish_run(run_id, status="completed", test_accuracy=1.0)
    assert changed()
    store.add_evaluation_metrics(evaluation_id, {"ece_calibrated": 0.01})  # e.g. by calibrate: no new row
    assert changed()
    store.add_evaluation_metrics(evaluation_id, {"ece_calibrated": 0.02})  # the same key, a new value
    assert changed()
    store.save_artifact(run_id, kind="model", path="run-1/model.keras", sha256="0" * 64, size_bytes=1)
    assert changed()
    store.delete_run(run_id)
    assert changed()
    with pytest.raises(RunNotFoundError):
        store.finish_run(run_id, status="failed")
    assert not changed()  # a write that failed changed nothing
