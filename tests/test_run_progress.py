"""Every phase of a run reports its progress (store, log, Train page); a cancelled extraction keeps its features;
the time estimate before queueing."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from helpers import APP
from streamlit.testing.v1 import AppTest

from bcd_engine.errors import RunNotFoundError
from bcd_engine.models.config import AugmentConfig, TrainConfig
from bcd_engine.models.features import FeatureCache
from bcd_engine.progress import describe
from bcd_engine.store import Protocol, RunStore
from bcd_engine.training import estimate, worker

WAIT_S = 120


@pytest.fixture
def page_store(tmp_path, monkeypatch) -> RunStore:
    """A store, artifacts and caches under ``tmp_path`` that the Train page (AppTest) reads too; no worker spawned."""
    url = f"sqlite:///{tmp_path / 'results.db'}"
    monkeypatch.setenv("BCD_DATABASE_URL", url)
    monkeypatch.setenv("BCD_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("BCD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BCD_DEMO_MODE", raising=False)
    monkeypatch.setattr(worker, "spawn_worker", lambda *options: None)
    return RunStore.open(url)


def wait_for(condition, what: str):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"waited {WAIT_S} s for {what}")


def test_feature_cache_chunks_are_merged_on_load_a_damaged_one_is_skipped_and_compaction_keeps_all(tmp_path):
    root = tmp_path / "features"
    first = FeatureCache({"k": 1}, root=root)
    for i in range(3):
        first.put(f"{i:032x}:0", np.full(4, i, np.float32))
    first.save()
    first.put(f"{3:032x}:0", np.full(4, 3, np.float32))
    first.save()
    first.save()  # nothing new: no empty chunk
    assert len(first.chunk_files()) == 2 and not first.path.exists()
    assert len(FeatureCache({"k": 1}, root=root)) == 4
    assert len(FeatureCache({"k": 2}, root=root)) == 0  # another setting, another cache

    newest = first.chunk_files()[-1]
    newest.write_bytes(newest.read_bytes()[:40])  # a chunk cut short (a killed writer without atomic rename)
    damaged = FeatureCache({"k": 1}, root=root)
    assert len(damaged) == 3 and damaged.get(f"{3:032x}:0") is None

    first.compact()
    assert first.chunk_files() == [] and first.path.is_file()
    merged = FeatureCache({"k": 1}, root=root)
    assert len(merged) == 4
    np.testing.assert_array_equal(merged.get(f"{2:032x}:0"), np.full(4, 2, np.float32))


def _slow_forward(release: threading.Event, batches_before_wait: int):
    """A stand-in for features.forward_function: the real pass, then, after ``batches_before_wait`` batches,
    a wait for ``release`` (the test looks at the store and the page meanwhile)."""
    from bcd_engine.models import features

    real = features.forward_function
    calls = {"n": 0}

    def make(extractor, preprocess):
        forward = real(extractor, preprocess)

        def slow(batch):
            calls["n"] += 1
            if calls["n"] > batches_before_wait:
                release.wait(WAIT_S)
            return forward(batch)

        return slow

    return make


def test_a_run_reports_its_extraction_to_the_store_log_and_page_and_a_cancel_keeps_the_features(
    page_store, synthetic_dataset, monkeypatch, caplog
):
    from bcd_engine.models import features
    from bcd_engine.training import monitor
    from bcd_engine.training.run import train

    monkeypatch.setattr(monitor, "PROGRESS_SECONDS", 0.0)  # every batch reaches the store
    monkeypatch.setattr(monitor, "CANCEL_POLL_SECONDS", 0.0)
    release, real_forward = threading.Event(), features.forward_function
    monkeypatch.setattr(features, "forward_function", _slow_forward(release, batches_before_wait=2))
    config = TrainConfig(
        backbone="mobilenetv2",
        weights=None,
        image_size=32,
        epochs=2,
        batch_size=8,
        dense_units=8,
        augment=AugmentConfig(factor=3),
        patience=2,
    )
    run_id = page_store.create_run(backbone="mobilenetv2", protocol=Protocol.holdout(), config={}, status="running")
    outcome = {}
    with caplog.at_level(logging.INFO, logger="bcd.training"):
        trainer = threading.Thread(
            target=lambda: outcome.update(result=train(config, synthetic_dataset, store=page_store, run_id=run_id))
        )
        trainer.start()
        try:

            def two_batches_in():
                progress = page_store.get_progress(run_id)
                extracting = progress is not None and progress.phase == "features (train views)"
                return progress if extracting and progress.done >= 16 else None

            progress = wait_for(two_batches_in, "two batches of training views in the store")
            assert progress.total > progress.done and progress.unit == "view" and progress.rate > 0

            at = AppTest.from_file(APP, default_timeout=WAIT_S)
            at.run()
            at.switch_page("pages/train.py").run()
            assert not at.exception, at.exception
            bars = [e.proto.text for e in at.get("progress")]
            assert any(
                text.startswith(f"Features (train views): 16 of {progress.total} views") and "views/s" in text
                for text in bars
            ), bars

            page_store.request_cancel(run_id)
        finally:
            release.set()
            trainer.join(WAIT_S)
    assert outcome["result"].status == "cancelled"
    lines = [r.getMessage() for r in caplog.records if r.name == "bcd.training"]
    assert any(f"run {run_id}: loading images: 48 of 48 images (100%)" in line for line in lines), lines
    assert any(f"run {run_id}: features (train views): 0 of {progress.total} views" in line for line in lines), lines
    computed = page_store.get_progress(run_id).done
    assert computed >= 16

    monkeypatch.setattr(features, "forward_function", real_forward)
    again = train(config, synthetic_dataset, store=page_store)
    assert again.status == "completed"
    assert again.feature_cache["hits"] == computed  # resumed: the views computed before the cancel are not redone
    assert again.feature_cache["misses"] == progress.total + again.n_val + again.n_test - again.feature_cache["hits"]


def test_the_estimate_comes_from_the_rate_measured_here_and_warns_with_what_would_be_faster(isolated_cache):
    resnet = TrainConfig.for_backbone("resnet50", weights="imagenet")
    rough = estimate.estimate_run(resnet, 3256)
    assert rough.basis == "rough" and "nothing measured on this machine yet" in rough.summary
    n_train, n_val, n_test = estimate.split_sizes(resnet, 3256)
    assert (n_train + n_val + n_test, n_val, n_test) == (3256, 488, 488)
    assert rough.views == n_train * resnet.augment.factor + n_val + n_test * resnet.tta_views

    estimate.record_extraction(resnet, views=estimate.MIN_VIEWS_MEASURED - 1, seconds=1.0, device="CPU: x, 2 cores")
    assert estimate.estimate_run(resnet, 3256).basis == "rough"  # too few views to say anything
    estimate.record_extraction(resnet, views=1000, seconds=100.0, device="CPU: x, 2 cores")
    measured = estimate.estimate_run(resnet, 3256)
    assert measured.basis == "measured" and measured.rate == pytest.approx(10.0)
    assert measured.seconds == pytest.approx(measured.views / 10.0 + estimate.OVERHEAD_S)
    assert measured.seconds > estimate.LONG_ON_CPU_S
    assert "on this machine's CPU" in measured.warning and "a machine with a GPU" in measured.warning
    assert f"fewer augmented views ({resnet.augment.factor // 2} instead of {resnet.augment.factor}" in measured.warning

    small = estimate.estimate_run(TrainConfig.for_backbone("mobilenetv2", weights="imagenet"), 500)
    assert small.basis == "scaled" and small.rate == pytest.approx(10.0 * 4.1 / 0.3)
    assert small.warning is None and small.to_dict()["summary"] == small.summary

    estimate.record_extraction(resnet, views=1000, seconds=100.0, device="GPU: H100 x1")
    assert estimate.estimate_run(resnet, 100_000).warning is None  # long, but not on a CPU


def test_a_runs_progress_is_stored_moves_the_revision_and_reads_back_with_rate_and_time_left(workspace):
    run_id = workspace.create_run(backbone="resnet50", protocol=Protocol.holdout(), config={}, status="running")
    assert workspace.get_progress(run_id) is None
    before = workspace.revision()
    started = datetime.now(UTC) - timedelta(seconds=10)
    phase = "features (train views)"
    workspace.set_progress(run_id, phase=phase, done=200, total=1000, unit="view", started_at=started)
    assert workspace.revision() != before  # a view cached on the revision shows it
    progress = workspace.get_progress(run_id)
    assert (progress.phase, progress.done, progress.total, progress.unit) == (phase, 200, 1000, "view")
    assert progress.fraction == 0.2 and 19 < progress.rate <= 20.1 and 39 < progress.seconds_left < 41
    assert describe(progress).startswith("features (train views): 200 of 1,000 views (20%), 2")
    workspace.set_progress(run_id, phase="saving the model and its evaluation", done=0, total=0, unit="")
    saving = workspace.get_progress(run_id)
    assert saving.fraction is None and saving.rate is None and saving.seconds_left is None
    with pytest.raises(RunNotFoundError):
        workspace.set_progress(9999, phase="x", done=0, total=0, unit="")


def test_the_trust_of_a_frozen_backbone_run_from_its_cached_features_equals_the_one_from_its_images():
    """fit_trust on the head behind the pooled features (what train does when the backbone stayed frozen) gives the
    gate and temperature that running the whole model over the images gives."""
    from bcd_engine.inference.trust import fit_trust
    from bcd_engine.models.backbones import get_backbone
    from bcd_engine.models.features import build_feature_extractor, extract_features
    from bcd_engine.models.head import assemble_model, fit_head_on_features
    from bcd_engine.training.run import _pooled_inputs, _unchanged

    config = TrainConfig(backbone="mobilenetv2", weights=None, image_size=32, epochs=2, dense_units=8, patience=2)
    spec = get_backbone(config.backbone)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(40) % 2
    train, val, test = np.arange(0, 24), np.arange(24, 32), np.arange(32, 40)
    extractor, backbone = build_feature_extractor(spec, config)
    keys = [f"{i:032x}" for i in range(40)]
    features = extract_features(
        extractor,
        images,
        np.arange(40),
        keys,
        np.zeros(40, int),
        preprocess=spec.preprocess(),
        augment=config.augment,
        seed=0,
    )
    head = fit_head_on_features(features[train], labels[train], features[val], labels[val], n_classes=2, config=config)
    model = assemble_model(backbone, head, config)
    test_prob = head.predict(features[test], verbose=0)
    common = dict(train=train, val=val, test=test, test_probabilities=test_prob, batch_size=8)
    whole, whole_metrics = fit_trust(model, images, labels, preprocess=spec.preprocess(), **common)
    pooled = _pooled_inputs(head, 40, [(train, features[train]), (val, features[val]), (test, features[test])])
    cached, cached_metrics = fit_trust(*pooled, labels, preprocess=_unchanged, **common)
    assert cached.temperature == pytest.approx(whole.temperature, rel=1e-3)
    assert cached.gate.threshold == pytest.approx(whole.gate.threshold, rel=1e-3)
    np.testing.assert_allclose(cached.gate.means, whole.gate.means, rtol=1e-4, atol=1e-5)
    assert cached_metrics["ood_flagged"] == whole_metrics["ood_flagged"]


def test_the_train_page_estimates_a_runs_time_before_anything_is_queued(page_store):
    at = AppTest.from_file(APP, default_timeout=WAIT_S)
    at.run()
    at.switch_page("pages/train.py").run()
    next(button for button in at.button if button.label == "Estimate time").click().run()
    assert not at.exception, at.exception
    shown = [element.value for element in [*at.caption, *at.warning]]
    assert any("Estimated time: about" in text and "nothing measured on this machine yet" in text for text in shown)
    assert page_store.list_runs() == []  # estimating queues nothing
