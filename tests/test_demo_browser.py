"""The hosted demo as a hostile visitor meets it, in a real browser.

The app runs in demo mode from a read-only copy of the project, with a read-only run store and models
(as a container ships them) and without root's powers, so file permissions bind it. The visitor finds
no path input and no server path, archives that expand far past the upload budget are refused while the
server's resident memory stays bounded, a near-cap 16-bit image stays within a memory bound, and a
crafted file name never reaches the file system.
"""

from __future__ import annotations

import io
import math
import re
import shutil
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from browser import check, launched_browser, open_page, require_browser, settle, streamlit_server
from helpers import PROJECT_ROOT, read_only_tree, unprivileged, workspace_store
from PIL import Image

from bcd_engine.inference.diagnosis import MAX_UPLOAD_IMAGE_PIXELS
from bcd_engine.models.config import AugmentConfig, TrainConfig
from bcd_engine.training.run import train

playwright_api = require_browser()

HOSTILE_RISE_LIMIT = 500 * 2**20  # the bound on what a hostile visitor may add to the server's memory
APP_FILES = ["app.py", ".streamlit/config.toml", "bcd_engine", "pages", "ui"]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class PeakMemory:
    """The peak resident memory of a process, sampled every 20 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.start, self.peak = pid, _rss(pid), 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss(self.pid))

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def rise(self) -> int:
        return self.peak - self.start


@pytest.fixture(scope="module")
def demo(tmp_path_factory, synthetic_dataset):
    """(base URL, server process, folders a visitor must never see) of the demo, served read-only."""
    tmp = tmp_path_factory.mktemp("demo")
    shipped = tmp / "shipped"
    with pytest.MonkeyPatch.context() as patch:
        store = workspace_store(shipped, patch)
        config = TrainConfig(
            backbone="scratch_cnn",
            image_size=32,
            epochs=1,
            batch_size=8,
            dense_units=8,
            augment=AugmentConfig(factor=1),
        )
        train(config, synthetic_dataset, store=store)
        store.close()
    shutil.rmtree(shipped / "cache")
    project = tmp / "project"
    for name in APP_FILES:
        source, target = PROJECT_ROOT / name, project / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    server_tmp = tmp / "server-tmp"
    server_tmp.mkdir()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp),
        "TMPDIR": str(server_tmp),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "BCD_DEMO_MODE": "1",
        "BCD_DATABASE_URL": f"sqlite:///{shipped / 'results.db'}",
        "BCD_ARTIFACTS_DIR": str(shipped / "artifacts"),
    }  # no BCD_CACHE_DIR: caches must find a place
    with (
        read_only_tree(project),
        read_only_tree(shipped),
        streamlit_server(cwd=project, env=env, log_path=tmp / "streamlit.log", wrap=unprivileged) as (base, server),
    ):
        yield base, server, [str(tmp), str(PROJECT_ROOT), str(Path.home())], server_tmp
    assert sorted(p.name for p in shipped.iterdir()) == ["artifacts", "results.db"], "the store was written to"


@pytest.fixture(scope="module")
def browser():
    with launched_browser(playwright_api) as chromium:
        yield chromium


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _smear(root: Path, i: int) -> bytes:
    """The i-th image of the synthetic set the demo's model was trained on (one it answers for)."""
    return sorted(root.glob("*/*.png"))[i].read_bytes()


def _diagnose_page(browser, base: str, smears: Path):
    page = open_page(browser, base, "diagnose", "Diagnose images")
    page.locator('input[type="file"]').set_input_files(
        files=[{"name": "smear.png", "mimeType": "image/png", "buffer": _smear(smears, 0)}]
    )
    page.get_by_text("Predicted class").wait_for(timeout=120_000)  # the model is loaded and warm
    settle(page)
    return page


