"""Answers a stranger can read (issue 25): classes in words, a refusal that is a refusal everywhere, a heatmap note,
examples one click away and uploads that replace each other. No model is trained: a stand-in model answers."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from helpers import APP, fill_store
from PIL import Image
from streamlit.testing.v1 import AppTest

from bcd_engine.data.classes import (
    ALL_CLASSES,
    CLASSES_FILE,
    ClassGuide,
    ClassInfo,
    default_guide,
    read_class_guide,
    run_class_guide,
)
from bcd_engine.data.synthetic import make_synthetic_dataset
from bcd_engine.errors import DataError
from bcd_engine.inference import explain
from bcd_engine.inference.diagnosis import Diagnoser, Source, results_csv, results_frame
from bcd_engine.inference.results import NO_ANSWER_IN_WORDS, Reading
from bcd_engine.store import RunStore
from bcd_engine.training import worker
from ui import common

CLASSES = ["Benign", "Early", "Pre", "Pro"]
IN_WORDS = {
    "Benign": "Looks like hematogones — benign",
    "Early": "Looks like early pre-B ALL blasts — leukemia",
    "Pre": "Looks like pre-B ALL blasts — leukemia",
    "Pro": "Looks like pro-B ALL blasts — leukemia",
}


class OneClassModel:
    """A run's model that gives ``answer`` 0.97 for every image, whose gate scores every image ``score`` against a
    threshold of 10 (over it: out of domain); without a score, a white image 50 and any other 1."""

    config, synthetic = SimpleNamespace(image_size=32), False

    def __init__(self, answer: str, *, score: float | None = 1.0, run_id: int = 1):
        self.run_id, self.class_names, self.answer = run_id, list(CLASSES), answer

        def scores(features):
            return np.full(len(features), score) if score is not None else np.where(features[:, 0] > 250, 50.0, 1.0)

        self.trust = SimpleNamespace(
            gate=SimpleNamespace(threshold=10.0, score=scores), calibrate=lambda probabilities: probabilities
        )

    def forward_with_features(self, images):
        probabilities = np.full((len(images), 4), 0.01)
        probabilities[:, CLASSES.index(self.answer)] = 0.97
        return probabilities, np.asarray(images, np.float64).mean(axis=(1, 2, 3))[:, None]


def _png(colour="purple") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# --- classes in words -------------------------------------------------------------------------------------------


def test_the_all_datasets_classes_have_built_in_words():
    guide = default_guide(CLASSES, synthetic=False)
    assert {info.label: info.in_words for info in guide.classes} == IN_WORDS
    assert "hematogones" in guide.about and "not the same as healthy blood" in guide.of("Benign").meaning.lower()
    assert guide.source == "built-in: ALL dataset"
    assert default_guide(["lymphocyte", "Pro"], synthetic=False).of("Pro").in_words == "Looks like Pro"
    drawn = default_guide(CLASSES, synthetic=True).of("Pro")
    assert drawn.in_words == "Looks like drawn pro-B ALL blasts — SYNTHETIC drawing, not medical data"


def test_the_synthetic_set_writes_its_words_and_says_colour_is_a_shortcut(tmp_path):
    root = make_synthetic_dataset(tmp_path / "set", n_per_class=1, image_size=32, class_names=("Small", "Large"))
    guide = read_class_guide(root, ["Small", "Large"], synthetic=True)
    assert guide.source == "file" and guide.class_names == ["Small", "Large"]
    assert guide.of("Small").name == "drawn hematogones" and "scant cytoplasm" in guide.of("Small").meaning
    readme = " ".join((root / "README.txt").read_text().split())
    assert "follow the same distributions" not in readme and "colour statistics alone tell the classes apart" in readme


def test_a_datasets_file_gives_its_words_over_the_built_in_ones(tmp_path):
    (tmp_path / CLASSES_FILE).write_text(
        json.dumps({"about": "Two labs.", "classes": {"Pro": {"name": "pro-B blasts", "kind": "leukemia"}}})
    )
    guide = read_class_guide(tmp_path, CLASSES, synthetic=False)
    assert guide.about == "Two labs." and guide.of("Pro") == ClassInfo("Pro", "pro-B blasts", "leukemia", "")
    assert guide.of("Benign") == ALL_CLASSES[0]  # a class the file leaves out keeps the built-in words


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "is not valid JSON"),
        ("[]", "expected a JSON object"),
        ('{"classes": {"Blast": {"name": "x"}}}', "'Blast', which is not a class of this dataset"),
        ('{"classes": {"Pro": {"kind": "leukemia"}}}', "'name' is missing"),
        ('{"classes": {"Pro": {"name": 3}}}', "'name' must be text"),
        ('{"classes": {"Pro": {"name": "x", "colour": "red"}}}', "unknown key"),
        ('{"clases": {}}', "unknown key"),
        (json.dumps({"classes": {"Pro": {"name": "x" * 81}}}), "at most 80"),
    ],
)
def test_a_malformed_file_is_refused_naming_the_file_and_the_fault(tmp_path, content, match):
    (tmp_path / CLASSES_FILE).write_text(content)
    with pytest.raises(DataError, match=match) as raised:
        read_class_guide(tmp_path, CLASSES, synthetic=False)
    assert CLASSES_FILE in str(raised.value)


def test_a_runs_words_come_from_its_record_then_its_folder_then_the_built_in_ones(tmp_path):
    recorded = ClassGuide((ClassInfo("Pro", "recorded words", "leukemia"),)).to_dict()
    (tmp_path / CLASSES_FILE).write_text(json.dumps({"classes": {"Pro": {"name": "folder words"}}}))
    config = {"class_names": CLASSES, "data_dir": str(tmp_path), "dataset": {"classes": recorded}}
    assert run_class_guide(config, synthetic=False).of("Pro").name == "recorded words"
    config["dataset"] = {"classes": {"classes": {"Nope": {}}}}  # a broken record: the folder's words
    assert run_class_guide(config, synthetic=False).of("Pro").name == "folder words"
    (tmp_path / CLASSES_FILE).write_text("{broken")  # a broken file too: the built-in words, never an error
    assert run_class_guide(config, synthetic=False).of("Pro").in_words == IN_WORDS["Pro"]
    config["data_dir"] = str(tmp_path / "gone")  # a bundled run without its folder
    assert run_class_guide(config, synthetic=True).of("Pro").name == "drawn pro-B ALL blasts"


# --- a refusal is a refusal everywhere ---------------------------------------------------------------------------


def _diagnosed(score: float, answer: str = "Pro"):
    diagnoser = Diagnoser([OneClassModel(answer, score=score)], guide=default_guide(CLASSES, synthetic=False))
    return diagnoser.diagnose([Source("cell.png", _png())])[0]


@pytest.mark.parametrize("answer", CLASSES)
def test_an_answer_leads_with_its_words(answer):
    result = _diagnosed(1.0, answer)
    assert result.reading is Reading.OK and result.in_words == IN_WORDS[answer]
    document = result.to_dict()
    assert document["predicted_class"] == answer and document["in_words"] == IN_WORDS[answer]
    assert document["class_meaning"] == default_guide(CLASSES, synthetic=False).of(answer).meaning
    assert "model_output_ignored" not in document


def test_an_image_out_of_domain_has_no_class_or_confidence_in_the_json_table_or_csv():
    refused = _diagnosed(50.0)
    assert refused.reading is Reading.OUT_OF_DOMAIN and refused.answer is None and refused.confidence is None
    document = refused.to_dict()
    answer_fields = ("predicted_class", "class_meaning", "probabilities", "calibrated_probabilities", "uncertainty")
    assert all(document[key] is None for key in answer_fields) and document["in_words"] == NO_ANSWER_IN_WORDS
    assert document["model_output_ignored"]["predicted_class"] == "Pro"  # kept apart, under a name that says so
    answered = _diagnosed(1.0)
    table = results_frame([refused, answered])
    assert table["predicted_class"].isna().tolist() == [True, False] and table.loc[1, "predicted_class"] == "Pro"
    numbers = ["confidence", "margin", "disagreement", *(f"p({name})" for name in CLASSES)]
    assert table.loc[0, numbers].isna().all() and table.loc[1, numbers].notna().all()
    rows = list(csv.DictReader(io.StringIO(results_csv([refused, answered]).decode())))
    assert all(rows[0][column] == "" for column in ["predicted_class", *numbers])
    assert rows[0]["in_words"] == NO_ANSWER_IN_WORDS and rows[1]["in_words"] == IN_WORDS["Pro"]


# --- a heatmap a person can read ---------------------------------------------------------------------------------


def test_heat_on_the_border_or_the_label_corner_gets_a_note_and_heat_on_the_cell_none():
    centre = np.zeros((100, 100))
    centre[40:60, 40:60] = 1
    assert explain.heat_share(centre).notes == [] and explain.heat_share(centre).border.heat == 0
    edge = np.zeros((100, 100))
    edge[:6] = 1
    share = explain.heat_share(edge)
    assert share.border.heat == 1 and share.border.area == pytest.approx(1 - 0.76**2)
    assert len(share.notes) == 1 and "border" in share.notes[0]
    corner = np.zeros((100, 100))
    corner[80:, 80:] = 1
    notes = explain.heat_share(corner).notes
    assert len(notes) == 2 and "bottom-right corner" in notes[1] and "scale-bar label" in notes[1]
    label = SimpleNamespace(x0=0.75, y0=0.8, x1=1.0, y1=1.0, name="the scale-bar label region")
    region = explain.heat_share(corner, regions=[label]).regions[0]
    assert region.heat == pytest.approx(1.0) and region.area == pytest.approx(0.05)
    assert explain.heat_share(np.zeros((8, 8))).notes == []
    with pytest.raises(Exception, match="2-D heatmap"):
        explain.heat_share(np.zeros(5))


# --- the Diagnose page -------------------------------------------------------------------------------------------


@pytest.fixture
def all_like_store(workspace, synthetic_dataset, tmp_path, monkeypatch):
    """A store whose runs were trained on a folder of the ALL dataset's classes (a copy of the synthetic set that is
    no longer marked synthetic and has no words of its own), with a stand-in model answering ``Pro``."""
    folder = shutil.copytree(synthetic_dataset, tmp_path / "all-like")
    (folder / "README.txt").unlink()
    (folder / CLASSES_FILE).unlink()
    monkeypatch.setenv("BCD_DATABASE_URL", workspace.url)
    for name in ("BCD_DEMO_MODE", "BCD_DEMO_DATASETS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(worker, "spawn_worker", lambda: 0)
    monkeypatch.setattr(common, "grad_cam", lambda run_id, image, cls: (image, np.ones(image.shape[:2]) / 2))
    fill_store(RunStore.open(workspace.url), folder)
    return folder


def _page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/diagnose.py").run()
    assert not at.exception, at.exception
    return at


def _texts(at: AppTest) -> str:
    return "\n".join(e.value for kind in ("markdown", "caption", "error", "warning", "info") for e in getattr(at, kind))


@pytest.mark.parametrize("answer", CLASSES)
def test_the_page_leads_with_the_answer_in_words_for_each_class(all_like_store, monkeypatch, answer):
    monkeypatch.setattr(common, "load_model", lambda run_id: OneClassModel(answer, run_id=run_id))
    at = _page()
    at.file_uploader(key="diagnose_upload").set_value(("cell.png", _png(), "image/png")).run()
    assert not at.exception, at.exception
    headline = next(m.value for m in at.markdown if m.value.startswith("### "))
    assert headline == "### " + common.plain(IN_WORDS[answer])
    assert at.metric[0].label == "Predicted class" and at.metric[0].value == answer
    assert "97.0% calibrated probability" in at.metric[0].delta
    assert any("colour scale" in caption.value.lower() for caption in at.caption)  # the heatmap's legend


def test_a_refused_image_is_shown_with_what_to_do_and_no_class_or_confidence(all_like_store, monkeypatch):
    monkeypatch.setattr(common, "load_model", lambda run_id: OneClassModel("Pro", score=50.0, run_id=run_id))
    at = _page()
    at.file_uploader(key="diagnose_upload").set_value(("mug.png", _png("white"), "image/png")).run()
    assert not at.exception, at.exception
    assert not at.metric and "What you can do" in _texts(at) and "Choose another model" in _texts(at)
    assert any(img.caption == "The image as the model saw it" for e in at.get("image") for img in e.proto.imgs)
    shown = _texts(at)  # less the explainer and the glossary (expanders of words about the page and the classes)
    for words in (m.value for expander in at.expander for m in [*expander.markdown, *expander.caption]):
        shown = shown.replace(words, "")
    assert "Looks like" not in shown and "%" not in shown and not at.get("plotly_chart")
    assert "Pro" not in shown.replace("pro-B", "").replace("Pro-B", "")


def test_a_batch_table_shows_no_confidence_for_a_refused_image_and_a_row_opens_its_detail(all_like_store, monkeypatch):
    monkeypatch.setattr(common, "load_model", lambda run_id: OneClassModel("Early", score=None, run_id=run_id))
    at = _page()
    upload = [("mug.png", _png("white"), "image/png"), ("cell.png", _png(), "image/png")]
    at.file_uploader(key="diagnose_upload").set_value(upload).run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    refused, answered = table.iloc[0], table.iloc[1]
    assert refused["image"] == "mug.png" and refused["answer"] == NO_ANSWER_IN_WORDS
    assert pd.isna(refused["class"]) and np.isnan(refused["calibrated probability"])
    assert all(np.isnan(refused[f"p({name})"]) for name in CLASSES)
    assert answered["answer"] == IN_WORDS["Early"] and answered["calibrated probability"] == pytest.approx(0.97)
    assert not at.subheader  # no detail until a row is chosen
    at.session_state["diagnose_table"] = {"selection": {"rows": [1], "columns": []}}
    at.run()
    assert not at.exception, at.exception
    assert at.subheader[0].value == "cell\\.png" and at.metric[1].value == "Early"  # its answer and heatmap
    assert any("Grad-CAM" in img.caption for e in at.get("image") for img in e.proto.imgs)


def test_examples_are_one_click_away_and_answered(all_like_store, monkeypatch):
    monkeypatch.setattr(common, "load_model", lambda run_id: OneClassModel("Benign", run_id=run_id))
    at = _page()
    buttons = [b for b in at.button if b.key.startswith("diagnose_example_")]
    assert len(buttons) >= 4  # the run's own test images (its folder is here) and the SYNTHETIC examples
    buttons[0].click().run()
    assert not at.exception, at.exception
    assert any(m.value == "### " + common.plain(IN_WORDS["Benign"]) for m in at.markdown)


def test_a_new_upload_replaces_the_last_unless_added_on_purpose(all_like_store, monkeypatch):
    monkeypatch.setattr(common, "load_model", lambda run_id: OneClassModel("Pre", run_id=run_id))
    at = _page()
    at.file_uploader(key="diagnose_upload").set_value(("first.png", _png(), "image/png")).run()
    at.file_uploader(key="diagnose_upload_1").set_value(("second.png", _png("blue"), "image/png")).run()
    assert not at.exception, at.exception
    assert at.subheader[0].value == "second\\.png" and not at.dataframe  # replaced: one image, its detail
    at.toggle(key="diagnose_add").set_value(True).run()
    at.file_uploader(key="diagnose_upload_2").set_value(("third.png", _png("green"), "image/png")).run()
    assert at.dataframe[0].value["image"].tolist() == ["second.png", "third.png"]  # added on purpose


def test_the_glossary_names_every_class_with_its_meaning(all_like_store, monkeypatch):
    at = _page()
    glossary = next(e for e in at.expander if e.label == "What the classes mean")
    text = "\n".join(m.value for m in glossary.markdown)
    for info in ALL_CLASSES:
        assert common.plain(info.name) in text and common.plain(info.meaning) in text
    assert len(glossary.get("image")) >= 4  # a reference image per class


def test_demo_modes_default_model_is_one_trained_on_what_visitors_can_try(
    all_like_store, synthetic_dataset, monkeypatch
):
    store = RunStore.open(common.settings.database_url())
    synthetic_runs = fill_store(store, synthetic_dataset)
    real_default = _page().multiselect(key="diagnose_runs").value
    assert store.get_run(real_default[0]).dataset.synthetic is False  # outside demo mode: the best on real data
    monkeypatch.setenv("BCD_DEMO_MODE", "1")
    at = _page()
    (chosen,) = at.multiselect(key="diagnose_runs").value
    assert store.get_run(chosen).dataset.synthetic and chosen in [synthetic_runs["holdout"], *synthetic_runs["cv"]]
    sources = {markdown.value for markdown in at.markdown}
    assert {"SYNTHETIC examples", common.plain(f"Test images of {Path(synthetic_dataset).name}")} <= sources
    assert not any("all-like" in caption for caption in sources)  # never a private folder's image in a demo


def test_the_explorers_glossary_reads_a_datasets_file_and_reports_a_malformed_one(
    workspace, synthetic_dataset_copy, monkeypatch
):
    monkeypatch.setenv("BCD_DATABASE_URL", workspace.url)
    monkeypatch.delenv("BCD_DEMO_MODE", raising=False)
    (synthetic_dataset_copy / CLASSES_FILE).write_text(json.dumps({"classes": {"Pro": {"name": "big drawn cells"}}}))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/explorer.py").run()
    at.radio(key="explorer_source").set_value("Local folder").run()
    at.text_input(key="explorer_folder").set_value(str(synthetic_dataset_copy)).run()
    assert not at.exception, at.exception
    glossary = next(e for e in at.expander if e.label == "What the classes mean")
    assert any("**Pro**: big drawn cells" in m.value for m in glossary.markdown)
    assert len(glossary.get("image")) == 4  # the dataset's own first image of each class
    (synthetic_dataset_copy / CLASSES_FILE).write_text('{"classes": {"Blast": {"name": "x"}}}')
    at.run()
    glossary = next(e for e in at.expander if e.label == "What the classes mean")
    assert any("not a class of this dataset" in w.value for w in glossary.warning)
    assert any("drawn pro" in m.value for m in glossary.markdown)  # the built-in words instead


def test_heat_on_the_label_corner_and_on_a_masked_region_gets_a_note_on_the_page(all_like_store, monkeypatch):
    store = RunStore.open(common.settings.database_url())
    monkeypatch.setattr(common, "load_model", lambda run_id: OneClassModel("Pro", run_id=run_id))

    def corner_heat(run_id, image, class_name):
        heat = np.zeros(image.shape[:2])
        heat[-6:, -6:] = 1  # the bottom-right corner of a 32-pixel image
        return image, heat

    monkeypatch.setattr(common, "grad_cam", corner_heat)
    at = _page()
    (run_id,) = at.multiselect(key="diagnose_runs").value
    label = {"x0": 0.75, "y0": 0.75, "x1": 1.0, "y1": 1.0, "name": "the scale-bar label"}
    store.update_run_config(run_id, {**store.get_run(run_id).config, "mask": {"regions": [label]}})
    at.file_uploader(key="diagnose_upload").set_value(("cell.png", _png(), "image/png")).run()
    assert not at.exception, at.exception
    notes = [w.value for w in at.warning if "of the heat lies" in w.value]
    assert len(notes) == 3, notes  # the border, the bottom-right corner, and the run's masked region
    assert "100% of the heat lies on the scale-bar label" in notes[2]
