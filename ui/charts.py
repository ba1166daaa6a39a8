"""Plotly helpers the pages share: error bars from interval columns and figure titles.

The engine returns tables (``bcd_engine.reports``); everything that knows Plotly lives here and in the pages.
"""
from __future__ import annotations

import pandas as pd

from bcd_engine.reports.comparison import format_interval, interval
from bcd_engine.store import EvaluationRecord, RunRecord


def error_bar(frame: pd.DataFrame, column: str) -> dict:
    """Plotly ``error_y`` for ``column`` from its ``<column>_low`` and ``<column>_high`` columns (asymmetric)."""
    return {"type": "data", "symmetric": False,
            "array": (frame[f"{column}_high"] - frame[column]).tolist(),
            "arrayminus": (frame[column] - frame[f"{column}_low"]).tolist()}


def figure_title(run: RunRecord, evaluation: EvaluationRecord | None) -> str:
    """A three-line Plotly title: run and backbone; protocol; accuracy and macro AUC with their intervals."""
    return (f"run {run.id}: {run.backbone}<br><sup>{run.protocol}<br>accuracy "
            f"{format_interval(*interval(evaluation, 'accuracy'))} · macro AUC "
            f"{format_interval(*interval(evaluation, 'macro_auc'))}</sup>")


def stacked(labels: pd.Series) -> pd.Series:
    """Axis labels with each `` · ``-separated part on its own line."""
    return labels.str.replace(" · ", "<br>", regex=False)
