"""Tests of the run store (bcd_engine.store) on SQLite and, when configured, PostgreSQL."""
from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from store_fixtures import db_url, store, subprocess_env  # noqa: F401  (pytest fixtures)

from bcd_engine.errors import RunNotFoundError, StoreError
from bcd_engine.store import (
    ArtifactRecord,
    DatasetRecord,
    EpochRecord,
    PredictionRecord,
    RocCurve,
    RunRecord,
    RunStore,
)
from bcd_engine.store.models import Base
from bcd_engine.store.store import _ALEMBIC_INI, _script, make_engine, normalize_url

TABLES = {
    "datasets",
    "runs",
    "epochs",
    "split_assignments",
    "evaluations",
    "roc_points",
    "predictions",
    "artifacts",
}
CLASSES = ["ALL", "AML", "normal"]


def _engine(url: str) -> sa.Engine:
    return make_engine(normalize_url(url))


def _new_run(store: RunStore, **kwargs: object) -> int:
    return store.create_run(backbone="efficientnetb0", protocol="holdout-group-aware", config={}, **kwargs)


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
    with store._engine.connect() as conn:
        assert TABLES <= set(sa.inspect(conn).get_table_names())
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert context.get_current_revision() == _script().get_current_head()
        assert compare_metadata(context, Base.metadata) == []


def test_database_at_initial_revision_upgrades_and_keeps_its_rows(db_url: str) -> None:
    engine = _engine(db_url)
    with engine.begin() as conn:
        config = Config(str(_ALEMBIC_INI))
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        conn.execute(
            sa.text(
                "INSERT INTO runs (backbone, protocol, config, status, created_at, cancel_requested) "
                "VALUES ('resnet50', 'holdout', '{}', 'completed', :now, false)"
            ),
            {"now": datetime(2025, 1, 1)},
        )
    engine.dispose()
    with RunStore(db_url) as store, store._engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == _script().get_current_head()
        [run] = store.list_runs()
        assert (run.backbone, run.status) == ("resnet50", "completed")


def test_opening_a_database_at_head_does_not_write(db_url: str) -> None:
    RunStore(db_url).close()
    statements: list[str] = []

    def record(conn, cursor, statement, *args) -> None:  # noqa: ANN001
        statements.append(statement)

    before = os.stat(db_url.removeprefix("sqlite:///")) if db_url.startswith("sqlite") else None
    sa.event.listen(sa.Engine, "before_cursor_execute", record)
    try:
        RunStore(db_url).close()
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", record)
    assert statements, "opening should at least read the schema revision"
    write = re.compile(r"\s*(INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|BEGIN IMMEDIATE)", re.I)
    writes = [s for s in statements if write.match(s)]
    assert writes == []
    if before is not None:
        after = os.stat(db_url.removeprefix("sqlite:///"))
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_database_newer_than_the_code_is_refused(db_url: str) -> None:
    RunStore(db_url).close()
    engine = _engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    with pytest.raises(StoreError, match="9999_future"):
        RunStore(db_url)


def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new-folder' / 'results.db'}"
    with RunStore(url) as store, store._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert (tmp_path / "new-folder" / "results.db").is_file()


def test_default_url_comes_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BCD_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    with RunStore() as store:
        assert store.url == f"sqlite:///{tmp_path / 'env.db'}"
    assert (tmp_path / "env.db").is_file()


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
def test_unusable_url_raises_one_line_store_error(url: str, shown: str) -> None:
    with pytest.raises(StoreError) as caught:
        RunStore(url)
    message = str(caught.value)
    assert "\n" not in message
    assert shown in message
    assert "secret" not in message
    assert not Path("/nonexistent-dir").exists()


# -- records round-trip ------------------------------------------------------------------------


def test_dataset_round_trip_and_reregistration(store: RunStore) -> None:
    first = store.register_dataset(name="C-NMC", root="/data/cnmc", n_images=10, class_counts={"ALL": 6, "hem": 4})
    other = store.register_dataset(name="ALL-IDB", root=Path("/data/allidb"), n_images=3, class_counts={"ALL": 3})
    again = store.register_dataset(name="C-NMC v2", root="/data/cnmc", n_images=12, class_counts={"ALL": 7, "hem": 5})
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


