"""A hosted demo that a visitor cannot reset, mark up or use to see private images (AppTest and the page glue)."""

from __future__ import annotations

import html
import io
import shutil
import threading
import tomllib
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import APP, PROJECT_ROOT, fill_store
from markdown_it import MarkdownIt
from streamlit.runtime.app_session import AppSession
from streamlit.testing.v1 import AppTest

from bcd_engine.inference import diagnosis, loading
from bcd_engine.inference.results import Diagnosis, Reading
from bcd_engine.store import RunStore
from bcd_engine.training import worker
from ui import common

WAIT = 30  # seconds a test waits for an event at most
HOSTILE_NAMES = ["![x](https:evil.example).png", "**Pro 99%** <img src=x>.png", ":red[Benign] #1_a_.png"]


@pytest.fixture(autouse=True)
def isolated(workspace, monkeypatch):
    """The empty ``workspace`` store as the pages' store; no worker process is ever spawned; not in demo mode."""
    monkeypatch.setenv("BCD_DATABASE_URL", workspace.url)
    for name in ("BCD_DEMO_MODE", "BCD_DEMO_DATASETS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(worker, "spawn_worker", lambda: 0)
    return workspace.url


def _clear_cache_message() -> None:
    """What Streamlit does when any client sends ``clear_cache`` on its websocket."""
    AppSession._handle_clear_cache_request(SimpleNamespace(_session_state=SimpleNamespace(clear=lambda: None)))


def test_a_cache_clear_leaves_the_queue_and_its_waiting_jobs_as_they_were():
    queue, gate, started = common.inference_queue(), threading.Event(), threading.Event()

    def blocked():
        started.set()
        assert gate.wait(WAIT)
        yield 1, 1

    running = queue.submit(blocked(), visitor="session clearing")
    assert started.wait(WAIT)
    waiting = queue.submit(blocked(), visitor="session clearing")
    thread, before = queue._thread, queue.waiting
    _clear_cache_message()
    assert common.inference_queue() is queue and queue._thread is thread and thread.is_alive()
    assert queue.waiting == before == 2  # the same jobs wait, and count against the same share
    gate.set()
    assert running.wait(WAIT) and waiting.wait(WAIT)


def test_a_cache_clear_loads_no_second_copy_of_a_model_in_use(isolated, monkeypatch):
    class Model:
        """Stands in for a LoadedModel (weakly referable, like it)."""

    loads = []
    monkeypatch.setattr(loading, "load_run_model", lambda run_id, store: loads.append(run_id) or Model())
    held = common._load_model(1, "identity-1", isolated, "artifacts")  # a queued job holds the model
    _clear_cache_message()
    assert common._load_model(1, "identity-1", isolated, "artifacts") is held and loads == [1]


def test_the_upload_limit_of_the_server_is_the_largest_file_the_engine_takes():
    server = tomllib.loads((PROJECT_ROOT / ".streamlit" / "config.toml").read_text())["server"]
    assert server["maxUploadSize"] * 2**20 == diagnosis.MAX_ARCHIVE_UPLOAD_BYTES
    assert diagnosis.MAX_UPLOAD_BYTES <= diagnosis.MAX_ARCHIVE_UPLOAD_BYTES <= diagnosis.MAX_UPLOAD_TOTAL_BYTES


def test_the_toolbar_offers_no_deploy_button():
    client = tomllib.loads((PROJECT_ROOT / ".streamlit" / "config.toml").read_text())["client"]
    assert client["toolbarMode"] == "viewer"  # Streamlit's Deploy button shows in "auto" and "developer" only


def _shows(markdown: str) -> str:
    """The text a reader sees of ``markdown`` (CommonMark, as Streamlit renders it), failing on any markup."""
    rendered = MarkdownIt("commonmark").enable("strikethrough").renderInline(markdown)
    assert "<" not in rendered.replace("<strong>", "").replace("</strong>", ""), rendered
    return html.unescape(rendered.replace("<strong>", "").replace("</strong>", ""))


@pytest.mark.parametrize("name", [*HOSTILE_NAMES, "a\nb", "&amp; 1. - > ~~x~~ $x$ `c` [l]: http://x"])
def test_plain_text_is_shown_as_it_is(name):
    assert _shows(common.plain(name)) == " ".join(name.splitlines())


class _OutOfDomain:
    """A Diagnoser that finds every usable image out of domain (the page's shortest answer: no heatmap)."""

    run_ids = (1,)

    def diagnose_steps(self, sources, *, keep_images=False, batch_size=16):
        results = [
            Diagnosis.unusable(s.name, s.error)
            if s.error
            else Diagnosis(
                name=s.name,
                predicted_class="Pro",
                reading=Reading.OUT_OF_DOMAIN,
                advice="No answer.",
                ood_score=9.0,
                ood_threshold=1.0,
                in_domain=False,
            )
            for s in sources
        ]
        yield len(sources), len(sources)
        return results


@pytest.fixture
def diagnose_page(isolated, synthetic_dataset, monkeypatch):
    fill_store(RunStore.open(isolated), synthetic_dataset)
    monkeypatch.setattr(common, "load_diagnoser", lambda run_ids: _OutOfDomain())
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/diagnose.py").run()
    assert not at.exception, at.exception
    return at


def test_an_uploaded_files_name_is_shown_as_text(diagnose_page, synthetic_dataset):
    image = next(Path(synthetic_dataset).rglob("*.png")).read_bytes()
    diagnose_page.file_uploader(key="diagnose_upload").set_value((HOSTILE_NAMES[1], image, "image/png")).run()
    assert not diagnose_page.exception, diagnose_page.exception
    assert _shows(diagnose_page.subheader[0].value) == HOSTILE_NAMES[1]


class _Confident:
    """A Diagnoser that answers every image with a confident class (the page's full answer: a heatmap with a
    caption naming the file)."""

    run_ids = (1,)

    def diagnose_steps(self, sources, *, keep_images=False, batch_size=16):
        results = [
            Diagnosis(
                name=s.name,
                predicted_class="Pro",
                reading=Reading.OK,
                advice="Pro.",
                calibrated_probabilities={"Benign": 0.1, "Pro": 0.9},
                uncertainty={"confidence": 0.9, "margin": 0.8, "disagreement": 0.0, "views": 1},
                in_domain=True,
                image=np.zeros((32, 32, 3), np.uint8) if keep_images else None,
            )
            for s in sources
        ]
        yield len(sources), len(sources)
        return results


def test_the_heatmaps_caption_shows_the_files_name_as_text(diagnose_page, synthetic_dataset, monkeypatch):
    monkeypatch.setattr(common, "load_diagnoser", lambda run_ids: _Confident())
    monkeypatch.setattr(common, "grad_cam", lambda run_id, image, class_name: (image, np.zeros(image.shape[:2])))
    image = next(Path(synthetic_dataset).rglob("*.png")).read_bytes()
    diagnose_page.file_uploader(key="diagnose_upload").set_value((HOSTILE_NAMES[0], image, "image/png")).run()
    assert not diagnose_page.exception, diagnose_page.exception
    captions = [img.caption for element in diagnose_page.get("image") for img in element.proto.imgs]
    (caption,) = [caption for caption in captions if "Grad" in caption]  # the page also shows the image alone
    assert _shows(caption) == f"{HOSTILE_NAMES[0]} with Grad-CAM (run 1)"


def test_archive_member_names_are_shown_as_text(diagnose_page, synthetic_dataset):
    image = next(Path(synthetic_dataset).rglob("*.png")).read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in HOSTILE_NAMES:
            archive.writestr(name, b"not an image at all")
        archive.writestr("fine.png", image)
    upload = ("smears *1*.zip", buffer.getvalue(), "application/zip")
    diagnose_page.file_uploader(key="diagnose_upload").set_value(upload).run()
    assert not diagnose_page.exception, diagnose_page.exception
    shown = [_shows(error.value) for error in diagnose_page.error]
    for name in HOSTILE_NAMES:
        assert any(text.startswith(f"smears *1*.zip/{name} cannot be used: ") for text in shown), shown


@pytest.fixture
def private_run(isolated, synthetic_dataset, tmp_path):
    """A store holding runs whose test images are in a folder no visitor may see (not synthetic, not public)."""
    private = shutil.copytree(synthetic_dataset, tmp_path / "private-all")
    (private / "README.txt").unlink()  # no longer marked as the synthetic set
    fill_store(RunStore.open(isolated), private)
    return private


def _compare(monkeypatch, public: Path | None) -> AppTest:
    monkeypatch.setenv("BCD_DEMO_MODE", "1")
    if public is not None:
        monkeypatch.setenv("BCD_DEMO_DATASETS", str(public))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/compare.py").run()
    assert not at.exception, at.exception
    return at


def test_demo_mode_shows_no_image_of_a_private_folder_and_computes_no_audit(private_run, monkeypatch, tmp_path):
    at = _compare(monkeypatch, public=None)
    assert not at.get("image")
    assert any("may not show" in info.value for info in at.info)
    at.toggle(key="compare_gradcam").set_value(True).run()
    assert not at.exception and not at.get("image")
    assert not [b for b in at.button if b.key.startswith("compare_audit_")]
    assert any("computed beforehand" in caption.value for caption in at.caption)
    assert not list((tmp_path / "cache").glob("audits/*"))


def test_demo_mode_shows_the_images_of_a_folder_the_host_made_public(private_run, monkeypatch):
    at = _compare(monkeypatch, public=private_run)
    assert at.get("image")  # the same run's cell, once its folder is listed in BCD_DEMO_DATASETS
