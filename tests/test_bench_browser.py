"""The researcher's bench in a real browser (issue 27): the Explorer's dataset handed to Train, the weights folder's
ImageNet file as the default, the protocols on the Train page, cancel asked once and shown as cancelled with the
run's curves kept, and Compare saying what differs between runs. Screenshots go to test-artifacts/bench-*.png.

No model is trained: this test plays the worker itself (it claims the run the page queues, logs its epochs and
closes it as cancelled), and a live worker heartbeat keeps the app from starting a real one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
from pathlib import Path

import pytest
from browser import (
    SHOTS,
    check,
    launched_browser,
    open_page,
    require_browser,
    settle,
    streamlit_server,
    tour_shot,
)
from helpers import PROJECT_ROOT, completed_run, scored_evaluation, subprocess_env

from bcd_engine.protocols import jobs as protocol_jobs
from bcd_engine.store import JobQueue, Protocol, RunStore
from bcd_engine.training import worker

playwright_api = require_browser()


def _tuned(db: RunStore, run_id: int, **train) -> None:
    config = db.get_run(run_id).config
    db.update_run_config(run_id, {**config, "train": {**config["train"], **train}})


def _bench_store(db: RunStore, data: Path, other: Path) -> None:
    """Three runs on two datasets (Compare selects the best two at first: on different datasets, with other
    settings; one's temperature made its test ECE worse, as in the issue) and a finished classical baseline."""
    paths = sorted(str(p) for p in data.glob("*/*.png"))
    ece_case = scored_evaluation("test", paths[::3], str(data), right=0.85, seed=1)
    ece_case["metrics"] = {**ece_case["metrics"], "ece": 0.043, "ece_calibrated": 0.080, "temperature": 1.32}
    resnet = completed_run(db, "resnet50", Protocol.holdout(), str(data), [ece_case])
    recipe = {"learning_rate": 0.001, "epochs": 15, "augment": {"factor": 8}, "tta_views": 8, "dense_units": 256}
    _tuned(db, resnet, **recipe)
    faster = {**recipe, "learning_rate": 0.0003, "augment": {"factor": 1}, "tta_views": 1}
    slower = completed_run(
        db,
        "resnet50",
        Protocol.holdout(),
        str(data),
        [scored_evaluation("test", paths[1::3], str(data), right=0.6, seed=2)],
    )
    _tuned(db, slower, **faster)
    elsewhere = sorted(str(p) for p in other.glob("*/*.png"))
    best = completed_run(
        db,
        "resnet50",
        Protocol.holdout(),
        str(other),
        [scored_evaluation("test", elsewhere[::3], str(other), right=1.0, seed=3)],
    )
    _tuned(db, best, **faster)
    jobs = JobQueue(db)
    baseline_id = protocol_jobs.queue_baseline(db, data, folds=2)
    job = jobs.claim_next(worker_id="bench")
    jobs.finish(baseline_id, status="completed", result=protocol_jobs.run_job(db, job))


@pytest.fixture(scope="module")
def bench(tmp_path_factory, synthetic_dataset):
    """A running dashboard on a prepared store, with a weights folder holding a ResNet50 ImageNet file."""
    tmp = tmp_path_factory.mktemp("bench")
    data = Path(shutil.copytree(synthetic_dataset, tmp / "Original"))
    other = Path(shutil.copytree(synthetic_dataset, tmp / "Segmented"))
    weights = tmp / "weights"
    weights.mkdir()
    (weights / "resnet50_imagenet_notop.weights.h5").touch()  # named as ../shared has it; never loaded here
    url = f"sqlite:///{tmp / 'results.db'}"
    env = {
        **subprocess_env(),
        "BCD_DATABASE_URL": url,
        "BCD_ARTIFACTS_DIR": str(tmp / "artifacts"),
        "BCD_CACHE_DIR": str(tmp / "cache"),
        "BCD_WEIGHTS_DIR": str(weights),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        # No reloading of edited modules mid-test: a reloaded store module makes a second Protocol class.
        "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none",
    }
    env.pop("BCD_DEMO_MODE", None)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("BCD_DATABASE_URL", "BCD_ARTIFACTS_DIR", "BCD_CACHE_DIR"):
            patch.setenv(name, env[name])
        db = RunStore.open(url)
        _bench_store(db, data, other)
        stop = threading.Event()

        def beat() -> None:  # "a worker is alive": the app starts none, and this test trains nothing
            while not stop.is_set():
                worker.write_heartbeat(worker_id="bench")
                stop.wait(5)

        threading.Thread(target=beat, daemon=True).start()
        try:
            with streamlit_server(cwd=PROJECT_ROOT, env=env, log_path=tmp / "streamlit.log") as (base, _server):
                yield base, db, data
        finally:
            stop.set()


@pytest.fixture(scope="module")
def browser():
    with launched_browser(playwright_api) as chromium:
        yield chromium


def test_the_researchers_bench_in_a_browser(bench, browser):
    base, db, data = bench
    page = open_page(browser, base, "", "Dataset explorer")
    page.get_by_text("Local folder", exact=True).click()
    page.get_by_label("Folder with one subfolder per class").fill(str(data))
    page.keyboard.press("Enter")
    settle(page)
    page.get_by_role("button", name="Train on this dataset").click()
    page.get_by_role("heading", name="Train").first.wait_for(timeout=60_000)
    settle(page)
    check(page, "bench-train-from-explorer")
    assert f"Original: 48 images ({data})" in page.content()  # the Dataset box shows it

    backbones = page.locator('[data-testid="stMultiSelect"]').first.locator("input")
    backbones.click()
    page.keyboard.press("Backspace")  # mobilenetv2 out ...
    backbones.fill("resnet50")
    page.get_by_role("option", name="resnet50", exact=True).click()  # ... resnet50 in
    page.keyboard.press("Escape")
    settle(page)
    check(page, "bench-train-weights-default")
    assert "ImageNet, from the weights folder (resnet50_imagenet_notop.weights.h5)" in page.content()

    page.get_by_text("k-fold cross-validation", exact=True).first.click()
    settle(page)
    assert page.get_by_role("button", name="Queue cross-validation").count() == 1
    check(page, "bench-train-cv")
    tour_shot(page, "train-protocols", from_heading="Train", above=20)
    page.get_by_text("Leave one dataset out", exact=True).first.click()
    settle(page)
    check(page, "bench-train-lodo")
    page.get_by_text("Hold-out", exact=True).first.click()
    settle(page)

    page.get_by_role("button", name="Train demo model").click()  # queued and remembered by this visitor
    try:
        page.get_by_text("(scratch_cnn) is queued").first.wait_for(timeout=120_000)
    finally:
        page.screenshot(path=str(SHOTS / "bench-train-queued.png"))
    run = db.claim_next_queued(worker_id="bench")  # this test is the worker
    for epoch in range(1, 4):
        db.log_epoch(
            run.id,
            phase=1,
            epoch=epoch,
            train_loss=1 / epoch,
            train_accuracy=0.5 + epoch / 10,
            val_loss=1.2 / epoch,
            val_accuracy=0.45 + epoch / 10,
        )
    page.get_by_role("button", name="Cancel", exact=True).wait_for(timeout=30_000)
    page.get_by_role("button", name="Cancel", exact=True).click()
    page.get_by_text(f"Stop run {run.id}?").wait_for(timeout=30_000)
    check(page, "bench-cancel-confirm")
    page.get_by_role("button", name="Yes, stop it").click()
    with contextlib.suppress(Exception):
        page.get_by_text("stopping at its next check").wait_for(timeout=15_000)
    assert db.is_cancel_requested(run.id)
    db.finish_run(run.id, status="cancelled", error="cancelled by user")
    page.get_by_text(f"Run {run.id} (scratch_cnn) was cancelled").wait_for(timeout=30_000)
    settle(page)
    check(page, "bench-cancelled")
    page.close()

    page = open_page(browser, base, "compare", "Compare runs")
    page.get_by_role("heading", name="What differs between these runs").wait_for(timeout=60_000)
    page.locator(".js-plotly-plot").nth(3).wait_for(timeout=60_000)
    assert page.get_by_text("not comparable").count() >= 1
    assert page.get_by_text("ECE 0.043 → 0.080").count() >= 1
    check(page, "bench-compare")
    tour_shot(page, "compare-what-differs", from_heading="What differs between these runs", above=80)
    heading = page.get_by_role("heading", name="Reliability: does the model's confidence match how often it is right?")
    heading.scroll_into_view_if_needed()
    page.mouse.wheel(0, -100)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(SHOTS / "bench-compare-reliability.png"))
    page.close()
    assert json.loads(json.dumps(JobQueue(db).list()[0].result))  # the baseline's result is stored as JSON
