"""Tables as a reader sees them: headers in words, numbers formatted, missing values as a dash."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd
import streamlit as st

MISSING = "—"


def duration(seconds: float | None) -> str | None:
    """``seconds`` for people: "25 s", "3 min 05 s", "2 h 04 min" (None stays None)."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return None
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def show(frame: pd.DataFrame, *, key: str, columns: Mapping[str, str | tuple[str, Any]], **kwargs: Any) -> None:
    """Show ``frame``'s ``columns`` in that order: engine column -> header in words, or (header, column config).

    Columns not named are not shown, and named ones the frame lacks (older runs' records) are skipped.
    """
    columns = {name: spec for name, spec in columns.items() if name in frame.columns}
    headers = {name: spec if isinstance(spec, str) else spec[0] for name, spec in columns.items()}
    config = {headers[name]: spec[1] for name, spec in columns.items() if not isinstance(spec, str)}
    st.dataframe(
        frame[list(columns)].rename(columns=headers),
        key=key,
        hide_index=True,
        placeholder=MISSING,
        column_config=config,
        **kwargs,
    )


def percent() -> Any:
    """A share (0.996) shown as a percentage (99.6%)."""
    return st.column_config.NumberColumn(format="percent")


def decimals(places: int = 3) -> Any:
    """A number column with ``places`` decimals."""
    return st.column_config.NumberColumn(format=f"%.{places}f")


def status() -> Any:
    """A run-status column wide enough for "interrupted" (a refreshed table keeps its first widths)."""
    return st.column_config.TextColumn(width=100)


def wide_text() -> Any:
    """A text column given room (protocol descriptions, error messages)."""
    return st.column_config.TextColumn(width="large")
