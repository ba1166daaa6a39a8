"""What diagnosing one image gives: a :class:`Diagnosis` with its :class:`Reading`, read by the CLI and the pages."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from bcd_engine.data.classes import ClassInfo

NO_ANSWER_IN_WORDS = "No answer: this image is unlike the images the model learned from"


class Reading(StrEnum):
    """How far an answer can be relied on, in one word (the value is what ``--json`` prints)."""

    OK = "ok"  # confident, and the views agree
    UNSURE = "unsure"  # no class stands out (or the model was trained on a synthetic set)
    CONFLICTING = "conflicting"  # the views (flips, turns, models) answer differently
    OUT_OF_DOMAIN = "out_of_domain"  # unlike the training images: no class is the answer
    UNUSABLE = "unusable"  # the file could not be used at all (``error`` says why)


@dataclass(frozen=True)
class Diagnosis:
    """One image's diagnosis, or why its file could not be diagnosed (``reading`` is then ``UNUSABLE``).

    ``probabilities`` are the model's raw output (mean over views and models); ``calibrated_probabilities`` and
    ``uncertainty`` (confidence, margin, disagreement, spread, views) use each run's temperature. ``in_domain`` is
    true only when every run's out-of-domain gate passes the image (None when a run has no gate); ``ood_score`` and
    ``ood_threshold`` are those of the run that finds the image most unusual, ``ood_run`` that run's id in an
    ensemble. ``class_info`` is the predicted class in words (:mod:`bcd_engine.data.classes`). ``image`` is the image
    as the first model saw it, when it was asked for (for its Grad-CAM).

    For an image out of domain, ``predicted_class`` and the probabilities still hold the model's output, but they
    are no answer: :attr:`answer` is None and :meth:`to_dict` moves them under ``model_output_ignored``.
    """

    name: str
    reading: Reading
    advice: str | None = None
    error: str | None = None
    predicted_class: str | None = None
    probabilities: dict[str, float] | None = None
    calibrated_probabilities: dict[str, float] | None = None
    uncertainty: dict[str, float] | None = None
    in_domain: bool | None = None
    ood_score: float | None = None
    ood_threshold: float | None = None
    ood_run: int | None = None
    class_info: ClassInfo | None = None
    image: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def unusable(cls, name: str, error: str) -> Diagnosis:
        """The result of a file that cannot be diagnosed, with the reason."""
        return cls(name, Reading.UNUSABLE, error=error)

    @property
    def usable(self) -> bool:
        """Whether the image was diagnosed (out of domain included); false for a file that could not be used."""
        return self.reading is not Reading.UNUSABLE

    @property
    def answer(self) -> str | None:
        """The class given as the answer: none for an unusable file or an image out of domain."""
        return None if self.reading in (Reading.UNUSABLE, Reading.OUT_OF_DOMAIN) else self.predicted_class

    @property
    def in_words(self) -> str | None:
        """The answer in plain words (``Looks like pro-B ALL blasts — leukemia``), the refusal for an image out of
        domain, None for an unusable file."""
        if not self.usable:
            return None
        if self.answer is None:
            return NO_ANSWER_IN_WORDS
        return (self.class_info or ClassInfo(self.answer, self.answer)).in_words

    @property
    def confidence(self) -> float | None:
        """The calibrated confidence of the answer; None when there is no answer."""
        return None if self.answer is None or self.uncertainty is None else self.uncertainty["confidence"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape: ``{"name", "error"}`` for an unusable file; otherwise the name, the class and its words,
        both sets of probabilities, the uncertainty, the gate's verdict (with ``ood_run`` only in an ensemble), the
        reading and the advice. Out of domain, the class, its meaning, the probabilities and the uncertainty are
        null, and the model's output is kept apart under ``model_output_ignored``. The image's pixels are not part
        of it."""
        if not self.usable:
            return {"name": self.name, "error": self.error}
        output = {
            "predicted_class": self.predicted_class,
            "probabilities": _copy(self.probabilities),
            "calibrated_probabilities": _copy(self.calibrated_probabilities),
            "uncertainty": _copy(self.uncertainty),
        }
        answered = self.answer is not None
        return {
            "name": self.name,
            "predicted_class": self.answer,
            "in_words": self.in_words,
            "class_meaning": (self.class_info.meaning or None) if answered and self.class_info else None,
            **(output if answered else dict.fromkeys(output)),
            "in_domain": self.in_domain,
            "ood_score": self.ood_score,
            "ood_threshold": self.ood_threshold,
            **({} if self.ood_run is None else {"ood_run": self.ood_run}),
            "reading": self.reading.value,
            "advice": self.advice,
            **({} if answered else {"model_output_ignored": output}),
        }


def _copy(values: dict[str, float] | None) -> dict[str, float] | None:
    return None if values is None else dict(values)
