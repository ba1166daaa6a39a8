"""Tables of the protocol jobs queued from the dashboard (k-fold CV, LODO, classical baseline, robustness): what
each is, where it stands and, once done, its result in one line; and the finished baselines and robustness checks
for the Compare page."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bcd_engine.store import JobRecord


def job_summary(job: JobRecord) -> str | None:
    """A finished job's result in one line (None before it has one)."""
    result = job.result
    if not result:
        return None
    if job.kind == "cv" or (job.kind == "baseline" and "folds" in result and "mean" in result):
        mean, std = result["mean"].get("accuracy"), result["std"].get("accuracy")
        runs = [f["run_id"] for f in result["folds"] if f.get("run_id") is not None]
        where = f" (runs {', '.join(map(str, runs))})" if runs else ""
        return "no fold finished" if mean is None else f"mean accuracy {mean:.3f} ± {std:.3f} over the folds{where}"
    if job.kind == "lodo":
        done = [r for r in result["rounds"] if r["status"] == "completed"]
        parts = [f"held out {r['held_out']}: {r['held_out_accuracy']:.3f}" for r in done]
        skipped = len(result["rounds"]) - len(done)
        return "; ".join(parts + ([f"{skipped} round(s) not completed"] if skipped else [])) or "no round completed"
    if job.kind == "baseline":
        return f"test accuracy {result['test_accuracy']:.3f} ({result['protocol']})"
    rows = {"original": result["original"], **result["normalised"]}
    return "; ".join(f"{name} {row['model_accuracy']:.3f}" for name, row in rows.items())


def jobs_frame(jobs: list[JobRecord]) -> pd.DataFrame:
    """One row per job: id, job (in words), status, result (one line), error (first line), queued at."""
    rows = [
        {
            "id": job.id,
            "job": job.name.partition(": ")[2],
            "status": job.status,
            "result": job_summary(job),
            "error": (job.error or "").partition("\n")[0][:160] or None,
            "created": job.created_at,
        }
        for job in jobs
    ]
    return pd.DataFrame(rows, columns=["id", "job", "status", "result", "error", "created"])


def baseline_frame(jobs: list[JobRecord]) -> pd.DataFrame:
    """The completed classical baselines: dataset, model, protocol, accuracy (the CV's mean) and its spread."""
    rows = []
    for job in jobs:
        if job.kind != "baseline" or job.status != "completed" or not job.result:
            continue
        result = job.result
        kfold = "mean" in result
        rows.append(
            {
                "job": job.id,
                "dataset": Path(result["data_dir"]).name,
                "model": job.params["model"],
                "protocol": result["protocol"],
                "accuracy": result["mean"]["accuracy"] if kfold else result["test_accuracy"],
                "std": result["std"]["accuracy"] if kfold else None,
                "macro_auc": result["mean"]["macro_auc"] if kfold else result.get("macro_auc"),
            }
        )
    return pd.DataFrame(rows, columns=["job", "dataset", "model", "protocol", "accuracy", "std", "macro_auc"])


def robustness_frame(jobs: list[JobRecord]) -> pd.DataFrame:
    """The completed colour-robustness checks, one row per test set (original, grayscale, Reinhard): the model's
    accuracy beside the colour-only baseline's on the same images."""
    rows = []
    for job in jobs:
        if job.kind != "robustness" or job.status != "completed" or not job.result:
            continue
        result = job.result
        for name, row in {"original": result["original"], **result["normalised"]}.items():
            rows.append(
                {
                    "run": result["run_id"],
                    "backbone": result["backbone"],
                    "test images": name,
                    "model_accuracy": row["model_accuracy"],
                    "colour_only_accuracy": row["colour_only_accuracy"],
                }
            )
    return pd.DataFrame(rows, columns=["run", "backbone", "test images", "model_accuracy", "colour_only_accuracy"])
