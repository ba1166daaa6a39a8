"""Diagnosis you can weigh: test-time augmentation over the 8 dihedral views, uncertainty, ensembles, batches.

A smear has no "up", so a sound model should answer the same for every flip and quarter turn of an
image. :class:`Diagnoser` averages the probabilities over those 8 views (and over the models of an
ensemble) and reports how much the views disagree, with a plain-words reading for non-specialists.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from bcd_engine.data.archives import MAX_FILES, ExpansionBudget, is_zip, read_archive
from bcd_engine.data.classes import ClassGuide, default_guide, run_class_guide
from bcd_engine.data.images import (
    SUPPORTED_EXTENSIONS,
    DecodeBudget,
    decode_image,
    image_array,
    read_header,
    read_image_bytes,
    short_reason,
)
from bcd_engine.errors import BCDError, ConfigError, DataError, ImageLoadError
from bcd_engine.inference.loading import LoadedModel, load_run_model
from bcd_engine.inference.results import Diagnosis, Reading
from bcd_engine.store import RunStore

N_DIHEDRAL_VIEWS = 8
LOW_CONFIDENCE = 0.7  # below this mean probability of the answer, the result is flagged as unsure
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # one image
# One zip archive, and so any uploaded file: server.maxUploadSize in .streamlit/config.toml, since Streamlit keeps
# every file in the uploader in memory, refused or not (1,000 smear crops of ~50 KB fit).
MAX_ARCHIVE_UPLOAD_BYTES = 64 * 1024 * 1024
MAX_UPLOAD_TOTAL_BYTES = 256 * 1024 * 1024  # one upload in memory: its files and all their archives expand to
MAX_UPLOAD_FILES = MAX_FILES  # images in one upload, archive members included
# Pixels, read from each image's header before any is decoded. One image, frames included: a 20-megapixel
# (5472 x 3648) microscope camera frame passes, a 2592 x 1944 one is a quarter of it; decoding one costs up to
# ~19 bytes a pixel at its peak (RGBA composited on white: ~380 MB) and ~1.5 s for a noisy RGBA PNG on one core.
MAX_UPLOAD_IMAGE_PIXELS = 20_000_000
# One upload, archive members included: 1,000 crops of 450 x 450 (203 megapixels) or about 50 frames of
# 2592 x 1944; at 10-30 megapixels a second (RGBA PNG to JPEG, one core), at most 10-25 s of decoding.
MAX_UPLOAD_PIXELS = 250_000_000
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet reads a cell starting so as a formula
HIGH_DISAGREEMENT = 0.25  # from this share of views (2 of 8) answering differently, it is flagged
SYNTHETIC_MODEL_ADVICE = (
    "This model was trained on a SYNTHETIC demo set, not on real smears: its answer says nothing about a real image."
)
OUT_OF_DOMAIN_ADVICE = (
    "This image does not look like the images the model was trained on (it may come from another lab, stain or "
    "microscope, or not be a blood smear at all), so the model cannot judge it. No answer is given."
)


@dataclass(frozen=True)
class Source:
    """One image to diagnose: a display name and the file path or the bytes (or why it cannot be used)."""

    name: str
    data: str | os.PathLike | bytes | None
    error: str | None = None  # set for an archive member that was skipped, with the reason


def dihedral_views(images: np.ndarray) -> np.ndarray:
    """The 8 flips and quarter turns of images (n, h, w, c) -> (8, n, h, w, c); view 0 is the images."""
    images = np.asarray(images)
    turns = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    return np.stack(turns + [turn[:, :, ::-1] for turn in turns])


def uncertainty(view_probabilities: np.ndarray) -> dict:
    """Uncertainty of one image from its per-view (or per-model-and-view) probabilities (v, n_classes).

    ``confidence``: the mean probability of the answer (the class with the highest mean probability, the
    first of tied ones, as ``argmax`` picks);
    ``margin``: its lead over the runner-up; ``disagreement``: the share of views whose own top class
    is not the answer (0 when every view agrees); ``spread``: the standard deviation of the answer's
    probability across views.
    """
    view_probabilities = np.asarray(view_probabilities, dtype=np.float64)
    mean = view_probabilities.mean(axis=0)
    order = np.argsort(-mean, kind="stable")
    answer = int(order[0])
    return {
        "confidence": float(mean[answer]),
        "margin": float(mean[answer] - (mean[order[1]] if len(order) > 1 else 0.0)),
        "disagreement": float(np.mean(view_probabilities.argmax(axis=1) != answer)),
        "spread": float(view_probabilities[:, answer].std()),
        "views": len(view_probabilities),
    }


def reading(predicted_class: str, certainty: dict, *, looks: str = "flips and turns") -> tuple[Reading, str]:
    """A (level, sentence) reading of a result for non-specialists; level is ``OK``, ``UNSURE`` or ``CONFLICTING``.

    ``looks`` says what the averaged views were (e.g. "flips and turns", "models", "flips, turns and
    models"); with a single view there is no agreement to report.
    """
    confidence, disagreement, views = certainty["confidence"], certainty["disagreement"], certainty["views"]
    if disagreement >= HIGH_DISAGREEMENT:
        return Reading.CONFLICTING, (
            f"Treat this result with caution: the answer changes between the {looks} "
            f"({round(disagreement * views)} of {views} looks say something other than {predicted_class}). "
            "The image may be unusual for this model; ask a specialist."
        )
    if confidence < LOW_CONFIDENCE:
        return Reading.UNSURE, (
            f"The model is unsure: it leans towards {predicted_class} ({confidence:.0%}) but other classes "
            "are close. Do not rely on this result; ask a specialist."
        )
    if views == 1:
        agreement = ""
    elif disagreement == 0:
        agreement = f", and all {views} looks ({looks}) agree"
    else:
        agreement = f"; most of the {views} looks ({looks}) agree"
    return Reading.OK, (
        f"The model gives {predicted_class} with {confidence:.1%} confidence{agreement}. "
        "This is a research tool, not a diagnosis."
    )


class Diagnoser:
    """One trained run, or an ensemble of runs with the same classes, ready to diagnose images.

    ``guide`` gives the classes in words (:mod:`bcd_engine.data.classes`); without one, the built-in words for
    the class names.
    """

    def __init__(self, models: Sequence[LoadedModel], *, guide: ClassGuide | None = None):
        if not models:
            raise ConfigError("choose at least one run")
        names = {tuple(m.class_names) for m in models}
        if len(names) > 1:
            raise ConfigError(
                "an ensemble needs runs trained on the same classes; these runs differ: "
                + "; ".join(f"run {m.run_id}: {', '.join(m.class_names)}" for m in models)
            )
        self.models = list(models)
        self.class_names = list(models[0].class_names)
        self.guide = guide or default_guide(self.class_names, synthetic=any(m.synthetic for m in self.models))

    @classmethod
    def for_runs(cls, run_ids: Iterable[int], *, store: RunStore) -> Diagnoser:
        """Load each run's model (sha256-checked, see :func:`~bcd_engine.inference.loading.load_run_model`); the
        classes in the first run's words (:func:`class_guide_of_run`)."""
        run_ids = [int(run_id) for run_id in dict.fromkeys(run_ids)]
        models = [load_run_model(run_id, store=store) for run_id in run_ids]
        return cls(models, guide=class_guide_of_run(run_ids[0], store=store) if run_ids else None)

    @property
    def run_ids(self) -> list[int]:
        return [m.run_id for m in self.models]

    def _looks(self, images_by_model: Sequence[np.ndarray], *, tta: bool):
        """(raw, calibrated) per-view probabilities (n, models x views, classes) and, per model, the OOD scores
        (n,) of the images as given (view 0), or None for a run without a gate."""
        raw, calibrated, scores = [], [], []
        for model, images in zip(self.models, images_by_model):
            views = dihedral_views(images) if tta else images[None]
            prob, features = model.forward_with_features(np.ascontiguousarray(views.reshape(-1, *images.shape[1:])))
            prob = prob.reshape(len(views), len(images), -1).transpose(1, 0, 2)
            raw.append(prob)
            calibrated.append(model.trust.calibrate(prob) if model.trust else prob)
            scores.append(model.trust.gate.score(features[: len(images)]) if model.trust else None)
        return np.concatenate(raw, axis=1), np.concatenate(calibrated, axis=1), scores

    def diagnose_arrays(self, images_by_model: Sequence[np.ndarray], *, tta: bool = True) -> list[Diagnosis]:
        """One :class:`Diagnosis` per image (unnamed: its ``name`` is empty): predicted class, probabilities,
        uncertainty, the OOD gate's verdict and a reading.

        An image out of domain reads ``OUT_OF_DOMAIN``. A model trained on a SYNTHETIC set says so in every
        answer's advice, and never reads ``OK``.
        """
        results = []
        looks = ("flips, turns and models" if len(self.models) > 1 else "flips and turns") if tta else "models"
        raw, calibrated, scores = self._looks(images_by_model, tta=tta)
        synthetic = any(m.synthetic for m in self.models)
        for i in range(len(raw)):
            mean, shown = raw[i].mean(axis=0), calibrated[i].mean(axis=0)
            certainty = uncertainty(calibrated[i])
            predicted = self.class_names[int(mean.argmax())]
            gate = self._gate_verdict(scores, i)
            level, sentence = (
                (Reading.OUT_OF_DOMAIN, OUT_OF_DOMAIN_ADVICE)
                if gate["in_domain"] is False
                else reading(predicted, certainty, looks=looks)
            )
            if synthetic and level is not Reading.OUT_OF_DOMAIN:
                level = Reading.UNSURE if level is Reading.OK else level
                sentence = f"{SYNTHETIC_MODEL_ADVICE} {sentence}"
            results.append(
                Diagnosis(
                    name="",
                    reading=level,
                    advice=sentence,
                    predicted_class=predicted,
                    probabilities=dict(zip(self.class_names, mean.tolist())),
                    calibrated_probabilities=dict(zip(self.class_names, shown.tolist())),
                    uncertainty=certainty,
                    class_info=self.guide.of(predicted),
                    **gate,
                )
            )
        return results

    def _gate_verdict(self, scores: list[np.ndarray | None], i: int) -> dict:
        """The :class:`Diagnosis` fields of the gates' verdict on image ``i``: ``in_domain``, ``ood_score``,
        ``ood_threshold`` and, in an ensemble, ``ood_run``."""
        if any(s is None for s in scores):
            return {"in_domain": None, "ood_score": None, "ood_threshold": None}
        thresholds = [m.trust.gate.threshold for m in self.models]
        # The member furthest past its own threshold speaks for the ensemble (past a zero threshold: furthest).
        worst = int(np.argmax([s[i] / t if t > 0 else np.inf if s[i] > 0 else 0.0 for s, t in zip(scores, thresholds)]))
        threshold = thresholds[worst]
        return {
            "in_domain": bool(all(s[i] <= t for s, t in zip(scores, thresholds))),
            "ood_score": float(scores[worst][i]),
            "ood_threshold": float(threshold),
            **({"ood_run": self.models[worst].run_id} if len(self.models) > 1 else {}),
        }

    def diagnose(
        self,
        sources: Sequence[Source],
        *,
        tta: bool = True,
        batch_size: int = 16,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[Diagnosis]:
        """Diagnose many images in batches; an unreadable one is an ``UNUSABLE`` :class:`Diagnosis` with the reason,
        and the rest go on.

        ``on_progress(done, total)`` is called after every batch (pages drive a progress bar with it).
        """
        steps = self.diagnose_steps(sources, tta=tta, batch_size=batch_size)
        while True:
            try:
                done, total = next(steps)
            except StopIteration as stop:
                return stop.value
            if on_progress is not None:
                on_progress(done, total)

    def diagnose_steps(
        self, sources: Sequence[Source], *, tta: bool = True, batch_size: int = 16, keep_images: bool = False
    ) -> Generator[tuple[int, int], None, list[Diagnosis]]:
        """:meth:`diagnose` one batch at a time: yields (done, total) after each batch and returns the results.

        Only the batch being diagnosed is held decoded, and each source is let go (its bytes with it) once it is
        decoded: a caller that keeps no list of its own holds no upload's bytes past its batch. With
        ``keep_images`` each result also holds ``image``, the image as the first model saw it (for its Grad-CAM,
        without decoding it again).
        """
        sources = list(sources)  # this generator's own list, emptied as it goes
        names = [s.name for s in sources]
        results: list[Diagnosis] = []
        for start in range(0, len(sources), batch_size):
            chunk = range(start, min(start + batch_size, len(sources)))
            decoded = {i: self._decoded(sources, i) for i in chunk}
            loaded = {i: arrays for i, arrays in decoded.items() if not isinstance(arrays, str)}
            answers = iter(
                self.diagnose_arrays(
                    [np.stack([loaded[i][k] for i in loaded]) for k in range(len(self.models))], tta=tta
                )
                if loaded
                else []
            )
            for i in chunk:
                if i in loaded:
                    results.append(replace(next(answers), name=names[i], image=loaded[i][0] if keep_images else None))
                else:
                    results.append(Diagnosis.unusable(names[i], decoded[i]))
            yield chunk.stop, len(sources)
        return results

    def _decoded(self, sources: list[Source | None], i: int) -> list[np.ndarray] | str:
        """Source ``i`` decoded once and resized for each model, or why it cannot be; it leaves ``sources`` either
        way."""
        source, sources[i] = sources[i], None
        if source.error:
            return source.error
        try:
            image = decode_image(_read(source.data))
            return [image_array(image, image_size=m.config.image_size) for m in self.models]
        except ImageLoadError as exc:
            return str(exc)


def class_guide_of_run(run_id: int, *, store: RunStore) -> ClassGuide:
    """The words for a stored run's classes (:func:`~bcd_engine.data.classes.run_class_guide`)."""
    run = store.get_run(run_id)
    return run_class_guide(run.config, synthetic=run.dataset.synthetic)


def _read(data: str | os.PathLike | bytes) -> bytes:
    return bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else read_image_bytes(data)


def sources_from_paths(paths: Iterable[str | os.PathLike]) -> list[Source]:
    """Files as given; folders expanded to their supported image files (recursively, sorted); zips opened safely.

    A folder without images or an unusable archive becomes one source carrying its error.
    """
    sources: list[Source] = []
    for raw in paths:
        path = Path(raw)
        try:
            if path.is_dir():
                files = sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file()
                    and p.suffix.lower() in SUPPORTED_EXTENSIONS
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
                if not files:
                    raise DataError(f"{path} has no supported image files ({', '.join(SUPPORTED_EXTENSIONS)})")
                sources += [Source(str(p), p) for p in files]
            elif is_zip(path.name, _head(path)):
                sources += sources_from_archive(path, name=str(path))
            else:
                sources.append(Source(str(path), path))
        except BCDError as exc:  # one bad folder or archive costs only itself
            sources.append(Source(str(path), None, error=str(exc)))
        except (OSError, ValueError) as exc:  # a path the system refuses (a NUL byte, a name too long)
            sources.append(Source(str(path), None, error=f"cannot be read ({short_reason(exc)})"))
    return sources


def _head(path: Path) -> bytes:
    """A regular file's first bytes (empty when it is none or cannot be read: loading it then reports why)."""
    try:
        if not path.is_file():  # a pipe would block the open
            return b""
        with open(path, "rb") as fh:
            return fh.read(4)
    except (OSError, ValueError):
        return b""


def sources_from_archive(
    data: str | os.PathLike | bytes, *, name: str, budget: ExpansionBudget | None = None
) -> list[Source]:
    """The members of a zip archive as sources named ``archive/member``, skipped ones with their reason.

    Unsafe archives (path traversal, zip bombs, deep nesting) are refused with ``ArchiveError``; ``budget``
    is shared with the other archives of one upload (:func:`upload_sources`).
    """
    contents = read_archive(data, budget=budget)
    if not contents.images and not contents.skipped:
        return [Source(name, None, error="the archive holds no files (only folders or hidden files, or none)")]
    return [Source(f"{name}/{member}", payload) for member, payload in contents.images] + [
        Source(f"{name}/{member}", None, error=reason) for member, reason in contents.skipped
    ]


def results_frame(results: Sequence[Diagnosis]) -> pd.DataFrame:
    """A flat table of diagnosis results (one row per image) for display and CSV download: the answer in words, the
    class, the reading, the uncertainty and each class's calibrated probability. An image out of domain gets no
    class, no confidence and no probability (:attr:`Diagnosis.answer`), an unusable file no reading, only its
    error."""
    rows = []
    for r in results:
        row = {
            "image": r.name,
            "in_words": r.in_words,
            "predicted_class": r.answer,
            "reading": r.reading.value if r.usable else None,
            "in_domain": r.in_domain,
            "ood_score": r.ood_score,
            "error": r.error,
        }
        if r.answer is not None:
            if r.uncertainty is not None:
                row.update({k: r.uncertainty[k] for k in ("confidence", "margin", "disagreement")})
            row.update({f"p({name})": p for name, p in (r.calibrated_probabilities or {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def results_csv(results: Sequence[Diagnosis]) -> bytes:
    """The results table as UTF-8 CSV bytes (RFC 4180: CRLF rows, so a carriage return inside a name stays inside
    its quoted cell); a text cell that a spreadsheet would read as a formula (it starts with ``=``, ``+``, ``-``,
    ``@``, a tab or a carriage return) gets a leading ``'``, as OWASP advises against CSV injection. Numbers are
    written as they are."""
    buffer = io.StringIO()
    results_frame(results).map(_inert_cell).to_csv(buffer, index=False, lineterminator="\r\n")
    return buffer.getvalue().encode()


def _inert_cell(value: object) -> object:
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_PREFIXES) else value


class Upload(Protocol):
    """An uploaded file whose size is known before its bytes are read (Streamlit's ``UploadedFile`` is one)."""

    name: str
    size: int

    def getvalue(self) -> bytes: ...


def upload_sources(
    uploads: Iterable[Upload | tuple[str, bytes]],
    *,
    max_total_bytes: int = MAX_UPLOAD_TOTAL_BYTES,
    max_files: int = MAX_UPLOAD_FILES,
    max_pixels: int = MAX_UPLOAD_PIXELS,
) -> tuple[list[Source], list[Diagnosis]]:
    """Uploaded files (:class:`Upload` s, or (name, bytes) pairs) as diagnosis sources; zip archives are opened
    safely.

    All the files of one upload share one budget of ``max_total_bytes`` held in memory (their own bytes
    and everything their archives expand to), of ``max_files`` images (archive members included) and of
    ``max_pixels`` to decode (each image's from its header, at most :data:`MAX_UPLOAD_IMAGE_PIXELS`, before any
    pixel is decoded). Each file's size is checked against the budget before its bytes are read, one file at a
    time, and an archive's own bytes are let go once its members are read.
    Returns (sources, rejected): an upload over its size limit, an unsafe archive, an image refused by its
    header or a file past the shared budget becomes an ``UNUSABLE`` :class:`Diagnosis`, so one bad upload never
    costs the others; an archive member refused by its header becomes a source carrying the reason.
    """
    sources, rejected = [], []
    budget = ExpansionBudget(max_files=max_files, max_total_bytes=max_total_bytes)
    pixels = DecodeBudget(MAX_UPLOAD_IMAGE_PIXELS, max_pixels)
    for upload in uploads:
        name, size, read = _upload_parts(upload)
        try:
            _check_upload_size(size, MAX_ARCHIVE_UPLOAD_BYTES)  # no file may be larger, archive or not
            budget.check(size, label=name)
            data = read()
            if is_zip(name, data[:4]):
                sources += [
                    _charged_member(member, pixels) for member in sources_from_archive(data, name=name, budget=budget)
                ]
            else:
                _check_upload_size(size, MAX_UPLOAD_BYTES)
                pixels.charge(read_header(data))
                budget.charge(len(data), label=name, files=1)
                sources.append(Source(name, data))
        except BCDError as exc:
            rejected.append(Diagnosis.unusable(name, str(exc)))
    return sources, rejected


def _upload_parts(upload: Upload | tuple[str, bytes]) -> tuple[str, int, Callable[[], bytes]]:
    """(name, size, reader) of an upload, its bytes unread."""
    if isinstance(upload, tuple):
        name, data = upload
        return name, len(data), lambda: data
    return upload.name, upload.size, upload.getvalue


def _check_upload_size(size: int, limit: int) -> None:
    if size > limit:
        raise DataError(f"file is {size / 2**20:.1f} MB; the limit is {limit // 2**20} MB")


def _charged_member(member: Source, pixels: DecodeBudget) -> Source:
    """An archive member whose header fits the decode budget; otherwise the member with the reason instead of its
    bytes."""
    if member.error is not None:
        return member
    try:
        pixels.charge(read_header(member.data))
    except ImageLoadError as exc:
        return Source(member.name, None, error=str(exc))
    return member
