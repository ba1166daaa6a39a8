"""A running run's progress on a page: the phase it is in, a bar, its rate and the time left."""

from __future__ import annotations

from datetime import UTC, datetime

import streamlit as st

from bcd_engine.progress import describe
from bcd_engine.store import RunStore
from bcd_engine.training.estimate import RunEstimate
from ui import tables


def phase_text(store: RunStore, run_id: int) -> tuple[float | None, str]:
    """(share of the phase done, or None for a phase that is not counted; the line that says where it stands)."""
    progress = store.get_progress(run_id)
    if progress is None:
        return None, "Starting: setting up the device and reading the dataset ..."
    text = describe(progress)
    if not progress.total:  # not counted: say how long it has been going
        so_far = (datetime.now(UTC) - progress.started_at).total_seconds()
        text = f"{progress.phase} ... ({tables.duration(so_far)} so far)"
    return progress.fraction, text[:1].upper() + text[1:]


def show_run_progress(store: RunStore, run_id: int) -> None:
    """The run's current phase as a bar with its text (a line alone for a phase that is not counted)."""
    fraction, text = phase_text(store, run_id)
    if fraction is None:
        st.caption(f":material/progress_activity: {text}")
    else:
        st.progress(fraction, text=text)


def show_estimate(estimate: RunEstimate) -> None:
    """A run's estimated time before it is queued, with the warning and advice when it will take long."""
    if estimate.warning:
        st.warning(f"{estimate.summary} {estimate.warning}", icon=":material/schedule:")
    else:
        st.caption(f":material/schedule: {estimate.summary}")