def test_no_page_offers_a_path_input_or_shows_a_server_path(demo, browser):
    base, _server, private, server_tmp = demo
    for path, heading, name in [
        ("", "Dataset explorer", "demo-explorer"),
        ("train", "Train", "demo-train"),
        ("compare", "Compare runs", "demo-compare"),
        ("diagnose", "Diagnose images", "demo-diagnose"),
    ]:
        page = open_page(browser, base, path, heading)
        check(page, name)
        assert page.get_by_text("Demo mode").count() >= 1
        assert page.locator('[data-testid="stTextInput"]').count() == 0, f"{name}: a text input in demo mode"
        assert page.get_by_label(re.compile("folder|path", re.IGNORECASE)).count() == 0
        html = page.content()
        for folder in private:
            assert folder not in html, f"{name} shows the server path {folder}"
        page.close()
    # The read-only project had no room for caches: the demo set was drawn in the private temporary folder.
    assert any(server_tmp.glob("bcd-cache*/synthetic-demo/*/*.png"))


def test_archives_expanding_far_past_the_budget_are_refused_with_memory_bounded(demo, browser, synthetic_dataset):
    base, server, _private, _tmp = demo
    page = _diagnose_page(browser, base, synthetic_dataset)
    # Each member passes the ratio check (about 50x: 20 KB of noise, then zeros), each archive is 2 MB,
    # and together they would expand to 500 MB, twice the upload's budget.
    noise = np.random.default_rng(1).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    member = b"\x89PNG\r\n\x1a\n" + noise + bytes(2**20 - 8 - len(noise))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(100):
            zf.writestr(f"cells/{i:03d}.png", member)
    files = [{"name": f"batch{i}.zip", "mimeType": "application/zip", "buffer": archive.getvalue()} for i in range(5)]
    with PeakMemory(server.pid) as memory:
        page.locator('input[type="file"]').set_input_files(files=files)
        page.get_by_text("Images diagnosed").wait_for(timeout=180_000)
        settle(page)
    check(page, "demo-hostile-archives")
    refusals = page.locator("p").filter(has_text=re.compile(r"batch\d\.zip cannot be used"))
    texts = refusals.all_inner_texts()
    assert len(texts) >= 3 and all(re.search(r"256(\.0)? MB", text) for text in texts), texts
    assert memory.rise <= HOSTILE_RISE_LIMIT, f"server memory rose {memory.rise / 2**20:.0f} MB"
    print(f"\n5 archives of 2 MB expanding to 500 MB: refused {texts}; server memory rose {memory.rise / 2**20:.0f} MB")
    page.close()


def test_a_near_cap_16_bit_image_stays_within_a_memory_bound(demo, browser, synthetic_dataset):
    base, server, _private, _tmp = demo
    _diagnose_page(browser, base, synthetic_dataset).close()  # the model loaded and warm
    page = open_page(browser, base, "diagnose", "Diagnose images")  # an empty uploader: deep.png alone
    side = math.isqrt(MAX_UPLOAD_IMAGE_PIXELS) // 100 * 100  # 4400: 19.4 million pixels, under the 20 million cap
    ramp = (np.arange(side, dtype=np.uint32) * 9 % 65536).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()).save(buffer, format="PNG")
    with PeakMemory(server.pid) as memory:
        page.locator('input[type="file"]').set_input_files(
            files=[{"name": "deep.png", "mimeType": "image/png", "buffer": buffer.getvalue()}]
        )
        page.get_by_role("heading", name="deep.png").wait_for(timeout=120_000)
        settle(page)
    # A ramp is no smear: the out-of-domain gate refuses it (that it was decoded at all is what is measured).
    page.get_by_text("does not look like the images the model was trained on").wait_for(timeout=10_000)
    check(page, "demo-16-bit")
    # 19.4 MP at 16 bits is 39 MB as decoded; the 8-bit RGB image 58 MB. Before the band-wise conversion a
    # 49 MP one took the server 1.3 GB.
    assert memory.rise <= HOSTILE_RISE_LIMIT, f"server memory rose {memory.rise / 2**20:.0f} MB"
    print(
        f"\n16-bit {side}x{side} PNG ({len(buffer.getvalue()) / 2**10:.0f} KB): "
        f"server memory rose {memory.rise / 2**20:.0f} MB"
    )
    page.close()


