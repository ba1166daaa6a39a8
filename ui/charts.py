"""Plotly helpers the pages share: training curves, error bars from interval columns and figure titles.

The engine returns tables (``bcd_engine.reports``); everything that knows Plotly lives here and in the pages.
"""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from bcd_engine.reports.comparison import format_interval, interval
from bcd_engine.store import EvaluationRecord, RunRecord

RUN_COLOURS = px.colors.qualitative.D3  # distinct hues: one per run, never two shades of one colour
SPLIT_DASHES = {"train": "solid", "val": "dash"}
SPLIT_NAMES = {"train": "training", "val": "validation"}


def training_curves(frame: pd.DataFrame, run_names: dict[int, str]) -> go.Figure:
    """Accuracy and loss per epoch side by side (``reports.runs.epochs_frame``): one colour per run, named by
    ``run_names`` (run id -> "run 3 · resnet50"), training solid and validation dashed, whole-number epochs."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Accuracy", "Loss"), horizontal_spacing=0.1)
    for i, (run_id, name) in enumerate(run_names.items()):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        for col, metric in enumerate(("accuracy", "loss"), start=1):
            for split, dash in SPLIT_DASHES.items():
                rows = frame[(frame["run"] == run_id) & (frame["metric"] == metric) & (frame["split"] == split)]
                fig.add_scatter(
                    x=rows["step"],
                    y=rows["value"],
                    mode="lines+markers",
                    row=1,
                    col=col,
                    name=f"{name} — {SPLIT_NAMES[split]}",
                    legendgroup=f"{run_id}-{split}",
                    showlegend=col == 1,
                    line={"color": colour, "dash": dash},
                    customdata=rows["phase"],
                    hovertemplate=f"{name}<br>epoch %{{x}} (%{{customdata}})<br>{SPLIT_NAMES[split]} "
                    f"{metric} %{{y:.3f}}<extra></extra>",
                )
    steps = int(frame["step"].max()) if not frame.empty else 1
    ticks = {"tick0": 1, "dtick": 1} if steps <= 15 else {}  # past 15 epochs Plotly's own ticks are whole numbers
    fig.update_xaxes(title_text="epoch (all phases)", tickformat="d", **ticks)
    fig.update_yaxes(title_text="accuracy", tickformat=".0%", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="loss", rangemode="tozero", showticklabels=True, row=1, col=2)
    return fig.update_layout(legend={"title": {"text": "run — split"}}, hovermode="closest")


def error_bar(frame: pd.DataFrame, column: str) -> dict:
    """Plotly ``error_y`` for ``column`` from its ``<column>_low`` and ``<column>_high`` columns (asymmetric)."""
    return {
        "type": "data",
        "symmetric": False,
        "array": (frame[f"{column}_high"] - frame[column]).tolist(),
        "arrayminus": (frame[column] - frame[f"{column}_low"]).tolist(),
    }


def figure_title(run: RunRecord, evaluation: EvaluationRecord | None) -> str:
    """A three-line Plotly title: run and backbone; protocol; accuracy and macro AUC with their intervals."""
    return (
        f"run {run.id}: {run.backbone}<br><sup>{run.protocol.label}<br>accuracy "
        f"{format_interval(*interval(evaluation, 'accuracy'))} · macro AUC "
        f"{format_interval(*interval(evaluation, 'macro_auc'))}</sup>"
    )


def stacked(labels: pd.Series) -> pd.Series:
    """Axis labels with each `` · ``-separated part on its own line."""
    return labels.str.replace(" · ", "<br>", regex=False)
