"""Dashboard latency in a real browser: first render of each page, and upload-to-prediction on Diagnose.

Trains the demo model with the engine into a temporary store, starts the app under `streamlit run` and
drives Debian's chromium through Playwright, as tests/test_e2e_browser.py does.

    python benchmarks/bench_dashboard.py [--rounds 3] [--uploads 5] [--json]

Page render: from ``page.goto`` until the page's title heading is visible and the script has finished
(Streamlit's running indicator gone), each page in a fresh tab; round 1 is the first visit after the
server started (cold). Prediction: from ``set_input_files`` until the "Predicted class" metric of that
upload is shown, after a first upload has loaded the model. Figures go to stdout (with --json as one JSON
document), logs to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGES = [("", "Dataset explorer"), ("train", "Train"), ("compare", "Compare runs"), ("diagnose", "Diagnose images")]
TIMEOUT_MS = 120_000
# The metric of the upload named `name` is on screen: its image caption shows the name and the metric is not a
# stale leftover of the previous script run.
PREDICTION_SHOWN_JS = """name => {
  const cap = document.querySelector('[data-testid="stImageCaption"]');
  const metric = [...document.querySelectorAll('[data-testid="stMetric"]')]
      .find(m => m.textContent.includes('Predicted class'));
  const val = metric && metric.querySelector('[data-testid="stMetricValue"]');
  return cap && cap.textContent.trim().startsWith(name) && val && val.textContent.trim() !== ''
      && !val.closest('[data-stale="true"]');
}"""


def log(msg: str) -> None:
    print(f"[bench_dashboard] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def summary(times: list[float]) -> dict:
    return {
        "times_s": [round(t, 3) for t in times],
        "median_s": round(statistics.median(times), 3),
        "max_s": round(max(times), 3),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def train_demo_model(url: str) -> float:
    from bcd_engine.data.synthetic import ensure_demo_dataset
    from bcd_engine.store import RunStore
    from bcd_engine.training.queue import demo_config
    from bcd_engine.training.run import train

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # keep Keras' output off stdout
        train(demo_config(), ensure_demo_dataset(), store=RunStore.open(url))
    return time.perf_counter() - t0


def start_server(env: dict, log_file) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [
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
        ],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"{base}/_stcore/health", timeout=2).read() == b"ok":
                return server, base
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("streamlit did not come up; see its log")
        time.sleep(0.2)


def wait_script_done(page) -> None:
    page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for(timeout=TIMEOUT_MS)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=TIMEOUT_MS)


def check_no_exception(page, what: str) -> None:
    exc = page.locator('[data-testid="stException"]')
    if exc.count():
        raise RuntimeError(f"{what}: the app raised: {exc.first.inner_text()[:500]}")


def time_page(browser, base: str, path: str, heading: str) -> float:
    page = browser.new_page(viewport={"width": 1400, "height": 2400})
    try:
        t0 = time.perf_counter()
        page.goto(f"{base}/{path}")
        page.get_by_role("heading", level=1, name=heading).first.wait_for(timeout=TIMEOUT_MS)
        wait_script_done(page)
        elapsed = time.perf_counter() - t0
        check_no_exception(page, f"/{path}")
        return elapsed
    finally:
        page.close()


def clear_uploads(page) -> None:
    """Remove the files already in the uploader (it takes several files, so a new upload would add to them)."""
    # The delete button's test id changed across Streamlit releases: accept both.
    buttons = page.locator('[data-testid="stFileChipDeleteBtn"], [data-testid="stFileUploaderDeleteBtn"] button')
    while buttons.count():
        buttons.first.click()
        wait_script_done(page)


def time_upload(page, image: Path, name: str) -> float:
    clear_uploads(page)
    t0 = time.perf_counter()
    page.locator('input[type="file"]').set_input_files(
        files=[{"name": name, "mimeType": "image/png", "buffer": image.read_bytes()}]
    )
    page.wait_for_function(PREDICTION_SHOWN_JS, arg=name, timeout=TIMEOUT_MS)
    elapsed = time.perf_counter() - t0
    check_no_exception(page, f"upload {name}")
    wait_script_done(page)  # let the chart finish before the next upload
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="visits of each page (round 1 is cold)")
    parser.add_argument("--uploads", type=int, default=5, help="timed uploads after the warm-up upload")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args()
    started = time.perf_counter()

    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="bcd-bench-dashboard-"))
    url = f"sqlite:///{tmp / 'results.db'}"
    env = {"BCD_DATABASE_URL": url, "BCD_ARTIFACTS_DIR": str(tmp / "artifacts"), "BCD_CACHE_DIR": str(tmp / "cache")}
    os.environ.update(env)  # the engine reads them at call time
    os.environ.pop("BCD_DEMO_MODE", None)
    log(f"temporary store in {tmp}; training the demo model ...")
    train_s = train_demo_model(url)
    log(f"trained in {train_s:.1f} s")
    images = sorted((tmp / "cache" / "synthetic-demo").glob("*/*.png"))
    picks = images[:: max(1, len(images) // (args.uploads + 1))][: args.uploads + 1]  # spread over the classes

    server_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log_file = open(tmp / "streamlit.log", "wb")  # noqa: SIM115 - open while the server runs, closed in the finally
    server = None
    try:
        t0 = time.perf_counter()
        server, base = start_server(server_env, log_file)
        server_s = time.perf_counter() - t0
        log(f"streamlit up at {base} in {server_s:.1f} s")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            pages = {}
            for rnd in range(args.rounds):
                for path, heading in PAGES:
                    t = time_page(browser, base, path, heading)
                    pages.setdefault(f"/{path}", {"title": heading, "times": []})["times"].append(t)
                    log(f"round {rnd + 1} /{path}: {t:.3f} s")

            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.goto(f"{base}/diagnose")
            page.get_by_role("heading", level=1, name="Diagnose images").first.wait_for(timeout=TIMEOUT_MS)
            wait_script_done(page)
            names = [f"{i}-{img.name}" for i, img in enumerate(picks)]
            warm_s = time_upload(page, picks[0], names[0])
            log(f"warm-up upload (loads the model) {names[0]}: {warm_s:.3f} s")
            uploads = []
            for img, name in zip(picks[1:], names[1:]):
                uploads.append(time_upload(page, img, name))
                log(f"upload {name}: {uploads[-1]:.3f} s")
            predicted = page.locator('[data-testid="stMetricValue"]').first.inner_text()
            chromium_version = browser.version
            page.close()
            browser.close()
    finally:
        if server is not None:
            kill_group(server.pid)
            server.wait(10)
        log_file.close()
        with contextlib.suppress(OSError, ValueError, KeyError):  # a worker runs in its own session
            kill_group(json.loads((tmp / "cache" / "worker.json").read_text())["pid"])

    shutil.rmtree(tmp, ignore_errors=True)  # kept (with streamlit.log) only when something failed
    import streamlit

    result = {
        "benchmark": "dashboard",
        "machine": {**machine(), "chromium": chromium_version, "streamlit": streamlit.__version__},
        "setup": {"train_demo_model_s": round(train_s, 2), "server_start_s": round(server_s, 2)},
        "page_render": {
            path: {"title": v["title"], "cold_s": round(v["times"][0], 3), **summary(v["times"])}
            for path, v in pages.items()
        },
        "prediction": {
            "warm_up_s": round(warm_s, 3),
            "files": names[1:],
            "last_predicted_class": predicted,
            **summary(uploads),
        },
        "total_s": round(time.perf_counter() - started, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    m = result["machine"]
    print(
        f"machine: {m['cpu_model']}, {m['cores']} cores, load {m['load_avg_1m']}; chromium {m['chromium']}, "
        f"streamlit {m['streamlit']}"
    )
    print(f"setup: demo model trained in {train_s:.1f} s, server up in {server_s:.1f} s")
    print(f"page render over {args.rounds} rounds (cold = first visit):")
    for path, v in result["page_render"].items():
        print(
            f"  {path:<10} {v['title']:<20} cold {v['cold_s']:.3f} s  median {v['median_s']:.3f} s  "
            f"max {v['max_s']:.3f} s"
        )
    pr = result["prediction"]
    print(
        f"upload -> prediction: warm-up {pr['warm_up_s']:.3f} s; {len(uploads)} timed uploads "
        f"median {pr['median_s']:.3f} s  max {pr['max_s']:.3f} s"
    )
    print(f"total {result['total_s']} s")


if __name__ == "__main__":
    main()
