"""Progress of long steps: a bar on stderr (stdout stays clean for ``--json``) and, for a stored run, reports of
each phase (what it is, how far, how fast) to whoever watches it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm


def progress_bar(total: int, description: str, *, enabled: bool = True, unit: str = "img") -> tqdm:
    """A tqdm bar on stderr; a silent one when ``enabled`` is false."""
    return tqdm(
        total=total, desc=description, unit=unit, file=sys.stderr, disable=not enabled, leave=False, dynamic_ncols=True
    )


@dataclass(frozen=True)
class PhaseProgress:
    """Where one phase of a job stands: ``done`` of ``total`` ``unit``\\ s after ``elapsed_s`` seconds.

    ``total`` 0 is a phase that is not counted (saving a model): it has neither rate nor time left.
    """

    phase: str
    done: int
    total: int
    unit: str
    elapsed_s: float

    @property
    def fraction(self) -> float | None:
        """Share done in 0..1, or None for a phase that is not counted."""
        return min(1.0, self.done / self.total) if self.total else None

    @property
    def rate(self) -> float | None:
        """Units per second so far (None until some are done)."""
        return self.done / self.elapsed_s if self.done and self.elapsed_s > 0 else None

    @property
    def seconds_left(self) -> float | None:
        """Time left at the rate so far (None when there is no rate yet, or the phase is not counted)."""
        rate = self.rate
        return max(0.0, (self.total - self.done) / rate) if rate and self.total else None

    def to_dict(self) -> dict:
        return {
            "phase": self.phase,
            "done": self.done,
            "total": self.total,
            "unit": self.unit,
            "elapsed_s": self.elapsed_s,
            "rate": self.rate,
            "seconds_left": self.seconds_left,
        }


Reporter = Callable[[PhaseProgress], None]


class Phase:
    """Counts one phase's steps; drives a bar (when ``bar``) and hands every change to ``report``.

    >>> with Phase("features", 100, unit="view") as phase:  # doctest: +SKIP
    ...     phase.advance(32)
    """

    def __init__(self, name: str, total: int, *, unit: str = "img", bar: bool = False, report: Reporter | None = None):
        self.name, self.total, self.unit, self.report = name, int(total), unit, report
        self.done = 0
        self._started = time.monotonic()
        self._bar = progress_bar(self.total, name, enabled=bar and self.total > 0, unit=unit)

    def __enter__(self) -> Phase:
        self._send()
        return self

    def __exit__(self, *exc_info) -> None:
        self._bar.close()

    def advance(self, n: int = 1) -> None:
        """``n`` more steps done."""
        self.done += int(n)
        self._bar.update(n)
        self._send()

    def set_postfix(self, **values) -> None:
        """Show ``values`` beside the bar (e.g. the loss of the last epoch)."""
        self._bar.set_postfix(**values)

    def snapshot(self) -> PhaseProgress:
        return PhaseProgress(self.name, self.done, self.total, self.unit, time.monotonic() - self._started)

    def _send(self) -> None:
        if self.report is not None:
            self.report(self.snapshot())


def describe(update: PhaseProgress | Any) -> str:
    """One line for a log or a page: "features (train views): 4,608 of 18,224 views (25%), 21.3 views/s, about 10 min
    left". ``update`` is a :class:`PhaseProgress` or a record with the same fields (the store's ``RunProgress``)."""
    if not update.total:
        return f"{update.phase} ({update.elapsed_s:.0f} s)" if update.done else f"{update.phase} ..."
    text = f"{update.phase}: {update.done:,} of {update.total:,} {update.unit}s ({update.fraction:.0%})"
    if update.rate is not None and update.unit != "epoch":
        text += f", {update.rate:.1f} {update.unit}s/s"
    if update.done >= update.total:
        return text + f", done in {duration_text(update.elapsed_s)}"
    if update.seconds_left is not None:
        text += f", about {duration_text(update.seconds_left)} left"
    return text


def duration_text(seconds: float) -> str:
    """Seconds in words for a person: "45 s", "12 min", "1 h 05 min"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
