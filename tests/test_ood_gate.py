"""The out-of-domain gate's threshold: at most 1% of new in-domain images refused, far images still refused.

Feature-level checks draw in-domain features from one generator (so fresh ones are exactly "the same
kind of image"); the image-level check trains a tiny run on synthetic smears and scores fresh smears
drawn by the same generator with another seed, noise, blank frames and crops of a photograph.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import APP, workspace_store

from bcd_engine.errors import ConfigError
from bcd_engine.evaluation.ood import (
    DEFAULT_PASS_RATE,
    HELD_OUT_BOUND_RULE,
    MahalanobisGate,
    cross_fitted_scores,
    pass_bound,
)

OLD_PASS_RATE = 0.95  # the rule before: the 95th percentile of the validation scores
TOLERANCE = 0.02  # fresh in-domain images refused: the new rule must stay under it, the old one does not


def _in_domain(rng: np.random.Generator, n: int, *, spread: float = 1.0, d: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """``n`` feature rows of 4 classes: fixed class means, correlated and heavy-tailed (Student t, 5 degrees of
    freedom) around them, ``spread`` times the usual scale."""
    means = np.random.default_rng(99).normal(0, 3, (4, d))
    mixing = np.random.default_rng(98).normal(0, 1, (d, d)) / np.sqrt(d)
    labels = rng.integers(0, 4, n)
    noise = rng.standard_t(5, (n, d)) @ mixing
    return means[labels] + spread * noise, labels


@pytest.mark.parametrize("seed", range(5))
def test_at_most_about_one_in_a_hundred_new_in_domain_images_is_refused_where_the_old_rule_refused_one_in_twenty(
    seed,
):
    rng = np.random.default_rng(seed)
    train, train_labels = _in_domain(rng, 800)
    val, _ = _in_domain(rng, 200)
    fresh, _ = _in_domain(rng, 20_000)
    gate = MahalanobisGate.fit(train, train_labels, val)
    refused = float(np.mean(~gate.in_domain(fresh)))
    old_threshold = np.quantile(gate.score(val), OLD_PASS_RATE)
    old_refused = float(np.mean(gate.score(fresh) > old_threshold))
    assert refused <= TOLERANCE < old_refused, (refused, old_refused)
    assert gate.pass_rate == DEFAULT_PASS_RATE == 0.99 and gate.rule == HELD_OUT_BOUND_RULE


def test_far_features_stay_refused():
    rng = np.random.default_rng(0)
    train, train_labels = _in_domain(rng, 800)
    val, _ = _in_domain(rng, 200)
    gate = MahalanobisGate.fit(train, train_labels, val)
    far = {
        "shifted": _in_domain(rng, 500)[0] + 6,
        "zeros (a blank frame's features)": np.zeros((1, 24)),
        "noise": rng.normal(0, 10, (500, 24)),
    }
    for name, features in far.items():
        assert not gate.in_domain(features).any(), name


def test_validation_images_guard_the_threshold_when_training_features_sit_too_close_to_their_means():
    """As for a network trained on its training images: their features are tighter than a new image's."""
    rng = np.random.default_rng(3)
    train, train_labels = _in_domain(rng, 800, spread=0.6)
    val, _ = _in_domain(rng, 400)
    fresh, _ = _in_domain(rng, 20_000)
    gate = MahalanobisGate.fit(train, train_labels, val)
    scores = gate.score(fresh)
    pooled_only = pass_bound(np.r_[cross_fitted_scores(train, train_labels), gate.score(val)])
    assert np.mean(scores > gate.threshold) <= TOLERANCE < np.mean(scores > pooled_only)


def test_cross_fitted_scores_come_from_gates_that_never_saw_the_row():
    rng = np.random.default_rng(1)
    x, labels = _in_domain(rng, 60, d=40)  # few rows for their features: a row pulls its own fit towards it
    in_sample = MahalanobisGate.fit(x, labels, x[:0]).score(x)
    held_out = cross_fitted_scores(x, labels, folds=5)
    assert held_out.shape == (60,) and np.median(held_out) > 1.5 * np.median(in_sample)
    np.testing.assert_array_equal(held_out, cross_fitted_scores(x, labels, folds=5))  # seeded folds
    assert cross_fitted_scores(x[:3], labels[:3]).shape == (0,)  # too few rows to hold any out


