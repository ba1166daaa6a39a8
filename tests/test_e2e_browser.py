"""End to end in a real browser: the app under `streamlit run`, driven by Playwright on Debian's chromium.

Trains the demo model through the Train page (the app's own worker process trains it), then diagnoses an
uploaded image. Screenshots of every page go to test-artifacts/.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT, subprocess_env

from bcd_engine.store import RunStore

CHROMIUM = "/usr/bin/chromium"
SHOTS = PROJECT_ROOT / "test-artifacts"
TRAIN_DEADLINE_S = 240

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A running dashboard on an empty isolated store: (base URL, database URL, cache folder)."""
    tmp = tmp_path_factory.mktemp("e2e")
    url = f"sqlite:///{tmp / 'results.db'}"
    env = {**subprocess_env(), "BCD_DATABASE_URL": url, "BCD_ARTIFACTS_DIR": str(tmp / "artifacts"),
           "BCD_CACHE_DIR": str(tmp / "cache"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("BCD_DEMO_MODE", None)
    port = _free_port()
    log = open(tmp / "streamlit.log", "wb")  # noqa: SIM115 - open while the server runs, closed in the finally
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp / "streamlit.log").read_text()[-3000:]
            time.sleep(0.5)
        yield base, url, tmp / "cache"
    finally:
        _kill(server.pid)
        server.wait(10)
        log.close()
        with contextlib.suppress(OSError, ValueError, KeyError):  # the worker runs in its own session:
            _kill(json.loads((tmp / "cache" / "worker.json").read_text())["pid"])  # kill it by the pid it noted


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


def _open(browser, base: str, path: str, heading: str):
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    page.goto(f"{base}/{path}")
    page.get_by_role("heading", name=heading).first.wait_for(timeout=90_000)
    _settle(page)
    return page


def _settle(page) -> None:
    """Wait until Streamlit has finished running the script (its status widget goes away)."""
    page.wait_for_timeout(1000)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=120_000)
    page.wait_for_timeout(1500)  # charts and data grids draw after the script ends


def _check(page, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    exceptions = page.locator('[data-testid="stException"]')
    assert exceptions.count() == 0, exceptions.first.inner_text()
    assert "Traceback" not in page.content()


def test_pages_train_demo_model_and_diagnose(app, browser):
    base, url, _cache = app
    for path, heading, name in [("", "Dataset explorer", "explorer-empty"),
                                ("compare", "Compare runs", "compare-empty"),
                                ("diagnose", "Diagnose images", "diagnose-empty")]:
        page = _open(browser, base, path, heading)
        _check(page, name)
        page.close()

    page = _open(browser, base, "train", "Train")
    _check(page, "train-empty")
    page.get_by_role("button", name="Train demo model").click()
    page.get_by_text("Queued run 1").wait_for(timeout=60_000)
    store = RunStore(url)
    deadline = time.monotonic() + TRAIN_DEADLINE_S
    seen_running = False
    while (status := store.get_run(1).status) in ("queued", "running"):
        if status == "running" and not seen_running and store.get_epochs(1):
            seen_running = True
            page.wait_for_timeout(3500)  # one fragment refresh: the live curves
            _check(page, "train-running")
        assert time.monotonic() < deadline, f"run 1 still {status} after {TRAIN_DEADLINE_S} s"
        time.sleep(1)
    assert status == "completed", store.get_run(1).error
    page.close()

    page = _open(browser, base, "compare", "Compare runs")
    page.get_by_role("heading", name="Confusion matrices").wait_for(timeout=60_000)
    page.locator(".js-plotly-plot").nth(2).wait_for(timeout=60_000)  # curves, confusion matrix, ROC drawn
    page.wait_for_timeout(2000)
    _check(page, "compare")
    page.close()

    page = _open(browser, base, "diagnose", "Diagnose images")
    demo_image = next((_cache / "synthetic-demo" / "Pro").glob("*.png"))
    page.locator('input[type="file"]').set_input_files(str(demo_image))
    try:
        page.get_by_text("Predicted class").wait_for(timeout=120_000)
    finally:
        page.screenshot(path=str(SHOTS / "diagnose-after-upload.png"), full_page=True)
    _settle(page)
    _check(page, "diagnose")
    page.locator('input[type="file"]').set_input_files(
        files=[{"name": "broken.png", "mimeType": "image/png", "buffer": b"not an image at all"}])
    page.get_by_text("cannot be used").wait_for(timeout=60_000)
    _check(page, "diagnose-bad-file")
    others = sorted((_cache / "synthetic-demo" / "Benign").glob("*.png"))[:2]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.png", others[0].read_bytes())
    page.locator('input[type="file"]').set_input_files(files=[
        *[{"name": p.name, "mimeType": "image/png", "buffer": p.read_bytes()} for p in others],
        {"name": "broken.png", "mimeType": "image/png", "buffer": b"not an image at all"},
        {"name": "evil.zip", "mimeType": "application/zip", "buffer": archive.getvalue()},
    ])
    page.get_by_text("Images diagnosed").wait_for(timeout=120_000)
    # The reason is shown in the message above the table (the table may render it too).
    page.locator("p").filter(has_text="evil.zip cannot be used").filter(
        has_text="unsafe member path").first.wait_for(timeout=10_000)
    _settle(page)
    _check(page, "diagnose-batch")
    assert page.get_by_role("button", name="Download results (CSV)").count() == 1
    page.close()
