"""Class mode with several students at once, in a real browser: click to curves, click to confusion matrix.

Starts the app in demo mode on an empty temporary store with the class packs of ``--packs`` (default: a pack of
the SYNTHETIC demo set made here, VGG16 with random weights at 32 px, 4 views), opens the app once, then
``--students`` tabs of the Train page. The first training (one tab alone) starts the class worker and is
reported as ``cold``; then every tab clicks **Train this head** at once and each tab's times from its click to
its first curves and to its confusion matrix are reported.

    python benchmarks/bench_class_mode.py [--packs DIR] [--students 3] [--epochs 20] [--json]
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

DEADLINE_S = 600


def log(msg: str) -> None:
    print(f"[bench_class_mode] {msg}", file=sys.stderr, flush=True)


def set_epochs(page, epochs: int) -> None:
    page.get_by_role("slider", name="Epochs").focus()
    page.keyboard.press("Home")
    for _ in range(epochs - 1):
        page.keyboard.press("ArrowRight")
    wait_script_done(page)


def time_trainings(pages, numbers: list[int]) -> list[dict]:
    """Click Train on every page (its training ``numbers[i]`` of the tab), then each page's seconds to its first
    curves and to its confusion matrix."""
    clicked = []
    for page in pages:
        page.get_by_role("button", name="Train this head").click()
        clicked.append(time.monotonic())
    times = [{"curves_s": None, "matrix_s": None} for _ in pages]
    while any(t["matrix_s"] is None for t in times) and time.monotonic() - clicked[0] < DEADLINE_S:
        for page, start, t, number in zip(pages, clicked, times, numbers):
            if t["matrix_s"] is not None:
                continue
            done = page.get_by_role("heading", name=f"Training {number}:").count() > 0
            if t["curves_s"] is None and (done or page.get_by_text(f"Training {number}: epoch").count()):
                t["curves_s"] = round(time.monotonic() - start, 1)
            if done:
                t["matrix_s"] = round(time.monotonic() - start, 1)
        pages[0].wait_for_timeout(100)
    for page, t in zip(pages, times):
        check_no_exception(page, "class mode")
        summary = page.get_by_text("s of computing").last
        t["summary"] = summary.inner_text() if summary.count() else None
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packs", help="folder of class packs (default: a SYNTHETIC demo-set pack made here)")
    parser.add_argument("--students", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from bcd_engine.classroom import find_packs, prepare_pack, save_pack

    with tempfile.TemporaryDirectory(prefix="bench-class-") as tmp:
        packs_dir = Path(args.packs) if args.packs else Path(tmp) / "packs"
        if not args.packs:
            started = time.monotonic()
            save_pack(prepare_pack(None, use_feature_cache=False), packs_dir)
            log(f"SYNTHETIC pack made in {time.monotonic() - started:.0f} s")
        packs, _ = find_packs(packs_dir)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "BCD_DEMO_MODE": "1",
            "BCD_DATABASE_URL": f"sqlite:///{tmp}/results.db",
            "BCD_ARTIFACTS_DIR": f"{tmp}/artifacts",
            "BCD_CACHE_DIR": f"{tmp}/cache",
            "BCD_CLASS_DIR": str(packs_dir),
        }
        with open(Path(tmp) / "server.log", "wb") as server_log:
            server, base = start_server(env, server_log)
            try:
                with sync_playwright() as p:
                    browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                    first = browser.new_page()
                    first.goto(base)
                    wait_script_done(first)  # the app's first visit sets its navigation
                    first.close()
                    pages = []
                    for _ in range(args.students):
                        page = browser.new_page(viewport={"width": 1400, "height": 2400})
                        page.goto(f"{base}/train")
                        page.get_by_role("heading", name="Class mode").wait_for(timeout=120_000)
                        wait_script_done(page)
                        set_epochs(page, args.epochs)
                        pages.append(page)
                    cold = time_trainings(pages[:1], [1])[0]
                    log(f"cold (starts the class worker): {cold}")
                    warm = time_trainings(pages, [2] + [1] * (args.students - 1))
                    browser.close()
            finally:
                kill_group(server.pid)
                with contextlib.suppress(Exception):
                    server.wait(10)
    result = {
        "machine": machine(),
        "packs": [pack.to_dict() | {"name": pack.name} for pack in packs],
        "students": args.students,
        "epochs": args.epochs,
        "cold": cold,
        "at_once": warm,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"cold: click to curves {cold['curves_s']} s, to confusion matrix {cold['matrix_s']} s")
        for i, t in enumerate(warm, start=1):
            print(
                f"student {i} of {args.students} at once: click to curves {t['curves_s']} s, "
                f"to confusion matrix {t['matrix_s']} s ({t['summary']})"
            )


if __name__ == "__main__":
    main()
