"""Plain helpers for the tests that drive the running app in a real browser (Playwright on Debian's chromium)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT

CHROMIUM = "/usr/bin/chromium"
SHOTS = PROJECT_ROOT / "test-artifacts"


def require_browser():
    """Skip the calling test module unless chromium and playwright are installed; the playwright API."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)", allow_module_level=True)
    return pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


@contextlib.contextmanager
def launched_browser(playwright_api) -> Iterator:
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield chromium
        chromium.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def streamlit_server(
    *, cwd: Path, env: dict[str, str], log_path: Path, wrap=lambda command: command
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``streamlit run app.py`` in ``cwd`` until the block ends: (base URL, the server process).

    ``wrap`` may change the command line (e.g. to drop root's powers).
    """
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "app.py",
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--browser.gatherUsageStats",
        "false",
    ]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            wrap(command), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).read() == b"ok":
                        break
                except OSError:
                    pass
                assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
            yield base, server
        finally:
            kill_group(server.pid)
            server.wait(10)


def open_page(browser, base: str, path: str, heading: str):
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    page.goto(f"{base}/{path}")
    page.get_by_role("heading", name=heading).first.wait_for(timeout=90_000)
    settle(page)
    return page


def settle(page) -> None:
    """Wait until Streamlit has finished running the script (its status widget goes away)."""
    page.wait_for_timeout(1000)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=120_000)
    page.wait_for_timeout(1500)  # charts and data grids draw after the script ends


def tour_shot(page, name: str, *, from_heading: str | None = None, above: int = 20) -> None:
    """With ``BCD_TOUR_DIR`` set, save 1000 px of the page (from its top, or from ``above`` px over the heading
    ``from_heading``)
    there as ``<name>.png``, for the README's tour:
    ``BCD_TOUR_DIR=docs/tour python -m pytest tests/test_e2e_browser.py``."""
    if not os.environ.get("BCD_TOUR_DIR"):
        return
    folder = Path(os.environ["BCD_TOUR_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    heading = None if from_heading is None else page.get_by_role("heading", name=from_heading).first
    top = 0 if heading is None else heading.bounding_box()["y"] - above
    page.screenshot(
        path=str(folder / f"{name}.png"),
        full_page=True,
        clip={"x": 0, "y": top, "width": page.viewport_size["width"], "height": 1000},
    )


def check(page, name: str, *, tour: bool = False) -> None:
    """Save a screenshot as ``test-artifacts/<name>.png`` and fail if the page shows an exception or lacks the
    sidebar's "not a medical device" note; with ``tour`` also :func:`tour_shot` of its top."""
    SHOTS.mkdir(exist_ok=True)
    page.mouse.move(0, 0)  # no tooltip of the last button clicked in the picture
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    if tour:
        tour_shot(page, name)
    exceptions = page.locator('[data-testid="stException"]')
    assert exceptions.count() == 0, exceptions.first.inner_text()
    assert "Traceback" not in page.content()
    assert page.locator('[data-testid="stSidebar"]').get_by_text("not a medical device").count() == 1, name
