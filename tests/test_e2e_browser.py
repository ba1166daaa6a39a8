"""End to end in a real browser: the app under `streamlit run`, driven by Playwright on Debian's chromium.

Trains the demo model through the Train page (the app's own worker process trains it), then diagnoses an
uploaded image. Screenshots of every page go to test-artifacts/.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import zipfile

import pytest
from browser import (
    SHOTS,
    check,
    kill_group,
    launched_browser,
    open_page,
    require_browser,
    settle,
    streamlit_server,
    tour_shot,
)
from helpers import PROJECT_ROOT, subprocess_env

from bcd_engine.store import RunStore

TRAIN_DEADLINE_S = 240

playwright_api = require_browser()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A running dashboard on an empty isolated store: (base URL, database URL, cache folder)."""
    tmp = tmp_path_factory.mktemp("e2e")
    url = f"sqlite:///{tmp / 'results.db'}"
    env = {
        **subprocess_env(),
        "BCD_DATABASE_URL": url,
        "BCD_ARTIFACTS_DIR": str(tmp / "artifacts"),
        "BCD_CACHE_DIR": str(tmp / "cache"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    env.pop("BCD_DEMO_MODE", None)
    try:
        with streamlit_server(cwd=PROJECT_ROOT, env=env, log_path=tmp / "streamlit.log") as (base, _server):
            yield base, url, tmp / "cache"
    finally:
        with contextlib.suppress(OSError, ValueError, KeyError):  # the worker runs in its own session:
            kill_group(json.loads((tmp / "cache" / "worker.json").read_text())["pid"])  # kill it by the pid it noted


@pytest.fixture(scope="module")
def browser():
    with launched_browser(playwright_api) as chromium:
        yield chromium


def uploader(page):
    """The page's one file input, once the uploader an upload replaced has gone (Diagnose renews it per upload)."""
    page.wait_for_function("document.querySelectorAll('input[type=file]').length === 1", timeout=60_000)
    return page.locator('input[type="file"]')


def test_pages_train_demo_model_and_diagnose(app, browser):
    base, url, _cache = app
    for path, heading, name in [
        ("", "Dataset explorer", "explorer"),
        ("compare", "Compare runs", "compare-empty"),
        ("diagnose", "Diagnose images", "diagnose-empty"),
    ]:
        page = open_page(browser, base, path, heading)
        check(page, name, tour=name == "explorer")
        page.close()
    page = open_page(browser, base, "", "Dataset explorer")
    page.get_by_text("Download the ALL dataset (Kaggle)").click()
    settle(page)
    check(page, "explorer-kaggle")  # a page that stops early keeps the sidebar's note
    page.close()

    page = open_page(browser, base, "train", "Train")
    check(page, "train-empty")
    page.get_by_role("button", name="Train demo model").click()
    page.get_by_text("Run 1 (scratch_cnn) is").first.wait_for(timeout=60_000)
    store = RunStore(url)
    deadline = time.monotonic() + TRAIN_DEADLINE_S
    seen_running = False
    while (status := store.get_run(1).status) in ("queued", "running"):
        if status == "running" and not seen_running and store.get_epochs(1):
            seen_running = True
            page.wait_for_timeout(3500)  # one fragment refresh: the live curves
            check(page, "train-running")
            tour_shot(page, "train-running", from_heading="Queue and recent runs", above=120)
        assert time.monotonic() < deadline, f"run 1 still {status} after {TRAIN_DEADLINE_S} s"
        time.sleep(1)
    assert status == "completed", store.get_run(1).error
    page.get_by_text("Run 1 (scratch_cnn) finished in").wait_for(timeout=10_000)  # the next refresh says so
    settle(page)
    check(page, "train-done")
    tour_shot(page, "train-done", from_heading="Queue and recent runs", above=200)
    page.get_by_role("link", name="Compare run 1").click()  # ... and leads to the run's results
    page.get_by_role("heading", name="Confusion matrices").wait_for(timeout=60_000)
    assert "run=1" in page.url
    page.locator(".js-plotly-plot").nth(2).wait_for(timeout=60_000)  # curves, confusion matrix, ROC drawn
    page.wait_for_timeout(2000)
    check(page, "compare")
    tour_shot(page, "compare", from_heading="Accuracy with 95% confidence intervals, and the shortcut audit")
    page.close()

    page = open_page(browser, base, "diagnose", "Diagnose images")
    demo_image = next((_cache / "synthetic-demo" / "Pro").glob("*.png"))
    uploader(page).set_input_files(str(demo_image))
    try:
        page.get_by_text("Predicted class").wait_for(timeout=120_000)
    finally:
        page.screenshot(path=str(SHOTS / "diagnose-after-upload.png"), full_page=True)
    settle(page)
    check(page, "diagnose", tour=True)
    uploader(page).set_input_files(
        files=[{"name": "broken.png", "mimeType": "image/png", "buffer": b"not an image at all"}]
    )
    page.get_by_text("cannot be used").wait_for(timeout=60_000)
    check(page, "diagnose-bad-file")
    others = sorted((_cache / "synthetic-demo" / "Benign").glob("*.png"))[:2]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.png", others[0].read_bytes())
    uploader(page).set_input_files(
        files=[
            *[{"name": p.name, "mimeType": "image/png", "buffer": p.read_bytes()} for p in others],
            {"name": "broken.png", "mimeType": "image/png", "buffer": b"not an image at all"},
            {"name": "evil.zip", "mimeType": "application/zip", "buffer": archive.getvalue()},
        ]
    )
    page.get_by_text("Images diagnosed").wait_for(timeout=120_000)
    # The reason is shown in the message above the table (the table may render it too).
    page.locator("p").filter(has_text="evil.zip cannot be used").filter(has_text="unsafe member path").first.wait_for(
        timeout=10_000
    )
    settle(page)
    check(page, "diagnose-batch")
    assert page.get_by_role("button", name="Download results (CSV)").count() == 1
    page.close()