@pytest.mark.parametrize(
    "n, kth_highest",
    [(10, 1), (298, 1), (299, 1), (489, 2), (2767, 19)],  # P(Binomial(n, 0.01) >= k) >= 0.95, by hand-checked table
)
def test_pass_bound_is_the_kth_highest_score_that_keeps_99_percent_with_95_percent_confidence(n, kth_highest):
    scores = np.random.default_rng(n).permutation(np.arange(n, dtype=float))
    assert pass_bound(scores, pass_rate=0.99, confidence=0.95) == n - kth_highest


def test_pass_bound_is_looser_when_it_must_be_surer_or_let_more_through():
    scores = np.arange(2000.0)
    assert pass_bound(scores, pass_rate=0.95) < pass_bound(scores, pass_rate=0.99) < pass_bound(scores, pass_rate=0.999)
    assert pass_bound(scores, confidence=0.5) < pass_bound(scores, confidence=0.95)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: pass_bound([]), "at least one in-domain score"),
        (lambda: MahalanobisGate.fit(np.zeros((4, 2)), [0, 0, 1, 1], [], pass_rate=1.0), "between 0 and 1"),
        (lambda: MahalanobisGate.fit(np.zeros((4, 2)), [0, 0, 1, 1], [], confidence=0), "between 0 and 1"),
        (lambda: MahalanobisGate.fit(np.zeros((1, 2)), [0], []), "at least 2 training feature rows"),
    ],
)
def test_bad_arguments_raise_config_error(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


# -- a trained run's gate on images ----------------------------------------------------------------

SIZE = 32


def photograph_crops(n: int, *, size: int = SIZE) -> np.ndarray:
    """``n`` square crops of a real photograph (scikit-learn's sample ``china.jpg``), at ``size`` pixels."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("china.jpg")  # 427 x 640 RGB, shipped inside scikit-learn
    rng = np.random.default_rng(0)
    crops = []
    for _ in range(n):
        side = int(rng.integers(120, 400))
        top, left = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size))
        crops.append(np.asarray(crop))
    return np.stack(crops)


@pytest.fixture(scope="module")
def smears(tmp_path_factory):
    """A tiny run trained on 240 synthetic smears, and 400 fresh smears the same generator drew with another seed."""
    from bcd_engine.data.images import load_images
    from bcd_engine.data.synthetic import make_synthetic_dataset
    from bcd_engine.inference.loading import load_run_model
    from bcd_engine.models.config import AugmentConfig, TrainConfig
    from bcd_engine.training.run import train

    root = tmp_path_factory.mktemp("gate")
    with pytest.MonkeyPatch.context() as patch:
        store = workspace_store(root / "store", patch)
        data = make_synthetic_dataset(root / "train", n_per_class=60, image_size=SIZE, seed=0)
        config = TrainConfig(
            backbone="scratch_cnn",
            image_size=SIZE,
            epochs=2,
            batch_size=16,
            dense_units=8,
            augment=AugmentConfig(factor=1),
            tta_views=1,
        )
        result = train(config, data, store=store)
        loaded = load_run_model(result.run_id, store=store)
        fresh_dir = make_synthetic_dataset(root / "fresh", n_per_class=100, image_size=SIZE, seed=1)
        fresh = load_images(sorted(str(p) for p in fresh_dir.glob("*/*.png")), image_size=SIZE)
        yield store, loaded, fresh


def test_a_trained_runs_gate_keeps_fresh_smears_and_refuses_noise_blank_frames_and_photographs(smears):
    from bcd_engine.data.images import load_images

    store, loaded, fresh = smears
    gate = loaded.trust.gate

    def refused(images: np.ndarray) -> float:
        return float(np.mean(~gate.in_domain(loaded.forward_with_features(images)[1])))

    val = load_images(
        [row["path"] for row in store.get_split(loaded.run_id) if row["subset"] == "val"], image_size=SIZE
    )
    old_threshold = np.quantile(gate.score(loaded.forward_with_features(val)[1]), OLD_PASS_RATE)
    fresh_scores = gate.score(loaded.forward_with_features(fresh)[1])
    assert np.mean(fresh_scores > gate.threshold) <= TOLERANCE < np.mean(fresh_scores > old_threshold)
    rng = np.random.default_rng(0)
    far = {
        "noise": rng.integers(0, 256, (100, SIZE, SIZE, 3), dtype=np.uint8),
        "blank white": np.full((10, SIZE, SIZE, 3), 255, np.uint8),
        "blank black": np.zeros((10, SIZE, SIZE, 3), np.uint8),
        "photograph crops": photograph_crops(40),
    }
    for name, images in far.items():
        assert refused(images) == 1.0, name
    (evaluation,) = store.get_evaluations(loaded.run_id)
    assert evaluation.metrics["ood_rule"] == HELD_OUT_BOUND_RULE and evaluation.metrics["ood_pass_rate"] == 0.99


def test_the_model_card_says_what_share_of_its_own_test_images_the_gate_refused(smears):
    import dataclasses

    from bcd_engine.export.card import model_card

    store, loaded, _ = smears
    run, (evaluation,) = store.get_run(loaded.run_id), store.get_evaluations(loaded.run_id)
    metrics = evaluation.metrics
    card = model_card(run, [evaluation])
    share = f"{metrics['ood_flagged_share']:.1%}"
    assert f"**Own test images refused by the gate: {share}** ({metrics['ood_flagged']} of {metrics['n']}:" in card
    assert "with 95% confidence, at most 1.0% of new images like the training images are refused" in card
    old = {key: value for key, value in metrics.items() if key != "ood_rule"} | {"ood_pass_rate": 0.95}
    old_card = model_card(run, [dataclasses.replace(evaluation, metrics=old)])
    assert "a threshold that 95.0% of the validation images pass" in old_card and share in old_card


def test_a_gate_saved_before_the_rule_was_named_still_loads_and_a_new_one_keeps_its_rule(tmp_path):
    from bcd_engine.evaluation.ood import VALIDATION_QUANTILE_RULE
    from bcd_engine.inference.trust import RunTrust

    means, precision = np.arange(6.0).reshape(2, 3), np.eye(3)
    old_file = tmp_path / "old.npz"
    np.savez(old_file, means=means, precision=precision, threshold=12.5, pass_rate=0.95, temperature=1.25)  # 1.x
    old = RunTrust.load(old_file)
    assert (old.gate.threshold, old.gate.pass_rate, old.gate.rule, old.temperature) == (
        12.5,
        0.95,
        VALIDATION_QUANTILE_RULE,
        1.25,
    )
    np.testing.assert_array_equal(old.gate.score(means), [0.0, 0.0])
    new_file = tmp_path / "new.npz"
    RunTrust(MahalanobisGate(means, precision, threshold=30.0), 1.0).save(new_file)
    new = RunTrust.load(new_file)
    assert (new.gate.threshold, new.gate.pass_rate, new.gate.rule) == (30.0, DEFAULT_PASS_RATE, HELD_OUT_BOUND_RULE)
    with np.load(new_file, allow_pickle=False) as data:  # what an older bcd reads is still there
        assert {"means", "precision", "threshold", "pass_rate", "temperature"} <= set(data.files)


def test_compare_shows_the_share_of_its_own_test_images_the_gate_refused(smears, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from bcd_engine.training import worker

    monkeypatch.delenv("BCD_DEMO_MODE", raising=False)
    monkeypatch.setattr(worker, "spawn_worker", lambda: 0)
    store, loaded, _ = smears
    monkeypatch.setenv("BCD_DATABASE_URL", store.url)
    share = store.get_evaluations(loaded.run_id)[0].metrics["ood_flagged_share"]
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/compare.py").run()
    assert not at.exception, at.exception
    assert [m.value for m in at.metric if m.label == "Own test images refused"] == [f"{share:.1%}"]
