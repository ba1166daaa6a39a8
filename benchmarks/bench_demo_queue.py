"""The hosted demo's one inference queue through Streamlit's own protocol: a cache clear leaves it as it was, and
one visitor's many tabs take one share (issue 23).

Trains a tiny scratch-CNN run on the SYNTHETIC set (32 px, one epoch: the answers do not matter here), serves it
with ``BCD_DEMO_MODE=1 streamlit run app.py`` (store read-only) and drives it with the protocol client
(``streamlit_client.py``: the websocket messages and uploads a browser sends). Each tab's websocket carries an
``X-Forwarded-For`` header: uvicorn, under Streamlit, trusts it from 127.0.0.1, so ``st.context.ip_address`` is
the address given and tabs of one address are one visitor (from 127.0.0.1 alone every tab is its own visitor).
The addresses are labels only; nothing is contacted. Phases:

1. warm-up (the model loads), then visitor B's one image alone: upload-to-answer;
2. visitor A opens ``--tabs`` tabs: the first three each upload a zip of 666 smears (their jobs queue: A's share
   of jobs, and 1,998 of A's 2,000 images a minute), then the others one smear each, all at once: how many are
   refused, with which line, how fast;
3. visitor B uploads one smear beside A's jobs: upload-to-answer;
4. visitor C sends Streamlit's ``clear_cache`` BackMsg (any client may); then A's fourth tab uploads one smear
   again and C one smear. A is still refused by its share when the queue and its jobs are those from before the
   clear (before the fix, the clear made a new queue, with a new thread and a fresh budget). The server's thread
   count (``/proc/<pid>/task``) before and after, and whether A's jobs were still queued, are printed beside.

    python benchmarks/bench_demo_queue.py [--tabs 32] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_demo_load import _answer, demo_server  # noqa: E402 - after the path set-up above
from streamlit_client import StreamlitSession  # noqa: E402

ZIP_IMAGES = 666  # three of them: 1,998 images, within one visitor's 2,000 a minute
ADDRESSES = {"A": "1.1.1.1", "B": "8.8.8.8", "C": "9.9.9.9"}  # global addresses, so each is one visitor
TIMEOUT_S = 180
BEFORE = {
    "tabs": "one visitor's 32 tabs filled the global 32-job queue",
    "beside": "the next visitor told “the server is busy” within 0.5 s",
    "clear": "each clear_cache made a new queue (new thread, fresh 32-job budget): the clearing visitor waited "
    "2.4 s instead of 37 s behind three bombs",
}


def log(message: str) -> None:
    print(f"[bench_demo_queue] {message}", file=sys.stderr, flush=True)


class VisitorTab(StreamlitSession):
    """A tab of the visitor at ``address``, as if through a proxy: its websocket carries ``X-Forwarded-For``."""

    def __init__(self, base: str, address: str) -> None:
        super().__init__(base, "diagnose", headers={"X-Forwarded-For": address})
        self.address = address

    async def clear_cache(self) -> None:
        """Send the ``clear_cache`` BackMsg, as Streamlit's "Clear cache" menu item does."""
        from streamlit.proto.BackMsg_pb2 import BackMsg

        back = BackMsg()
        back.clear_cache = True
        await self._send(back)


def train_tiny_run(folder: Path) -> tuple[str, Path]:
    from bcd_engine.data.synthetic import ensure_demo_dataset
    from bcd_engine.models.config import TrainConfig
    from bcd_engine.store import RunStore
    from bcd_engine.training.run import train

    url = f"sqlite:///{folder / 'results.db'}"
    config = TrainConfig.for_backbone("scratch_cnn", image_size=32, epochs=1, patience=1, batch_size=16, dense_units=16)
    with contextlib.redirect_stdout(sys.stderr):
        train(config, ensure_demo_dataset(), store=RunStore.open(url))
    return url, folder / "artifacts"