def test_a_crafted_file_name_never_reaches_the_file_system(demo, browser):
    base, _server, _private, _tmp = demo
    page = open_page(browser, base, "diagnose", "Diagnose images")
    page.locator('input[type="file"]').set_input_files(
        files=[
            {"name": "../../../../etc/passwd.png", "mimeType": "image/png", "buffer": b"not the server's file"},
            {"name": "%2e%2e%2fetc%2fshadow.png", "mimeType": "image/png", "buffer": b"nor this one"},
        ]
    )
    page.get_by_text("cannot be used").first.wait_for(timeout=60_000)
    settle(page)
    check(page, "demo-crafted-names")
    text = page.inner_text("body")
    assert text.count("not a recognised image format") >= 2  # judged by the bytes sent, as names mean nothing
    assert "root:" not in text
    # A query string cannot bring a folder input back either.
    page.goto(f"{base}/?explorer_source=Local+folder&explorer_folder=/etc")
    page.get_by_role("heading", name="Dataset explorer").first.wait_for(timeout=60_000)
    settle(page)
    assert page.locator('[data-testid="stTextInput"]').count() == 0
    assert "/etc" not in page.inner_text("body")
    page.close()


def test_visitors_waiting_at_once_all_get_answers(demo, browser, synthetic_dataset):
    base, _server, _private, _tmp = demo
    pages = [open_page(browser, base, "diagnose", "Diagnose images") for _ in range(3)]
    started = time.monotonic()
    for i, page in enumerate(pages):
        page.locator('input[type="file"]').set_input_files(
            files=[{"name": f"smear{i}.png", "mimeType": "image/png", "buffer": _smear(synthetic_dataset, 10 + i)}]
        )
    for page in pages:
        page.get_by_text("Predicted class").wait_for(timeout=120_000)
    assert time.monotonic() - started < 120
    for page in pages:
        page.close()


def test_an_image_unlike_the_training_images_gets_no_answer(demo, browser):
    base, _server, _private, _tmp = demo
    page = open_page(browser, base, "diagnose", "Diagnose images")
    blank = np.full((64, 64, 3), 255, np.uint8)
    page.locator('input[type="file"]').set_input_files(
        files=[{"name": "blank.png", "mimeType": "image/png", "buffer": _png(blank)}]
    )
    page.get_by_text("does not look like the images the model was trained on").wait_for(timeout=120_000)
    settle(page)
    check(page, "demo-out-of-domain")
    assert page.get_by_text("Predicted class").count() == 0  # no class is offered as the answer
    assert page.get_by_text("calibrated probability").count() == 0
    assert page.get_by_role("heading", name=re.compile("^Looks like")).count() == 0  # no answer in words
    assert page.get_by_text("Unusualness score").count() == 1
    assert page.get_by_text("What you can do").count() == 1  # the image is shown, with the next steps
    assert page.get_by_text("The image as the model saw it").count() == 1
    page.close()


def test_a_visitor_tries_the_examples_and_each_is_answered_in_words(demo, browser):
    """Demo mode's default model is the SYNTHETIC run, and every example one click away gets an answer (none refused
    by its gate), led by its words; no Deploy button; the glossary names each class."""
    base, _server, _private, _tmp = demo
    page = open_page(browser, base, "diagnose", "Diagnose images")
    assert page.get_by_role("button", name="Deploy").count() == 0
    examples = page.locator('[class*="st-key-diagnose_example_"] button')
    count = examples.count()
    assert count >= 4, count
    for i in range(count):
        page.locator(f".st-key-diagnose_example_{i} button").click()
        page.get_by_text("Predicted class").wait_for(timeout=120_000)
        settle(page)
        assert page.get_by_text("does not look like the images the model was trained on").count() == 0, i
        assert page.get_by_role("heading", name=re.compile("^Looks like drawn")).count() == 1, i  # words lead
        if i == 0:
            check(page, "demo-example-answer")
    page.get_by_text("What the classes mean", exact=True).click()
    settle(page)
    assert page.get_by_text("SYNTHETIC drawing, not medical data").count() >= 4
    check(page, "demo-glossary")
    page.close()
