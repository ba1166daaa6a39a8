"""A newcomer's first minutes on the Train page, in a real browser: how long runs take from click to done.

Starts the app under `streamlit run` on an empty temporary store (the app's own worker trains, as for a
user) and drives Debian's chromium through Playwright:

1. the demo model: from the click on "Train demo model" until the page says "Run 1 (...) finished";
2. two queued runs: two clicks in a row, from the first click until the second run's "finished".

For each run it also prints how long the run waited in the queue (store: started minus queued), which is
where a worker that is not started, or believed alive when it is gone, shows up.

    python benchmarks/bench_newcomer.py [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dashboard import (  # noqa: E402 - after the path set-up above
    CHROMIUM,
    CHROMIUM_ARGS,
    check_no_exception,
    kill_group,
    machine,
    start_server,
    wait_script_done,
)

DEADLINE_MS = 600_000


def log(msg: str) -> None:
    print(f"[bench_newcomer] {msg}", file=sys.stderr, flush=True)


def queue_waits(url: str, run_ids: list[int]) -> dict[int, float]:
    """Seconds each run waited in the queue: started minus queued, from the store."""
    from bcd_engine.store import RunStore

    runs = {run.id: run for run in RunStore(url).list_runs()}
    return {i: round((runs[i].started_at - runs[i].created_at).total_seconds(), 1) for i in run_ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="bench-newcomer-"))
    url = f"sqlite:///{tmp / 'results.db'}"
    env = {
        **os.environ,
        "BCD_DATABASE_URL": url,
        "BCD_ARTIFACTS_DIR": str(tmp / "artifacts"),
        "BCD_CACHE_DIR": str(tmp / "cache"),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("BCD_DEMO_MODE", None)
    figures: dict = {"machine": machine()}
    with open(tmp / "streamlit.log", "wb") as server_log:
        server, base = start_server(env, server_log)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 2400})
                page.goto(f"{base}/train")
                page.get_by_role("heading", level=1, name="Train").wait_for(timeout=120_000)
                wait_script_done(page)
                button = page.get_by_role("button", name="Train demo model")

                t0 = time.perf_counter()
                button.click()
                page.get_by_text("Run 1 (scratch_cnn) finished in").wait_for(timeout=DEADLINE_MS)
                figures["demo_model_click_to_finished_s"] = round(time.perf_counter() - t0, 1)
                log(f"demo model: {figures['demo_model_click_to_finished_s']} s")

                t0 = time.perf_counter()
                button.click()
                page.get_by_text("Run 2 (scratch_cnn) is").first.wait_for(timeout=60_000)
                wait_script_done(page)
                button.click()
                page.get_by_text("Run 3 (scratch_cnn) finished in").wait_for(timeout=DEADLINE_MS)
                figures["two_runs_first_click_to_second_finished_s"] = round(time.perf_counter() - t0, 1)
                log(f"two queued runs: {figures['two_runs_first_click_to_second_finished_s']} s")
                check_no_exception(page, "/train")
                browser.close()
        finally:
            kill_group(server.pid)
            with contextlib.suppress(OSError, ValueError, KeyError):
                kill_group(json.loads((tmp / "cache" / "worker.json").read_text())["pid"])
    figures["queue_wait_s"] = queue_waits(url, [1, 2, 3])
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"demo model, click to 'finished':                 {figures['demo_model_click_to_finished_s']:6.1f} s")
        print(
            f"two queued runs, first click to second 'finished': "
            f"{figures['two_runs_first_click_to_second_finished_s']:6.1f} s"
        )
        print(
            "queue wait per run (started - queued): "
            + ", ".join(f"run {i}: {s} s" for i, s in figures["queue_wait_s"].items())
        )


if __name__ == "__main__":
    main()
