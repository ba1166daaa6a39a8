"""What a dataset's classes mean, in words a newcomer can read: ``classes.json`` beside the class folders.

A dataset folder may hold one small file, :data:`CLASSES_FILE`, next to its class folders::

    {
      "about": "How the classes relate to each other (optional, one paragraph).",
      "classes": {
        "Pro": {"name": "pro-B ALL blasts", "kind": "leukemia",
                "meaning": "Leukemic B-lymphoblasts that stopped maturing at the earliest, pro-B stage."}
      }
    }

``name`` is the class in plain words (it follows "Looks like"), ``kind`` the one-word verdict after the dash
("leukemia", "benign"), ``meaning`` one line. A class the file leaves out takes the built-in words, if any, else
its folder name. Without a file the ALL dataset's classes (Benign, Early, Pre, Pro) and the SYNTHETIC demo set's
have built-in words (:func:`default_guide`); any other class is named by its folder. A run bundle records the
guide in the run's dataset summary (``config["dataset"]["classes"]``, :meth:`ClassGuide.to_dict`) so that an
imported run answers in words without its dataset folder; :func:`run_class_guide` reads that back, or looks the
words up for a run that did not record them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bcd_engine.errors import DataError

CLASSES_FILE = "classes.json"
MAX_FILE_BYTES = 64 * 1024  # a file of words for a few classes; anything larger is not one
MAX_FIELD_CHARS = {"name": 80, "kind": 40, "meaning": 400, "about": 1500}


@dataclass(frozen=True)
class ClassInfo:
    """One class in words: its folder name (``label``, as the model names it), a plain-language ``name``, the
    verdict ``kind`` ("leukemia", "benign"; may be empty) and a one-line ``meaning`` (may be empty)."""

    label: str
    name: str
    kind: str = ""
    meaning: str = ""

    @property
    def in_words(self) -> str:
        """The answer in words: ``Looks like pro-B ALL blasts — leukemia`` (without a kind: ``Looks like Pro``)."""
        return f"Looks like {self.name}" + (f" — {self.kind}" if self.kind else "")

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "meaning": self.meaning}


@dataclass(frozen=True)
class ClassGuide:
    """The classes of a dataset (or a run) in words, in the model's class order; ``about`` says how they relate;
    ``source`` where the words come from (``"file"``, ``"run"``, ``"built-in: ALL dataset"``, ``"built-in:
    SYNTHETIC set"``, ``"class names"``)."""

    classes: tuple[ClassInfo, ...]
    about: str = ""
    source: str = "class names"

    @property
    def class_names(self) -> list[str]:
        return [info.label for info in self.classes]

    def of(self, class_name: str) -> ClassInfo:
        """The words for ``class_name``; its bare name for a class the guide does not know."""
        for info in self.classes:
            if info.label == class_name:
                return info
        return ClassInfo(class_name, class_name)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of :data:`CLASSES_FILE` (and of a run config's ``"classes"``)."""
        return {"about": self.about, "classes": {info.label: info.to_dict() for info in self.classes}}

    @classmethod
    def from_dict(
        cls, document: object, class_names: Sequence[str], *, fallback: ClassGuide | None = None, source: str = "file"
    ) -> ClassGuide:
        """The guide a :data:`CLASSES_FILE` document gives for ``class_names``; a class it leaves out takes its words
        from ``fallback`` (else its name). DataError saying what is wrong for a malformed document."""
        if not isinstance(document, dict):
            raise DataError(f"expected a JSON object with a 'classes' object, got {type(document).__name__}")
        unknown = set(document) - {"about", "classes"}
        if unknown:
            raise DataError(f"unknown key(s) {', '.join(sorted(map(repr, unknown)))}; expected 'about' and 'classes'")
        entries = document.get("classes", {})
        if not isinstance(entries, dict):
            raise DataError(f"'classes' must be an object of class name -> words, got {type(entries).__name__}")
        extra = sorted(set(entries) - set(class_names))
        if extra:
            raise DataError(
                f"'classes' names {', '.join(map(repr, extra))}, which is not a class of this dataset "
                f"(its classes: {', '.join(class_names)})"
            )
        fallback = fallback or ClassGuide(())
        classes = tuple(
            _class_info(label, entries[label]) if label in entries else fallback.of(label) for label in class_names
        )
        about = _text(document, "about", where="the file") if "about" in document else fallback.about
        return cls(classes, about, source)


def _class_info(label: str, entry: object) -> ClassInfo:
    if not isinstance(entry, dict):
        raise DataError(f"class {label!r}: expected an object with 'name', 'kind' and 'meaning'")
    unknown = set(entry) - {"name", "kind", "meaning"}
    if unknown:
        raise DataError(f"class {label!r}: unknown key(s) {', '.join(sorted(map(repr, unknown)))}")
    if "name" not in entry:
        raise DataError(f"class {label!r}: 'name' is missing (the class in plain words)")
    where = f"class {label!r}"
    return ClassInfo(
        label,
        _text(entry, "name", where=where),
        _text(entry, "kind", where=where) if "kind" in entry else "",
        _text(entry, "meaning", where=where) if "meaning" in entry else "",
    )


def _text(entry: Mapping[str, object], key: str, *, where: str) -> str:
    value = entry[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be text, got {type(value).__name__}")
    value = " ".join(value.split())  # one line
    if len(value) > MAX_FIELD_CHARS[key]:
        raise DataError(f"{where}: '{key}' is {len(value)} characters; at most {MAX_FIELD_CHARS[key]}")
    if key == "name" and not value:
        raise DataError(f"{where}: 'name' is empty")
    return value


ALL_ABOUT = (
    "Peripheral blood smears of 89 patients suspected of B-cell acute lymphoblastic leukemia (B-ALL; Aria et al., "
    "Taleqani Hospital). Benign is hematogones: the 25 patients who did not have leukemia. Early, Pre and Pro are "
    "the 64 who did, by the subtype of their B-ALL: how far the leukemic B cells had matured when they stopped "
    "(pro-B the least, then early pre-B, then pre-B). The classes were set by flow cytometry, not by eye."
)
ALL_CLASSES = (
    ClassInfo(
        "Benign",
        "hematogones",
        "benign",
        "Benign B-cell precursors (normal young B cells) of a patient suspected of ALL who did not have it; "
        "they can look like blasts. Not the same as healthy blood.",
    ),
    ClassInfo(
        "Early",
        "early pre-B ALL blasts",
        "leukemia",
        "Early pre-B acute lymphoblastic leukemia: leukemic B-lymphoblasts stopped at the early pre-B stage, "
        "between pro-B and pre-B.",
    ),
    ClassInfo(
        "Pre",
        "pre-B ALL blasts",
        "leukemia",
        "Pre-B acute lymphoblastic leukemia: leukemic B-lymphoblasts stopped at the pre-B stage, the most mature "
        "of the three subtypes here.",
    ),
    ClassInfo(
        "Pro",
        "pro-B ALL blasts",
        "leukemia",
        "Pro-B acute lymphoblastic leukemia: leukemic B-lymphoblasts stopped at the pro-B stage, the least mature "
        "of the three subtypes here.",
    ),
)
SYNTHETIC_KIND = "SYNTHETIC drawing, not medical data"
SYNTHETIC_ABOUT = (
    "Drawn by a program (bcd's SYNTHETIC demo set), not medical data. Each class is a white-cell shape loosely "
    "after one class of the ALL dataset, in the same order; a model trained on it knows nothing about real smears."
)


def all_guide(class_names: Sequence[str]) -> ClassGuide:
    """The ALL dataset's built-in words for ``class_names`` (a subset of Benign, Early, Pre, Pro)."""
    known = {info.label: info for info in ALL_CLASSES}
    return ClassGuide(tuple(known[name] for name in class_names), ALL_ABOUT, "built-in: ALL dataset")


def synthetic_guide(class_names: Sequence[str], descriptions: Sequence[str] = ()) -> ClassGuide:
    """The SYNTHETIC set's words: class k is a drawing loosely after the ALL dataset's class k, ``descriptions[k]``
    (its drawn shape) its meaning."""
    classes = []
    for k, label in enumerate(class_names):
        after = ALL_CLASSES[k].name if k < len(ALL_CLASSES) else label
        shape = descriptions[k] if k < len(descriptions) else "a white cell"
        classes.append(
            ClassInfo(label, f"drawn {after}", SYNTHETIC_KIND, f"Drawn by a program, loosely after {after}: {shape}.")
        )
    return ClassGuide(tuple(classes), SYNTHETIC_ABOUT, "built-in: SYNTHETIC set")


def default_guide(class_names: Sequence[str], *, synthetic: bool) -> ClassGuide:
    """Built-in words: the SYNTHETIC set's for a synthetic dataset, the ALL dataset's when every class is one of its
    four, otherwise each class's own name."""
    class_names = list(class_names)
    if synthetic:
        return synthetic_guide(class_names)
    if class_names and set(class_names) <= {info.label for info in ALL_CLASSES}:
        return all_guide(class_names)
    return ClassGuide(tuple(ClassInfo(name, name) for name in class_names))


def read_class_guide(data_dir: str | os.PathLike, class_names: Sequence[str], *, synthetic: bool) -> ClassGuide:
    """The guide of the dataset at ``data_dir``: its :data:`CLASSES_FILE` over the built-in words
    (:func:`default_guide`), or those alone without a file. DataError, naming the file, when it is malformed."""
    fallback = default_guide(class_names, synthetic=synthetic)
    path = Path(data_dir) / CLASSES_FILE
    try:
        if not path.is_file():
            return fallback
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DataError(f"{path} is larger than {MAX_FILE_BYTES // 1024} KB; it is not a file of class words")
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} cannot be read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    try:
        return ClassGuide.from_dict(document, class_names, fallback=fallback)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc


def write_class_guide(data_dir: str | os.PathLike, guide: ClassGuide) -> Path:
    """Write ``guide`` as the dataset's :data:`CLASSES_FILE`; its path."""
    path = Path(data_dir) / CLASSES_FILE
    path.write_text(json.dumps(guide.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def run_class_guide(config: Mapping[str, Any], *, synthetic: bool) -> ClassGuide:
    """The words of a run's classes from its stored ``config``: those recorded with its dataset summary
    (``config["dataset"]["classes"]``), else its dataset folder's file when that folder is still there and the file
    is sound, else the built-in words (:func:`default_guide`), else the bare class names. Never raises for a run's
    stored words: a run must answer."""
    class_names = [str(name) for name in config.get("class_names", [])]
    fallback = default_guide(class_names, synthetic=synthetic)
    recorded = (config.get("dataset") or {}).get("classes")
    if recorded is not None:
        try:
            return ClassGuide.from_dict(recorded, class_names, fallback=fallback, source="run")
        except DataError:
            pass
    data_dir = config.get("data_dir")
    if data_dir:
        try:
            return read_class_guide(data_dir, class_names, synthetic=synthetic)
        except DataError:
            pass
    return fallback