def test_run_lifecycle_round_trip(store: RunStore) -> None:
    config = {"backbone": "efficientnetb0", "image_size": 224, "lr": [1e-3, 1e-5], "nested": {"seed": 7}}
    run_id = store.create_run(backbone="efficientnetb0", protocol="holdout-group-aware", config=config)
    queued = store.get_run(run_id)
    assert isinstance(queued, RunRecord)
    assert (queued.status, queued.config, queued.started_at, queued.cancel_requested) == ("queued", config, None, False)

    store.start_run(run_id, environment={"tensorflow": "2.16.1", "device": "CPU"}, worker_id="w1")
    running = store.get_run(run_id)
    assert running.status == "running"
    assert (running.host, running.pid, running.worker_id) == (socket.gethostname(), os.getpid(), "w1")
    assert running.environment == {"tensorflow": "2.16.1", "device": "CPU"}
    assert running.started_at is not None and running.heartbeat_at is not None
    assert running.started_at.tzinfo == timezone.utc

    store.heartbeat(run_id)
    assert store.get_run(run_id).heartbeat_at >= running.heartbeat_at
    store.finish_run(run_id, status="completed", test_accuracy=0.91, macro_auc=0.97)
    done = store.get_run(run_id)
    assert (done.status, done.test_accuracy, done.macro_auc, done.error) == ("completed", 0.91, 0.97, None)
    assert done.finished_at >= done.started_at
    assert done.seconds == pytest.approx((done.finished_at - done.started_at).total_seconds())

    with pytest.raises(StoreError, match="completed"):
        store.start_run(run_id, environment={})
    with pytest.raises(ValueError, match="running"):
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
    with store._engine.begin() as conn:
        conn.execute(sa.text("UPDATE runs SET host = 'other-host' WHERE id = :id"), {"id": elsewhere})
    with pytest.raises(StoreError, match="running .*other-host"):
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
    store.log_epoch(run_id, phase=1, epoch=0, train_loss=0.4, train_accuracy=0.85, val_loss=0.5,
                    val_accuracy=0.8, learning_rate=1e-5, seconds=12.5)
    store.log_epoch(run_id, phase=0, epoch=1, train_loss=math.nan, train_accuracy=0.7)
    store.log_epoch(run_id, phase=0, epoch=0, train_loss=0.9, train_accuracy=0.6)
    epochs = store.get_epochs(run_id)
    assert all(isinstance(e, EpochRecord) for e in epochs)
    assert [(e.phase, e.epoch) for e in epochs] == [(0, 0), (0, 1), (1, 0)]
    assert epochs[1].train_loss is None
    assert epochs[2] == EpochRecord(run_id, 1, 0, 0.4, 0.85, 0.5, 0.8, 1e-5, 12.5)
    with pytest.raises(StoreError):  # (run_id, phase, epoch) is unique
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
    with pytest.raises(ValueError, match="subset"):
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
    with pytest.raises(KeyError):
        store.save_evaluation(run_id, **kwargs)
    kwargs = _evaluation_kwargs()
    kwargs["roc"]["AML"]["tpr"] = [0.0]
    with pytest.raises(ValueError):
        store.save_evaluation(run_id, **kwargs)
    assert store.get_evaluations(run_id) == []
    with store._engine.connect() as conn:
        for table in ("evaluations", "roc_points", "predictions"):
            assert conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() == 0


def test_artifact_round_trip(store: RunStore) -> None:
    run_id = _started_run(store)
    artifact_id = store.save_artifact(run_id, kind="model", path=Path("/artifacts/1/model.keras"),
                                      sha256="ab" * 32, size_bytes=5_000_000_000)
    [artifact] = store.get_artifacts(run_id)
    assert isinstance(artifact, ArtifactRecord)
    assert (artifact.id, artifact.run_id, artifact.kind, artifact.path, artifact.sha256, artifact.size_bytes) == (
        artifact_id, run_id, "model", "/artifacts/1/model.keras", "ab" * 32, 5_000_000_000
    )


# -- constraints, deletion, errors -------------------------------------------------------------


def test_status_constraint_rejects_unknown_status(store: RunStore) -> None:
    with pytest.raises(StoreError, match="ck_runs_status"):
        _new_run(store, status="exploded")
    assert store.list_runs() == []
    run_id = _new_run(store)
    with pytest.raises(sa.exc.IntegrityError), store._engine.begin() as conn:
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
    with pytest.raises(RunNotFoundError):
        store.get_run(doomed)
    with store._engine.connect() as conn:
        for table in ("split_assignments", "evaluations", "roc_points", "predictions", "artifacts"):
            assert conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() == 0, table
        assert conn.execute(sa.text("SELECT count(*) FROM epochs")).scalar() == 1
    assert len(store.get_epochs(keep)) == 1
    with pytest.raises(RunNotFoundError):
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
        except BaseException as exc:  # noqa: BLE001 - reported below
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
    with store._engine.begin() as conn:
        old = datetime.now(timezone.utc) - timedelta(hours=2)
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


def test_killed_worker_is_marked_interrupted_when_a_store_opens(store: RunStore, db_url: str) -> None:
    alive_here = _started_run(store)
    code = (
        "import sys, time\n"
        "from bcd_engine.store import RunStore\n"
        "store = RunStore(sys.argv[1])\n"
        "run_id = store.create_run(backbone='b', protocol='p', config={})\n"
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
        run = reopened.get_run(run_id)
    assert run.status == "interrupted"
    assert f"pid {child.pid}" in run.error
    assert store.get_run(alive_here).status == "running"
