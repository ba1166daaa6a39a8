"""The browser step of deploy/check_container.sh: the Diagnose page of a served app, one image, its answer.

    python deploy/container_browser.py --url http://127.0.0.1:PORT --image smear.png [--shot page.png]

Opens ``URL/diagnose`` in headless Chromium (Debian's /usr/bin/chromium through Playwright, launched as
tests/browser.py launches it), uploads the image, waits for the answer and prints one JSON line on stdout:
``{"answer": "<class>", "confidence": "...", "reading": "<the advice shown>", "run": "<the model chosen>",
"seconds": <upload to answer>}``. Exits 1 with a one-line reason on stderr when the page shows no answer:
no run to choose, an error box, a model that cannot be loaded, an exception, the image refused as unlike
the training images, a missing heatmap, or nothing within the deadline.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import re
import sys
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]  # as tests/browser.py
# Texts the Diagnose page shows instead of an answer (pages/diagnose.py, ui/common.py, bcd_engine/inference).
FAILURES = [
    "No completed runs yet",
    "Cannot use these models",
    "cannot be loaded",
    "cannot be used",
    "does not look like the images the model was trained on",
    "No heatmap for this image",
    "Traceback",
]


class NoAnswer(Exception):
    pass


def settle(page, timeout_s: float) -> None:
    """Wait until Streamlit has finished running the script (its status widget goes away)."""
    page.wait_for_timeout(1000)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=timeout_s * 1000)
    page.wait_for_timeout(1000)


def failure(page) -> str | None:
    """The first sign on the page that there will be no answer, as one line; None when there is none."""
    exceptions = page.locator('[data-testid="stException"]')
    if exceptions.count():
        return "the page shows an exception: " + " ".join(exceptions.first.inner_text().split())[:300]
    body = page.inner_text("body")
    for text in FAILURES:
        if text in body:
            line = next((ln for ln in body.splitlines() if text in ln), text)
            return "the page says: " + " ".join(line.split())[:300]
    return None


def diagnose(browser, url: str, image: Path, timeout_s: float, shot: Path | None) -> dict:
    page = browser.new_page(viewport={"width": 1400, "height": 2000})
    try:
        page.goto(f"{url.rstrip('/')}/diagnose", timeout=timeout_s * 1000)
        page.get_by_role("heading", name="Diagnose images").first.wait_for(timeout=timeout_s * 1000)
        settle(page, timeout_s)
        if (reason := failure(page)) is not None:
            raise NoAnswer(reason)
        # The model chosen by default: the model picker's text without its label.
        picker = page.locator('[data-testid="stMultiSelect"]').first
        run = ""
        if picker.count():
            label = picker.locator('[data-testid="stWidgetLabel"]')
            run = " ".join(picker.inner_text().split())
            if label.count():
                run = run.removeprefix(" ".join(label.first.inner_text().split())).strip()
        uploader = page.locator('input[type="file"]')
        if not uploader.count():
            raise NoAnswer("the Diagnose page has no file uploader")

        started = time.monotonic()
        mime = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
        uploader.set_input_files(files=[{"name": image.name, "mimeType": mime, "buffer": image.read_bytes()}])
        answer = page.locator('[data-testid="stMetric"]').filter(has_text="Predicted class")
        while not answer.count():  # the answer, or the first sign that none will come
            if (reason := failure(page)) is not None:
                raise NoAnswer(reason)
            if time.monotonic() - started > timeout_s:
                raise NoAnswer(f"no answer {timeout_s:.0f} s after the upload")
            page.wait_for_timeout(200)
        seconds = time.monotonic() - started

        settle(page, timeout_s)  # the heatmap and the chart come after the answer: they must not fail either
        if (reason := failure(page)) is not None:
            raise NoAnswer(reason)
        lines = [ln.strip() for ln in answer.first.inner_text().splitlines() if ln.strip()]
        alerts = page.locator('[data-testid="stAlert"]').all_inner_texts()
        advice = next(
            (" ".join(t.split()) for t in alerts if "not a medical device" not in t and "Demo mode" not in t), ""
        )
        advice = re.sub(r"^(check_circle|help|warning|block) ", "", advice)  # the icon's ligature name
        return {
            "answer": lines[1] if len(lines) > 1 else "",
            "confidence": lines[2] if len(lines) > 2 else "",
            "reading": advice,
            "run": run,
            "seconds": round(seconds, 2),
        }
    finally:
        if shot is not None:
            page.screenshot(path=str(shot), full_page=True)
        page.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL of the served app")
    parser.add_argument("--image", required=True, type=Path, help="a smear image to upload")
    parser.add_argument("--timeout", type=float, default=240, help="seconds to wait for each step (default 240)")
    parser.add_argument("--shot", type=Path, help="save a full-page screenshot here")
    args = parser.parse_args()
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("the playwright package is not installed (pip install playwright)", file=sys.stderr)
        return 1
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing (apt-get install chromium)", file=sys.stderr)
        return 1
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                result = diagnose(browser, args.url, args.image, args.timeout, args.shot)
            finally:
                browser.close()
    except NoAnswer as exc:
        print(f"no answer on the Diagnose page: {exc}", file=sys.stderr)
        return 1
    except PlaywrightError as exc:
        print("browser: " + " ".join(str(exc).split())[:300], file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
