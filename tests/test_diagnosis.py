"""Diagnosis: dihedral test-time augmentation, uncertainty, ensembles and batches with bad files in them."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bcd_engine.errors import ConfigError
from bcd_engine.inference.diagnosis import (
    Diagnoser,
    Source,
    dihedral_views,
    reading,
    results_csv,
    results_frame,
    sources_from_paths,
    uncertainty,
)
from bcd_engine.inference.loading import LoadedModel
from bcd_engine.inference.results import Diagnosis
from bcd_engine.models.config import TrainConfig

CLASSES = ["Benign", "Early", "Pre", "Pro"]
SIZE = 32


def loaded_model(model, run_id: int = 1, class_names=CLASSES, size: int = SIZE) -> LoadedModel:
    # as a stored run's config holds it: regions resolved (here none), never "auto"
    config = TrainConfig(backbone="scratch_cnn", image_size=size, batch_size=8, mask_regions="none")
    return LoadedModel(run_id, model, config, list(class_names))


def pooled_model(seed: int = 0, size: int = SIZE):
    """Global average pooling then a dense softmax: its output cannot depend on flips or turns."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    return keras.Model(inputs, keras.layers.Dense(len(CLASSES), activation="softmax")(x))


def top_row_model():
    """Reads only the image's top row: flips and turns change what it sees."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Lambda(lambda t: t[:, 0, :, 0])(inputs)
    return keras.Model(inputs, keras.layers.Dense(len(CLASSES), activation="softmax")(x))


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def test_dihedral_views_are_the_eight_distinct_flips_and_turns():
    image = np.arange(9, dtype=np.uint8).reshape(1, 3, 3, 1)
    views = dihedral_views(image)
    assert views.shape == (8, 1, 3, 3, 1)
    np.testing.assert_array_equal(views[0], image)
    assert len({v.tobytes() for v in views}) == 8


def test_a_rotation_invariant_model_has_zero_disagreement():
    diagnoser = Diagnoser([loaded_model(pooled_model())])
    for result in diagnoser.diagnose_arrays([random_images(5)]):
        assert result.uncertainty["disagreement"] == 0
        assert result.uncertainty["spread"] == pytest.approx(0, abs=1e-6)
        assert result.uncertainty["views"] == 8
        assert sum(result.probabilities.values()) == pytest.approx(1, abs=1e-5)


def test_a_model_that_depends_on_orientation_disagrees_with_itself():
    diagnoser = Diagnoser([loaded_model(top_row_model())])
    disagreements = [r.uncertainty["disagreement"] for r in diagnoser.diagnose_arrays([random_images(20)])]
    assert max(disagreements) > 0


def test_uncertainty_and_its_plain_reading():
    agreeing = np.array([[0.9, 0.05, 0.05]] * 8)
    certainty = uncertainty(agreeing)
    assert certainty == pytest.approx(
        {"confidence": 0.9, "margin": 0.85, "disagreement": 0.0, "spread": 0.0, "views": 8}
    )
    assert reading("Pro", certainty) == (
        "ok",
        "The model gives Pro with 90.0% confidence, and all 8 looks "
        "(flips and turns) agree. This is a research tool, not a diagnosis.",
    )
    single = uncertainty(np.array([[0.9, 0.1]]))
    assert "agree" not in reading("Pro", single)[1]
    split = np.array([[0.8, 0.2, 0.0]] * 5 + [[0.2, 0.8, 0.0]] * 3)
    level, sentence = reading("Benign", uncertainty(split))
    assert level == "conflicting" and "3 of 8" in sentence
    assert reading("Pre", uncertainty(np.array([[0.5, 0.3, 0.2]])))[0] == "unsure"
    at_chance = uncertainty(np.full((8, 4), 0.25))  # every class tied: the answer is the first, as argmax gives
    assert at_chance["disagreement"] == 0 and reading("Benign", at_chance)[0] == "unsure"


def test_an_ensemble_averages_its_models():
    first, second = loaded_model(pooled_model(0), 1), loaded_model(pooled_model(1), 2)
    images = random_images(3)
    single = [Diagnoser([m]).diagnose_arrays([images], tta=False) for m in (first, second)]
    both = Diagnoser([first, second]).diagnose_arrays([images, images], tta=False)
    for a, b, ensemble in zip(*single, both, strict=True):
        for name in CLASSES:
            assert ensemble.probabilities[name] == pytest.approx(
                (a.probabilities[name] + b.probabilities[name]) / 2, abs=1e-6
            )
        assert ensemble.uncertainty["views"] == 2


def test_an_ensemble_of_models_of_different_sizes_diagnoses_each_file_once_decoded(tmp_path):
    small, large = loaded_model(pooled_model(0), 1), loaded_model(pooled_model(1, size=40), 2, size=40)
    smear = tmp_path / "smear.png"
    smear.write_bytes(png_bytes(np.random.default_rng(3).integers(0, 256, (48, 40, 3), dtype=np.uint8)))
    (alone_small,), (alone_large,) = (Diagnoser([m]).diagnose([Source("s", smear)]) for m in (small, large))
    (both,) = Diagnoser([small, large]).diagnose([Source("s", smear)])
    for name in CLASSES:
        assert both.probabilities[name] == pytest.approx(
            (alone_small.probabilities[name] + alone_large.probabilities[name]) / 2, abs=1e-6
        )


def test_an_ensemble_needs_the_same_classes():
    with pytest.raises(ConfigError, match="same classes"):
        Diagnoser([loaded_model(pooled_model(), 1), loaded_model(pooled_model(), 2, ["a", "b", "c", "d"])])
    with pytest.raises(ConfigError, match="choose at least one run"):
        Diagnoser([])


def test_a_batch_keeps_going_past_bad_files_and_reports_progress(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(random_images(1)[0]))
    fake = tmp_path / "fake.jpg"
    fake.write_text("<html>not an image</html>")
    sources = [
        Source("good", good),
        Source("fake", fake),
        Source("bytes", png_bytes(random_images(1, 1)[0])),
        Source("missing", tmp_path / "missing.png"),
        Source("garbage", b"\x00" * 64),
    ]
    seen = []
    results = Diagnoser([loaded_model(pooled_model())]).diagnose(
        sources, batch_size=3, on_progress=lambda done, total: seen.append((done, total))
    )
    assert [r.name for r in results] == ["good", "fake", "bytes", "missing", "garbage"]
    assert results[0].predicted_class is not None and results[2].predicted_class is not None
    assert [r.usable for r in results] == [True, False, True, False, False]
    # The reason alone: the result already carries the file's name.
    assert results[1].error == "not a recognised image format (looks like an HTML page)"
    assert results[3].error.startswith("cannot read file")
    assert results[4].error == "not a recognised image format"
    assert seen == [(3, 5), (5, 5)]
    table = results_frame(results)
    assert list(table["image"]) == ["good", "fake", "bytes", "missing", "garbage"]
    assert table["error"].notna().tolist() == [False, True, False, True, True]
    assert pd.read_csv(io.BytesIO(results_csv(results))).shape[0] == 5


def test_sources_from_folders_and_zip_archives(tmp_path):
    folder = tmp_path / "smears"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(png_bytes(random_images(1)[0]))
    (folder / "sub" / "b.png").write_bytes(png_bytes(random_images(1)[0]))
    (folder / "notes.txt").write_text("skip me")
    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("c.png", png_bytes(random_images(1)[0]))
    renamed = tmp_path / "batch.download"  # a zip is known by its content as well as its name
    renamed.write_bytes(archive.read_bytes())
    names = [s.name for s in sources_from_paths([folder, archive, renamed])]
    assert names == [str(folder / "a.png"), str(folder / "sub" / "b.png"), f"{archive}/c.png", f"{renamed}/c.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    (no_images, bad_archive) = sources_from_paths([empty, broken])
    assert no_images.data is None and "no supported image files" in no_images.error
    assert bad_archive.data is None and bad_archive.error


def test_uploads_become_sources_and_a_bad_upload_costs_only_itself(monkeypatch):
    from bcd_engine.inference import diagnosis

    image = png_bytes(random_images(1)[0])
    good_zip, evil_zip = io.BytesIO(), io.BytesIO()
    with zipfile.ZipFile(good_zip, "w") as zf:
        zf.writestr("c.png", image)
    with zipfile.ZipFile(evil_zip, "w") as zf:
        zf.writestr("../escape.png", image)
    monkeypatch.setattr(diagnosis, "MAX_UPLOAD_BYTES", len(image) + 10)
    sources, rejected = diagnosis.upload_sources(
        [
            ("a.png", image),
            ("big.png", image + b"\0" * 20),
            ("batch.download", good_zip.getvalue()),
            ("evil.zip", evil_zip.getvalue()),
        ]
    )
    assert [s.name for s in sources] == ["a.png", "batch.download/c.png"]
    assert [r.name for r in rejected] == ["big.png", "evil.zip"]
    assert "the limit is" in rejected[0].error and "unsafe member path" in rejected[1].error


def test_many_small_archives_in_one_upload_cannot_add_up_past_its_budget():
    from bcd_engine.inference import diagnosis

    batch = io.BytesIO()
    with zipfile.ZipFile(batch, "w", zipfile.ZIP_STORED) as zf:
        for i in range(4):
            zf.writestr(f"{i}.png", png_bytes(random_images(1, seed=i)[0]))
    data = batch.getvalue()
    budget = 3 * len(data)  # an archive costs about twice its size: its bytes and its members'
    sources, rejected = diagnosis.upload_sources([(f"batch{i}.zip", data) for i in range(3)], max_total_bytes=budget)
    assert [s.name for s in sources] == [f"batch0.zip/{i}.png" for i in range(4)]
    assert [r.name for r in rejected] == ["batch1.zip", "batch2.zip"]
    assert all(
        "one upload may hold in memory; refused" in r.error or "the upload would hold more than" in r.error
        for r in rejected
    )
    image = png_bytes(random_images(1)[0])
    sources, rejected = diagnosis.upload_sources([("a.png", image), ("b.png", image)], max_total_bytes=len(image) + 1)
    assert [s.name for s in sources] == ["a.png"]
    assert [r.to_dict() for r in rejected] == [
        {
            "name": "b.png",
            "error": f"b.png: the upload would hold more than "
            f"{len(image) + 1:,} bytes in memory ({len(image):,} bytes already); "
            "refused",
        }
    ]


def test_diagnosing_step_by_step_gives_the_same_results_and_keeps_a_lone_image_once_decoded():
    diagnoser = Diagnoser([loaded_model(pooled_model())])
    images = random_images(3, seed=5)
    sources = [Source(f"{i}.png", png_bytes(image)) for i, image in enumerate(images)]
    steps = diagnoser.diagnose_steps(sources, batch_size=2, keep_images=True)
    assert next(steps) == (2, 3) and next(steps) == (3, 3)
    with pytest.raises(StopIteration) as stop:
        next(steps)
    kept = stop.value.value
    for image, result, plain in zip(images, kept, diagnoser.diagnose(sources), strict=True):
        np.testing.assert_array_equal(result.image, image)  # the pixels the model saw
        assert plain.image is None and result == plain  # the same diagnosis (the pixels are not compared)


def test_plain_images_count_towards_the_uploads_file_limit():
    from bcd_engine.inference import diagnosis

    image = png_bytes(random_images(1)[0])
    sources, rejected = diagnosis.upload_sources([(f"{i}.png", image) for i in range(3)], max_files=2)
    assert [s.name for s in sources] == ["0.png", "1.png"]
    assert rejected == [Diagnosis.unusable("2.png", "2.png: the upload would hold more than 2 files; refused")]
