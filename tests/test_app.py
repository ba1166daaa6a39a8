"""The dashboard pages through Streamlit's AppTest, on an empty isolated store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import APP, fill_store
from streamlit.testing.v1 import AppTest

from bcd_engine import cli
from bcd_engine.models.backbones import BACKBONES
from bcd_engine.models.config import TrainConfig
from bcd_engine.store import RunStore
from bcd_engine.training import queue, worker

PAGES = ["pages/explorer.py", "pages/train.py", "pages/compare.py", "pages/diagnose.py"]
TIMEOUT = 120


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Empty store, artifacts and cache under tmp_path; no worker process is ever spawned."""
    url = f"sqlite:///{tmp_path / 'results.db'}"
    monkeypatch.setenv("BCD_DATABASE_URL", url)
    monkeypatch.setenv("BCD_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("BCD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BCD_DEMO_MODE", raising=False)
    spawned = []
    monkeypatch.setattr(worker, "spawn_worker", lambda: spawned.append(1) or 0)
    return {"url": url, "spawned": spawned}


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    if page != PAGES[0]:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_an_empty_store(page):
    at = open_page(page)
    assert at.title[0].value
    assert at.expander  # the "what am I looking at" explainer


def test_explorer_shows_the_synthetic_demo_set_by_default():
    at = open_page("pages/explorer.py")
    assert any("SYNTHETIC" in w.value for w in at.warning)
    assert at.metric[0].value == "240"
    assert at.tabs and at.selectbox(key="explorer_sample_class").value == "Benign"


def test_explorer_sees_images_added_to_a_folder_it_has_shown(tmp_path, synthetic_dataset):
    folder = shutil.copytree(synthetic_dataset, tmp_path / "data")
    at = open_page("pages/explorer.py")
    at.radio(key="explorer_source").set_value("Local folder").run()
    at.text_input(key="explorer_folder").input(str(folder)).run()
    assert at.metric[0].value == "48"
    shutil.copy(next((folder / "Benign").iterdir()), folder / "Benign" / "added.png")
    at.run()
    assert not at.exception and at.metric[0].value == "49"


def test_explorer_reports_a_bad_folder_without_crashing():
    at = open_page("pages/explorer.py")
    at.radio(key="explorer_source").set_value("Local folder").run()
    at.text_input(key="explorer_folder").input("/nonexistent/folder").run()
    assert not at.exception
    assert "does not exist" in at.error[0].value


def test_compare_and_diagnose_offer_the_demo_model_when_there_are_no_runs():
    for page in ("pages/compare.py", "pages/diagnose.py"):
        at = open_page(page)
        assert any("No completed runs yet" in i.value for i in at.info)
        assert at.button(key=f"{page.split('/')[1][:-3]}_train_demo")


def test_launching_a_tiny_run_from_the_form_queues_it(isolated):
    at = open_page("pages/train.py")
    at.multiselect(key="train_backbones_sel").set_value(["mobilenetv2", "scratch_cnn"])
    at.number_input(key="train_image_size").set_value(32)
    at.number_input(key="train_epochs").set_value(1)
    at.number_input(key="train_label_smoothing").set_value(0.2)
    at.button(key="FormSubmitter:train_form-Queue run(s)").click().run()
    assert not at.exception, at.exception
    runs = RunStore(isolated["url"]).list_runs()
    assert sorted(r.backbone for r in runs) == ["mobilenetv2", "scratch_cnn"]
    assert {r.status for r in runs} == {"queued"}
    for run in runs:
        assert (run.config["train"]["image_size"], run.config["train"]["epochs"]) == (32, 1)
        assert run.config["train"]["label_smoothing"] == 0.2
    assert isolated["spawned"]  # the page asked for a worker


def test_a_blank_form_queues_what_the_cli_builds_for_every_backbone(isolated, synthetic_dataset, tmp_path):
    """The page passes only what the user changed: each backbone of a sweep gets the config that
    ``train --data D --backbone X [--weights W]`` builds, for weights none, ImageNet and a file (one backbone at a
    time); the scratch CNN always starts from none."""
    weights_file = tmp_path / "backbone.weights.h5"
    weights_file.touch()
    at = open_page("pages/train.py")
    at.text_input(key="train_folder").input(str(synthetic_dataset))
    store = RunStore(isolated["url"])

    def queued_configs(backbones: list[str], weights: str, path: str = "") -> dict[str, TrainConfig]:
        before = {run.id for run in store.list_runs()}
        at.multiselect(key="train_backbones_sel").set_value(backbones)
        at.selectbox(key="train_weights").set_value(weights)
        at.text_input(key="train_weights_path").input(path)
        at.button(key="FormSubmitter:train_form-Queue run(s)").click().run()
        assert not at.exception and not at.error, (at.exception, at.error)
        return {
            run.backbone: TrainConfig.from_dict(run.config["train"])
            for run in store.list_runs()
            if run.id not in before
        }

    def cli_config(backbone: str, weights: str | None) -> TrainConfig:
        argv = ["train", "--data", str(synthetic_dataset), "--backbone", backbone]
        if weights and BACKBONES[backbone].pretrained:
            argv += ["--weights", weights]
        return cli._config_from_args(cli.build_parser().parse_args(argv))

    for weights in ("none", "imagenet"):
        assert queued_configs(list(BACKBONES), weights) == {name: cli_config(name, weights) for name in BACKBONES}
    for name in [name for name, spec in BACKBONES.items() if spec.pretrained]:
        assert queued_configs([name], "file", str(weights_file)) == {name: cli_config(name, str(weights_file))}


def test_train_demo_model_button_queues_the_demo_run(isolated):
    at = open_page("pages/train.py")
    at.button(key="train_demo").click().run()
    (run,) = RunStore(isolated["url"]).list_runs()
    assert (run.backbone, run.status) == ("scratch_cnn", "queued")
    assert run.config["data_dir"].endswith("synthetic-demo")


def test_demo_mode_hides_training(monkeypatch):
    monkeypatch.setenv("BCD_DEMO_MODE", "1")
    at = open_page("pages/train.py")
    assert any("Demo mode" in i.value for i in at.info)
    assert not [b for b in at.button if b.key in ("train_demo", "FormSubmitter:train_form-Queue run(s)")]
    compare = open_page("pages/compare.py")
    assert not [b for b in compare.button if b.key == "compare_train_demo"]


def test_demo_mode_explorer_offers_no_path_input_and_only_public_datasets(monkeypatch, tmp_path, synthetic_dataset):
    public = shutil.copytree(synthetic_dataset, tmp_path / "public-cells")
    store = RunStore.open()
    store.register_dataset(name="private", data_dir=str(tmp_path / "private-all"), n_images=1, class_counts={"a": 1})
    monkeypatch.setenv("BCD_DEMO_MODE", "1")
    monkeypatch.setenv("BCD_DEMO_DATASETS", str(public))
    at = open_page("pages/explorer.py")
    assert not at.text_input and not [r for r in at.radio if r.key == "explorer_source"]
    labels = at.selectbox(key="explorer_dataset").options
    assert labels == ["SYNTHETIC demo set (synthetic-demo, not medical data)", "public-cells (public dataset)"]
    assert not any(str(tmp_path) in label for label in labels)


def frame_with(at: AppTest, *headers: str):
    """The one table on the page with all these column headers (st.dataframe's key does not reach AppTest)."""
    (frame,) = [d.value for d in at.dataframe if set(headers) <= set(d.value.columns)]
    return frame


def _charts(at: AppTest) -> dict[str, dict]:
    """The page's plotly figures by widget key."""
    return {c.proto.id.rpartition("-")[2]: json.loads(c.proto.spec) for c in at.get("plotly_chart")}


def test_compare_shows_cross_validation_lodo_intervals_and_reliability(isolated, synthetic_dataset):
    ids = fill_store(RunStore.open(isolated["url"]), synthetic_dataset)
    at = open_page("pages/compare.py")
    headers = [s.value for s in at.subheader]
    for wanted in (
        "Cross-validation",
        "Leave one dataset out",
        "Confusion matrices",
        "Images behind a confusion-matrix cell",
    ):
        assert wanted in headers
    assert any("Reliability" in h for h in headers) and any("shortcut audit" in h for h in headers)
    runs_table = frame_with(at, "test accuracy (95% CI)", "queued at")
    cv_summary, cv_folds = frame_with(at, "cross-validation", "folds"), frame_with(at, "cross-validation", "fold")
    lodo = frame_with(at, "held-out dataset")
    assert runs_table.set_index("run").loc[ids["holdout"], "test accuracy (95% CI)"].count("–") == 1
    assert list(cv_summary["folds"]) == ["3 of 3 completed"] and len(cv_folds) == 3
    assert list(lodo["held-out dataset"]) == ["Segmented"] and "–" in lodo.loc[0, "held-out accuracy (95% CI)"]

    charts = _charts(at)
    selected = at.multiselect(key="compare_selected").value
    assert {
        "compare_cv_chart",
        "compare_cv_cm",
        "compare_lodo_chart",
        "compare_intervals",
        *(f"compare_reliability_{i}" for i in selected),
    } <= charts.keys()
    assert all(len(bar["error_y"]["array"]) == 1 for bar in charts["compare_cv_chart"]["data"])
    assert sum(map(sum, charts["compare_cv_cm"]["data"][0]["z"])) == 48
    assert all("arrayminus" in bar["error_y"] for bar in charts["compare_intervals"]["data"])
    bars, diagonal = charts[f"compare_reliability_{selected[0]}"]["data"]
    assert bars["type"] == "bar" and diagonal["x"] == [0, 1] == diagonal["y"]
    assert "(group-aware, stratified)" in charts[f"compare_cm_{selected[0]}"]["layout"]["title"]["text"]
    assert [m.label for m in at.metric].count("ECE") == len(selected)
    assert len(charts["compare_risk_coverage"]["data"]) == len(selected)  # one curve per run

    # The cell picker starts at the most frequent mistake and shows exactly that cell's images.
    run_id = at.selectbox(key="compare_gallery_run").value
    true_class = at.selectbox(key=f"compare_cell_true_{run_id}").value
    predicted = at.selectbox(key=f"compare_cell_predicted_{run_id}").value
    evaluation = RunStore(isolated["url"]).get_evaluations(run_id)[0]
    names = evaluation.class_names
    counts = evaluation.confusion_matrix
    assert true_class != predicted and counts[names.index(true_class)][names.index(predicted)] == max(
        counts[i][j] for i in range(len(names)) for j in range(len(names)) if i != j
    )
    assert len(at.get("image")) == min(24, counts[names.index(true_class)][names.index(predicted)])


def test_compare_runs_the_shortcut_audit_once_and_reports_a_missing_model(isolated, synthetic_dataset):
    fill_store(RunStore.open(isolated["url"]), synthetic_dataset)
    at = open_page("pages/compare.py")
    assert "shapes" not in _charts(at)["compare_intervals"]["layout"]
    at.button(key="compare_audit_0").click().run()
    assert not at.exception, at.exception
    assert {"colour only", "corner only", "chance"} <= {m.label for m in at.metric}
    assert any(c.value.startswith("Colour statistics alone reach") for c in at.caption)
    intervals = _charts(at)["compare_intervals"]
    assert len(intervals["layout"]["shapes"]) == 3  # colour, corner and chance lines ...
    assert not intervals["layout"].get("annotations")  # ... named in the legend, not written over the bars
    assert {"colour only", "corner only", "chance"} <= {trace["name"].split(" (")[0] for trace in intervals["data"]}
    assert len(list((Path(isolated["url"][len("sqlite:///") :]).parent / "cache" / "audits").glob("*.json"))) == 1

    again = open_page("pages/compare.py")  # a later visit shows the cached audit at once
    assert not [b for b in again.button if b.key == "compare_audit_0"]
    assert {"colour only", "chance"} <= {m.label for m in again.metric}

    again.toggle(key="compare_gradcam").set_value(True).run()
    assert not again.exception, again.exception
    assert any("no saved model" in e.value for e in again.error)
    assert again.get("image")  # the gallery still shows the images, without heatmaps


def test_no_table_has_a_machine_header_and_curves_read_as_epochs_per_run(isolated, synthetic_dataset):
    fill_store(RunStore.open(isolated["url"]), synthetic_dataset)
    headers = []
    for page in PAGES:
        headers += [list(frame.value.columns) for frame in open_page(page).dataframe]
    assert len(headers) >= 8  # backbones, queue; runs, reference, CV summary and folds, LODO, per class
    machine = [h for columns in headers for h in columns if "_" in str(h)]
    assert not machine, machine

    at = open_page("pages/compare.py")
    at.multiselect(key="compare_selected").set_value([1, 3]).run()
    curves = _charts(at)["compare_curves"]
    assert [a["text"] for a in curves["layout"]["annotations"]] == ["Accuracy", "Loss"]
    assert curves["layout"]["xaxis"]["tickformat"] == "d" and curves["layout"]["xaxis"]["dtick"] == 1
    assert curves["layout"]["yaxis2"]["title"]["text"] == "loss"
    colours = {trace["name"].split(" — ")[0]: trace["line"]["color"] for trace in curves["data"]}
    assert set(colours) == {"run 1 · resnet50", "run 3 · mobilenetv2"} and len(set(colours.values())) == 2
    dashes = {trace["name"].split(" — ")[1]: trace["line"]["dash"] for trace in curves["data"]}
    assert dashes == {"training": "solid", "validation": "dash"}


def test_original_segmented_picker_offers_every_class(tmp_path, synthetic_dataset):
    for twin in ("Original", "Segmented"):
        shutil.copytree(synthetic_dataset, tmp_path / "all" / twin)
    at = open_page("pages/explorer.py")
    at.radio(key="explorer_source").set_value("Local folder").run()
    at.text_input(key="explorer_folder").input(str(tmp_path / "all" / "Original")).run()
    assert at.selectbox(key="explorer_twin_class").options == ["Benign", "Early", "Pre", "Pro"]
    at.selectbox(key="explorer_twin_class").set_value("Pro").run()
    picked = at.selectbox(key="explorer_twin_Pro")
    assert len(picked.options) == 12 and not at.exception
    captions = [image.caption for element in at.get("image") for image in element.proto.imgs]
    assert f"Segmented: {Path(picked.value).name}" in captions


def test_train_page_trains_from_a_local_weights_file_and_says_when_the_run_is_done(
    isolated, tmp_path, monkeypatch, synthetic_dataset
):
    import keras

    weights = tmp_path / "weights"
    weights.mkdir()
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(
        weights / "mobilenetv2_notop.weights.h5"
    )
    monkeypatch.setenv("BCD_WEIGHTS_DIR", str(weights))
    at = open_page("pages/train.py")
    options = at.selectbox(key="train_weights").options
    assert "file: mobilenetv2_notop.weights.h5" in options and "ImageNet (downloads; needs internet)" in options
    at.selectbox(key="train_weights").set_value(str(weights / "mobilenetv2_notop.weights.h5"))
    at.text_input(key="train_folder").input(str(synthetic_dataset))
    at.number_input(key="train_image_size").set_value(32)
    at.number_input(key="train_epochs").set_value(1)
    at.number_input(key="train_augment").set_value(1)
    at.button(key="FormSubmitter:train_form-Queue run(s)").click().run()
    assert not at.exception, at.exception
    (run,) = RunStore(isolated["url"]).list_runs()
    assert run.config["train"]["weights"] == str(weights / "mobilenetv2_notop.weights.h5")
    assert any(f"Run {run.id} (mobilenetv2) is queued" in i.value for i in at.info)

    assert worker.run_worker(store=RunStore(isolated["url"]), once=True) == [{"run_id": run.id, "status": "completed"}]
    at.run()
    (done,) = [s.value for s in at.success]
    assert done.startswith(f"Run {run.id} (mobilenetv2) finished in ") and "test accuracy" in done
    links = {link.proto.label: link.proto.query_string for link in at.get("page_link")}
    assert links[f"Compare run {run.id}"] == links[f"Diagnose with run {run.id}"] == f"run={run.id}"


def test_a_typed_weights_path_that_does_not_exist_is_refused_and_nothing_is_queued(isolated):
    at = open_page("pages/train.py")
    at.selectbox(key="train_weights").set_value("file")
    at.text_input(key="train_weights_path").input("/nowhere/resnet50.weights.h5")
    at.button(key="FormSubmitter:train_form-Queue run(s)").click().run()
    assert "weights file not found: /nowhere/resnet50.weights.h5" in at.error[0].value
    assert RunStore(isolated["url"]).list_runs() == []


def test_a_failed_run_is_queued_again_from_the_train_page_with_its_settings(isolated, synthetic_dataset):
    at = open_page("pages/train.py")
    at.text_input(key="train_folder").input(str(synthetic_dataset))
    at.number_input(key="train_image_size").set_value(32)
    at.number_input(key="train_epochs").set_value(2)
    at.button(key="FormSubmitter:train_form-Queue run(s)").click().run()
    store = RunStore(isolated["url"])
    (run,) = store.list_runs()
    store.claim_next_queued(worker_id="test")
    store.finish_run(run.id, status="failed", error="ResourceExhaustedError: out of memory\nlong trace ...")
    at.run()
    assert any(e.value.startswith(f"Run {run.id} (mobilenetv2) failed: ResourceExhaustedError") for e in at.error)
    at.button(key=f"train_again_{run.id}").click().run()
    assert not at.exception, at.exception
    again = store.list_runs()[0]
    assert again.id != run.id and again.status == "queued"
    assert again.config["train"] == run.config["train"] and again.config["data_dir"] == run.config["data_dir"]
    assert any(f"Run {again.id} (mobilenetv2) is queued" in i.value for i in at.info)
    assert not [b for b in at.button if b.key == f"train_again_{run.id}"]  # the old failure is dismissed


def test_train_on_this_dataset_in_the_explorer_makes_it_the_train_pages_dataset(isolated, synthetic_dataset):
    at = open_page("pages/explorer.py")
    at.radio(key="explorer_source").set_value("Local folder").run()
    at.text_input(key="explorer_folder").input(str(synthetic_dataset)).run()
    at.button(key="explorer_train").click().run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Train"
    chosen = at.selectbox(key="train_dataset")
    assert str(synthetic_dataset) in chosen.options[chosen.index]  # preselected, and registered in the store
    assert at.text_input(key="train_folder").value == ""
    assert [d.root for d in RunStore(isolated["url"]).list_datasets()][-1] == str(synthetic_dataset)
    chosen.select_index(0)  # the user's own choice wins over the handed-over dataset
    at.button(key="FormSubmitter:train_form-Queue run(s)").click().run()
    (run,) = RunStore(isolated["url"]).list_runs()
    assert run.config["data_dir"].endswith("synthetic-demo")
    assert at.selectbox(key="train_dataset").index == 0


def test_weights_default_to_the_weights_folders_imagenet_file_of_the_chosen_backbone(
    isolated, tmp_path, monkeypatch, synthetic_dataset
):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "resnet50_imagenet_notop.weights.h5").touch()  # named as ../shared has it; never loaded here
    monkeypatch.setenv("BCD_WEIGHTS_DIR", str(weights))
    at = open_page("pages/train.py")
    assert at.selectbox(key="train_weights").value == "none"  # mobilenetv2 has no file there
    assert at.text_input(key="train_weights_path").placeholder == (
        "~/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    )
    at.multiselect(key="train_backbones_sel").set_value(["resnet50"]).run()
    assert at.selectbox(key="train_weights").value == "local"
    assert "ImageNet, from the weights folder (resnet50_imagenet_notop.weights.h5)" in (
        at.selectbox(key="train_weights").options
    )
    assert at.text_input(key="train_weights_path").placeholder.endswith(
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    )
    at.text_input(key="train_folder").input(str(synthetic_dataset))
    at.button(key="FormSubmitter:train_form-Queue run(s)").click().run()
    (run,) = RunStore(isolated["url"]).list_runs()
    assert run.config["train"]["weights"] == str(weights / "resnet50_imagenet_notop.weights.h5")
    at.multiselect(key="train_backbones_sel").set_value(["resnet50", "vgg16"]).run()
    assert at.selectbox(key="train_weights").value == "none"  # vgg16 has no file: no silent download


def test_cancel_asks_once_and_a_cancelled_run_reads_as_cancelled_with_its_curves(isolated, synthetic_dataset):
    store = RunStore.open(isolated["url"])
    config = TrainConfig.for_backbone("scratch_cnn", image_size=32, epochs=3)
    run_id = queue.queue_run(store, config, synthetic_dataset)
    store.claim_next_queued(worker_id="elsewhere")
    store.log_epoch(run_id, phase=1, epoch=1, train_loss=1.0, train_accuracy=0.5, val_loss=1.1, val_accuracy=0.4)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["my_runs"] = [run_id]  # queued by this visitor
    at.run()
    at.switch_page("pages/train.py").run()
    at.button(key=f"train_cancel_{run_id}").click().run()
    assert any(f"Stop run {run_id}?" in w.value for w in at.warning) and not store.is_cancel_requested(run_id)
    at.button(key=f"train_cancel_no_{run_id}").click().run()
    assert not any("Stop run" in w.value for w in at.warning) and not store.is_cancel_requested(run_id)
    at.button(key=f"train_cancel_{run_id}").click().run()
    at.button(key=f"train_cancel_yes_{run_id}").click().run()
    assert store.is_cancel_requested(run_id)

    store.finish_run(run_id, status="cancelled", error="cancelled by user")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(i.value.startswith(f"Run {run_id} (scratch_cnn) was cancelled") for i in at.info)
    assert f"train_final_curves_{run_id}" in _charts(at)  # the curves stay after the run ends
