"""Compare's "cells, not the label" section: each run's accuracy with and without the known shortcuts of its
images, and the heat grid of its occlusion audit (:mod:`bcd_engine.protocols.occlusion`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from bcd_engine.protocols.occlusion import OcclusionAudit, stored_occlusion, with_and_without
from bcd_engine.store import EvaluationRecord, RunRecord
from ui import common, tables


def occlusion_grid(audit: OcclusionAudit, title: str) -> go.Figure:
    """The accuracy lost with each grid cell masked, laid out as the image (top row first); hotter is a part the
    model reads more."""
    drops = [[100 * drop for drop in row] for row in audit.drop_grid()]
    labels = [[f"{value:+.1f}" for value in row] for row in drops]
    fig = go.Figure(
        go.Heatmap(
            z=drops,
            text=labels,
            texttemplate="%{text}",
            colorscale="Reds",
            zmin=0,
            colorbar={"title": "points lost"},
            hovertemplate="row %{y}, column %{x}: %{z:.1f} points lost<extra></extra>",
            x=list(range(1, audit.grid + 1)),
            y=list(range(1, audit.grid + 1)),
        )
    )
    fig.update_yaxes(autorange="reversed", title="row", scaleanchor="x")
    fig.update_xaxes(title="column")
    fig.update_layout(title=title, height=320, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


def with_and_without_frame(
    records: Mapping[int, RunRecord], evaluations: Mapping[int, list[EvaluationRecord]], run_ids: Sequence[int]
) -> pd.DataFrame:
    """One row per run: what it masked, its accuracy as trained, and with each shortcut taken away."""
    rows = []
    for run_id in run_ids:
        numbers = with_and_without(evaluations[run_id])
        rows.append(
            {
                "run": f"run {run_id} · {records[run_id].backbone}",
                "masked": records[run_id].config.get("train", {}).get("mask_regions", "none"),
                **numbers.to_dict(),
            }
        )
    return pd.DataFrame(rows)


def occlusion_section(
    records: Mapping[int, RunRecord], evaluations: Mapping[int, list[EvaluationRecord]], run_ids: Sequence[int]
) -> None:
    """The section: the with-and-without table, then each audited run's heat grid and summary."""
    st.subheader("Cells, not the label: accuracy with and without the shortcuts")
    st.caption(
        "A run that reads the cells keeps its accuracy when what is not a cell is taken away: the regions the "
        "dataset audit flags (a scale-bar label) painted over, or the colour (grayscale, stain-normalised). A gap "
        "between **as trained** and a column beside it is what that shortcut carried. Empty cells: not measured "
        "yet (`audit --run N --occlusion`, `robustness --run N`)."
    )
    tables.show(
        with_and_without_frame(records, evaluations, run_ids),
        key="compare_with_and_without",
        columns={
            "run": "run",
            "masked": ("masked in training", tables.wide_text()),
            "as_trained": ("as trained", tables.percent()),
            "flagged_masked": ("flagged regions masked", tables.percent()),
            "grayscale": ("grayscale", tables.percent()),
            "reinhard": ("stain-normalised", tables.percent()),
        },
    )
    audited = [(run_id, audit) for run_id in run_ids if (audit := stored_occlusion(records[run_id].config))]
    if not audited:
        st.caption("No occlusion audit of these runs yet: `python -m bcd_engine audit --run N --occlusion`.")
        return
    for column, (run_id, audit) in zip(st.columns(min(len(audited), 3)), audited):
        column.plotly_chart(
            occlusion_grid(audit, f"run {run_id}: accuracy lost per masked cell"), key=f"compare_occlusion_{run_id}"
        )
        column.caption(common.plain(audit.summary()))
        if audit.heat is not None:
            column.caption(
                f"Grad-CAM heat over {audit.heat.n_images} test images: {audit.heat.border:.0%} on the border, "
                f"{audit.heat.flagged:.0%} on the flagged regions ({audit.heat.flagged_area:.0%} of the image)."
            )
