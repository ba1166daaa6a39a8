"""Issue 12's smaller faults: each gives one clear error, leaves nothing half-written and loses nothing."""

from __future__ import annotations

import errno
import io
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bcd_engine.data.images import read_image_bytes
from bcd_engine.data.scan import scan_dataset
from bcd_engine.errors import ConfigError, DataError, ImageLoadError, StoreError, WriteError
from bcd_engine.files import file_sha256
from bcd_engine.inference.diagnosis import sources_from_archive, sources_from_paths
from bcd_engine.inference.loading import load_run_model
from bcd_engine.models.config import MAX_IMAGE_SIZE, TrainConfig
from bcd_engine.models.features import FeatureCache
from bcd_engine.store import Protocol
from bcd_engine.store.artifacts import TRUST_KIND, artifact_file, delete_run, record_artifact, run_folder, trust_path
from bcd_engine.training.run import save_model


def test_scan_refuses_an_oversized_file_without_reading_it(synthetic_dataset_copy: Path, isolated_cache) -> None:
    huge = synthetic_dataset_copy / "Benign" / "huge.jpg"
    with huge.open("wb") as fh:
        fh.truncate(3 * 2**30)  # sparse: 3 GB that a full read would bring into memory
    scan = scan_dataset(synthetic_dataset_copy)
    (record,) = scan.unreadable
    assert record.path == str(huge) and record.error == "file too large: 3,072 MB; the limit is 50 MB"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_pipe_named_jpg_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "smear.jpg"
    os.mkfifo(fifo)
    outcome: dict = {}

    def read() -> None:
        try:
            read_image_bytes(fifo)
        except ImageLoadError as exc:
            outcome["error"] = str(exc)
        outcome["sources"] = sources_from_paths([fifo])

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "reading a pipe blocked"
    assert outcome["error"] == "not a regular file (a pipe, device or socket)"
    assert [s.name for s in outcome["sources"]] == [str(fifo)]


def test_an_image_size_past_the_cap_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=f"image size must be at most {MAX_IMAGE_SIZE} px, got 100000"):
        TrainConfig.for_backbone("mobilenetv2", image_size=100_000)


@pytest.mark.parametrize(
    ("root", "message"),
    [
        ("~nosuchuser_bcd/data", r"dataset folder '~nosuchuser_bcd/data' cannot be used"),
        ("x\0y", r"dataset folder 'x\\x00y' cannot be (used|read)"),
        ("/tmp/" + "a" * 300, r"^dataset folder '/tmp/a{20,}\.\.\. cannot be read: File name too long$"),
    ],
)
def test_a_path_no_system_accepts_is_a_data_error(root: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        scan_dataset(root)


def test_an_empty_zip_says_so() -> None:
    buffer = io.BytesIO()
    zipfile.ZipFile(buffer, "w").close()
    (source,) = sources_from_archive(buffer.getvalue(), name="empty.zip")
    assert source.name == "empty.zip" and source.data is None
    assert source.error == "the archive holds no files (only folders or hidden files, or none)"


def test_a_model_that_keras_safe_mode_refuses_is_a_store_error(workspace, tmp_path: Path) -> None:
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    run_id = workspace.create_run(
        backbone="mobilenetv2",
        protocol=Protocol.holdout(),
        status="running",
        config={"train": TrainConfig(backbone="mobilenetv2").to_dict(), "class_names": []},
    )
    workspace.start_run(run_id, environment={})
    path = save_model(model, run_id)
    workspace.save_artifact(
        run_id, kind="model", path=f"run-{run_id}/model.keras", sha256=file_sha256(path), size_bytes=path.stat().st_size
    )
    workspace.finish_run(run_id, status="completed")
    with pytest.raises(StoreError, match=rf"model file of run {run_id} cannot be loaded safely \(ValueError"):
        load_run_model(run_id, store=workspace)


def test_starting_a_claimed_run_keeps_the_worker_id_of_the_claim(workspace) -> None:
    run_id = workspace.create_run(backbone="scratch_cnn", protocol=Protocol.holdout(), config={})
    assert workspace.claim_next_queued(worker_id="ray:node-1").id == run_id
    workspace.start_run(run_id, environment={"device": "cpu"})
    assert workspace.get_run(run_id).worker_id == "ray:node-1"


class _FullDisk:
    """A model whose save writes half a file and then finds the disk full."""

    def save(self, path) -> None:
        Path(path).write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_artifacts_disk_is_a_write_error_and_leaves_no_file(workspace, tmp_path: Path) -> None:
    with pytest.raises(WriteError, match=r"cannot save the model of run 7 to .*model\.keras: No space left on device"):
        save_model(_FullDisk(), 7)
    assert list((tmp_path / "artifacts" / "run-7").iterdir()) == []


def test_a_full_feature_cache_disk_only_warns_and_leaves_no_stray_file(tmp_path: Path, monkeypatch) -> None:
    cache = FeatureCache({"format": 1}, root=tmp_path / "features")
    cache.put("abc:0", np.ones(4, np.float32))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.warns(RuntimeWarning, match="could not write the feature cache .*No space left on device"):
        cache.save()
    assert list((tmp_path / "features").iterdir()) == []
    assert cache.get("abc:0") is not None  # this run keeps its features


def test_deleting_a_run_removes_its_model_files_too(workspace, tmp_path: Path) -> None:
    run_id = workspace.create_run(backbone="scratch_cnn", protocol=Protocol.holdout(), config={})
    model = run_folder(run_id) / "model.keras"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"a model")
    other = run_folder(run_id + 1) / "model.keras"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"another run's model")
    delete_run(workspace, run_id)
    assert not model.parent.exists() and other.exists()
    assert workspace.list_runs() == []


def test_a_recorded_file_is_used_only_inside_the_artifacts_folder_and_with_its_sha256(workspace, tmp_path) -> None:
    run_id = workspace.create_run(backbone="scratch_cnn", protocol=Protocol.holdout(), config={})
    assert artifact_file(run_id, TRUST_KIND, store=workspace) is None  # none recorded: a run from before gates
    gate = trust_path(run_id)
    gate.parent.mkdir(parents=True)
    gate.write_bytes(b"a gate")
    record_artifact(workspace, run_id, kind=TRUST_KIND, path=gate)
    assert artifact_file(run_id, TRUST_KIND, store=workspace) == (gate.resolve(), file_sha256(gate))

    gate.write_bytes(b"another gate")
    with pytest.raises(StoreError, match=rf"OOD gate of run {run_id} does not match its recorded sha256"):
        artifact_file(run_id, TRUST_KIND, store=workspace)
    outside = tmp_path / "elsewhere.npz"
    outside.write_bytes(b"a gate")
    workspace.save_artifact(run_id, kind=TRUST_KIND, path=str(outside), sha256=file_sha256(outside), size_bytes=6)
    with pytest.raises(StoreError, match=rf"OOD gate of run {run_id} lies outside the artifacts folder"):
        artifact_file(run_id, TRUST_KIND, store=workspace)
    workspace.save_artifact(run_id, kind=TRUST_KIND, path="../elsewhere.npz", sha256=file_sha256(outside), size_bytes=6)
    with pytest.raises(StoreError, match="outside the artifacts folder"):
        artifact_file(run_id, TRUST_KIND, store=workspace)
    workspace.save_artifact(run_id, kind=TRUST_KIND, path=f"run-{run_id}/gone.npz", sha256="0" * 64, size_bytes=6)
    with pytest.raises(StoreError, match="is missing"):
        artifact_file(run_id, TRUST_KIND, store=workspace)