def smears() -> list[Path]:
    from bcd_engine.data.synthetic import ensure_demo_dataset

    return sorted(p for p in ensure_demo_dataset().rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def one(path: Path, name: str) -> list[tuple[str, bytes, str]]:
    return [(name, path.read_bytes(), "image/png" if path.suffix.lower() == ".png" else "image/jpeg")]


def zip_of_copies(path: Path, count: int) -> list[tuple[str, bytes, str]]:
    data, archive = path.read_bytes(), io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for i in range(count):
            zf.writestr(f"cells/{i:04d}{path.suffix}", data)
    return [(f"{count}-smears.zip", archive.getvalue(), "application/zip")]


async def open_tabs(base: str, address: str, count: int) -> list[VisitorTab]:
    tabs = [VisitorTab(base, address) for _ in range(count)]
    for start in range(0, count, 8):  # eight at a time: the page's first run is not what is measured
        batch = tabs[start : start + 8]
        await asyncio.gather(*(tab.connect() for tab in batch))
        await asyncio.gather(*(tab.run_page(TIMEOUT_S) for tab in batch))
    return tabs


async def queued_or_refused(tab: VisitorTab, files: list[tuple[str, bytes, str]]) -> str:
    """Upload ``files`` and wait until the job is on the queue (its progress bar drawn) or refused (an alert)."""
    begun = tab.runs_finished
    await tab.upload(files, TIMEOUT_S)
    await tab.wait_for(lambda s: bool(s.texts("progress")) or s.runs_finished > begun, TIMEOUT_S)
    return "queued" if tab.texts("progress") else " / ".join(tab.texts("alert"))[:200]


def threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def refusal(outcome: dict) -> str | None:
    """The share's line in a script run's alerts, if the upload was refused."""
    return next((a for a in outcome.get("alerts", []) if "jobs waiting" in a or "busy" in a or "images in" in a), None)


async def phases(base: str, pid: int, tabs_count: int) -> dict:
    images = smears()
    picks = iter(images * 4)
    result: dict = {}
    b, c = await open_tabs(base, ADDRESSES["B"], 1), await open_tabs(base, ADDRESSES["C"], 1)
    b, c = b[0], c[0]
    await _answer(b, one(next(picks), "warm-up.png"), TIMEOUT_S)  # loads the model
    result["alone_s"] = (await _answer(b, one(next(picks), "alone.png"), TIMEOUT_S))["s"]
    log(f"one image alone: {result['alone_s']:.2f} s; opening {tabs_count} tabs of visitor A")

    tabs = await open_tabs(base, ADDRESSES["A"], tabs_count)
    big = zip_of_copies(images[0], ZIP_IMAGES)
    result["zip_tabs"] = [await queued_or_refused(tab, big) for tab in tabs[:3]]
    zip_runs = [tab.runs_finished for tab in tabs[:3]]  # a zip's job ending finishes its script run
    log(f"A's three zips: {result['zip_tabs']}; the other {tabs_count - 3} tabs upload one smear each")
    outcomes = await asyncio.gather(
        *(_answer(tab, one(next(picks), f"a-{i}.png"), TIMEOUT_S) for i, tab in enumerate(tabs[3:], start=3))
    )
    refused = [refusal(o) for o in outcomes]
    result["single_tabs"] = {
        "tabs": len(outcomes),
        "refused": sum(r is not None for r in refused),
        "answered": sum(o["kind"] == "answer" for o in outcomes),
        "first_refusal": next((r for r in refused if r), None),
        "slowest_refusal_s": max((o["s"] for o, r in zip(outcomes, refused) if r), default=None),
    }
    log(f"A's single-image tabs: {result['single_tabs']}")

    beside = await _answer(b, one(next(picks), "beside.png"), TIMEOUT_S)
    result["beside"] = {"kind": beside["kind"], "s": beside["s"], "refusal": refusal(beside)}
    result["a_progress_before_clear"] = tabs[0].texts("progress")[-1:]
    log(f"B beside A's jobs: {result['beside']}")

    threads_before = threads(pid)
    await c.clear_cache()
    await asyncio.sleep(1.0)  # the server handles the message on its event loop
    after = await _answer(tabs[3], one(next(picks), "a-after-clear.png"), TIMEOUT_S)
    clearing = await _answer(c, one(next(picks), "c-after-clear.png"), TIMEOUT_S)
    result["clear"] = {
        "threads_before": threads_before,
        "threads_after": threads(pid),
        "a_after_clear": refusal(after) or after["kind"],
        "a_after_clear_s": after["s"],
        "clearing_visitor": {"kind": clearing["kind"], "s": clearing["s"], "refusal": refusal(clearing)},
        "a_progress_after_clear": tabs[0].texts("progress")[-1:],
        "a_zip_jobs_ended": sum(tab.runs_finished > runs for tab, runs in zip(tabs[:3], zip_runs)),
    }
    log(f"after clear_cache: {result['clear']}")
    await asyncio.gather(*(tab.close() for tab in [b, c, *tabs]))
    return result


def report(result: dict, tabs: int) -> list[str]:
    single, clear = result["single_tabs"], result["clear"]
    beside = result["beside"]
    beside_text = (
        f"refused: “{beside['refusal']}”"
        if beside["refusal"]
        else f"answered in {beside['s']:.2f} s (alone: {result['alone_s']:.2f} s)"
    )
    clearing = clear["clearing_visitor"]
    lines = [
        "| phase | before (quoted from issue 23) | after |",
        "| --- | --- | --- |",
        f"| visitor A's {tabs} tabs: three zips of {ZIP_IMAGES} smears, then {single['tabs']} single smears at once | "
        f"{BEFORE['tabs']} | zips: {', '.join(result['zip_tabs'])}; single smears: {single['refused']} refused "
        f"(“{single['first_refusal']}”, the slowest after {single['slowest_refusal_s'] or 0:.2f} s), "
        f"{single['answered']} answered |",
        f"| visitor B's one smear beside A's jobs | {BEFORE['beside']} | {beside_text} |",
        f"| visitor C sends clear_cache while A's jobs are queued; then A's fourth tab and C upload one smear each | "
        f"{BEFORE['clear']} | A after the clear: “{clear['a_after_clear']}” ({clear['a_after_clear_s']:.2f} s); C: "
        + (f"refused “{clearing['refusal']}”" if clearing["refusal"] else f"answered in {clearing['s']:.2f} s")
        + f"; server threads {clear['threads_before']} before, {clear['threads_after']} after; A's first zip's "
        f"progress {result['a_progress_before_clear']} before, {clear['a_progress_after_clear']} after; "
        f"{clear['a_zip_jobs_ended']} of A's 3 zip jobs ended by then |",
    ]
    share_kept = "jobs waiting" in str(clear["a_after_clear"])
    lines += [
        "",
        f"- One queue for the life of the server (a clear_cache leaves A's jobs counted against A's share): "
        f"{'MET' if share_kept else 'NOT MET'} (A after the clear: {clear['a_after_clear']})",
        f"- Fair shares (B answered beside A's {tabs} tabs, not refused): "
        f"{'MET' if beside['kind'] == 'answer' and not beside['refusal'] else 'NOT MET'} ({beside_text})",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tabs", type=int, default=32, help="visitor A's tabs (at least 4)")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args()
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="bcd-bench-queue-"))
    os.environ["BCD_CACHE_DIR"] = str(folder / "cache")
    os.environ["BCD_ARTIFACTS_DIR"] = str(folder / "artifacts")
    log(f"training a tiny scratch-CNN run in {folder} ...")
    url, artifacts = train_tiny_run(folder)
    read_only = url + "?mode=ro"
    env = {
        **os.environ,
        "BCD_DEMO_MODE": "1",
        "BCD_DATABASE_URL": read_only,
        "BCD_ARTIFACTS_DIR": str(artifacts),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with demo_server(env, folder / "streamlit.log") as (base, memory):
        result = asyncio.run(phases(base, memory.pid, max(4, args.tabs)))
        result["server_peak_rss_mb"] = round(memory.peak / 2**20)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("\n".join(report(result, max(4, args.tabs))))
    print(
        f"\n{result['wall_s']:.0f} s in all (training included); server peak RSS {result['server_peak_rss_mb']} MB; "
        f"load average at end {result['load_average_at_end']}"
    )


if __name__ == "__main__":
    main()
