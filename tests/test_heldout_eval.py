# Copyright 2026 The pmf-diffusers developers. MIT License.
"""The held-out real-data evaluation on cases with known answers (scikit-learn's real 8×8 digits, no generator)."""

import numpy as np
import pytest


sklearn = pytest.importorskip("sklearn")

from pmf_diffusers.evaluation.heldout import (  # noqa: E402
    MEMORISATION_RATIO_THRESHOLD,
    HeldOutEvaluator,
    pixel_features,
)


@pytest.fixture(scope="module")
def digits():
    """Three disjoint stratified real splits as uint8 8×8 images: train (50 %), held-out (25 %), fresh (25 %)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = np.round(data.images * (255 / 16)).astype(np.uint8)
    labels = data.target
    train, rest = train_test_split(np.arange(len(labels)), test_size=0.5, random_state=0, stratify=labels)
    heldout, fresh = train_test_split(rest, test_size=0.5, random_state=0, stratify=labels[rest])
    return {name: (images[index], labels[index]) for name, index in (("train", train), ("heldout", heldout), ("fresh", fresh))}


@pytest.fixture(scope="module")
def evaluator(digits):
    return HeldOutEvaluator(*digits["train"], *digits["heldout"], feature_size=8, seed=0)


def test_pixel_features_downsamples_by_area_and_checks_shapes():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(3, 8, 8), dtype=np.uint8)
    upscaled = small.repeat(4, axis=1).repeat(4, axis=2)  # nearest ×4: each 4×4 block is one original pixel
    np.testing.assert_allclose(pixel_features(upscaled, 8), small.reshape(3, 64) / 255.0)
    rgb_float = np.repeat(upscaled[:, None].astype(np.float32) / 255.0, 3, axis=1)  # (N, 3, H, W) in [0, 1]
    np.testing.assert_allclose(pixel_features(rgb_float, 8), small.reshape(3, 64) / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of feature_size"):
        pixel_features(np.zeros((2, 30, 30), dtype=np.uint8), 8)
    with pytest.raises(ValueError, match="batch of images"):
        pixel_features(np.zeros((30, 30), dtype=np.uint8), 8)


def test_identical_to_heldout_gives_perfect_precision_recall_and_zero_fd(evaluator, digits):
    images, labels = digits["heldout"]
    report = evaluator.evaluate(images, labels)
    assert report["precision"] == 1.0 and report["recall"] == 1.0
    assert report["fd"] == pytest.approx(0.0, abs=1e-9)
    assert report["accuracy"] >= 0.95
    for scores in report["per_class"].values():
        assert scores["precision"] == 1.0 and scores["recall"] == 1.0


def test_fresh_real_digits_score_like_the_real_reference(evaluator, digits):
    """Unseen real digits are what a perfect generator produces: FD near its floor, high P/R, no memorisation."""
    report = evaluator.evaluate(*digits["fresh"])
    assert report["classifier_heldout_accuracy"] >= 0.95
    assert report["accuracy"] >= 0.95
    assert 0.5 <= report["fd_ratio"] <= 2.0
    assert report["precision"] >= 0.8 and report["recall"] >= 0.8
    assert abs(report["precision"] - report["real_precision"]) < 0.1
    assert abs(report["recall"] - report["real_recall"]) < 0.1
    memorisation = report["memorisation"]
    assert not memorisation["flagged"]
    assert 0.8 <= memorisation["ratio"] <= 1.25
    assert abs(memorisation["near_copy_excess"]) < 0.05


def test_shifted_digits_have_large_fd_and_low_precision(evaluator, digits):
    images, labels = digits["fresh"]
    shifted = np.roll(images, 3, axis=2)  # every digit moved 3 of its 8 pixels to the right
    report = evaluator.evaluate(shifted, labels)
    assert report["fd_ratio"] > 10
    assert report["precision"] < 0.3
    assert report["accuracy"] < 0.5


def test_mode_collapse_keeps_precision_but_loses_recall(evaluator, digits):
    images, labels = digits["fresh"]
    one_per_class = {c: images[np.flatnonzero(labels == c)[0]] for c in np.unique(labels)}
    collapsed = np.stack([one_per_class[c] for c in labels])
    report = evaluator.evaluate(collapsed, labels)
    assert report["recall"] < 0.1
    assert report["fd_ratio"] > 5


def test_copies_of_training_images_are_flagged(evaluator, digits):
    train_images, train_labels = digits["train"]
    rng = np.random.default_rng(0)
    picked = rng.choice(len(train_labels), size=400, replace=True)  # duplicated training images
    report = evaluator.evaluate(train_images[picked], train_labels[picked])
    memorisation = report["memorisation"]
    assert memorisation["flagged"]
    assert memorisation["ratio"] < MEMORISATION_RATIO_THRESHOLD
    assert memorisation["near_copies_of_train"] == 1.0
    assert all(scores["memorisation"]["flagged"] for scores in report["per_class"].values())


def test_partial_copying_is_flagged_by_the_near_copy_excess(evaluator, digits):
    """A quarter of copied training digits among fresh ones leaves the median distances alone but is still caught."""
    fresh_images, fresh_labels = digits["fresh"]
    train_images, train_labels = digits["train"]
    copies = np.random.default_rng(1).choice(len(train_labels), size=len(fresh_labels) // 4, replace=False)
    images = np.concatenate([fresh_images, train_images[copies]])
    labels = np.concatenate([fresh_labels, train_labels[copies]])
    memorisation = evaluator.evaluate(images, labels)["memorisation"]
    assert memorisation["flagged"]
    assert memorisation["near_copy_excess"] > 0.1


def test_per_class_scores_isolate_a_broken_class(evaluator, digits):
    images, labels = digits["fresh"]
    keep = labels != 5
    images, broken = images[keep], labels[keep].copy()
    broken[broken == 3] = 5  # every "5" sample is actually a 3 (and class 3 gets no samples)
    report = evaluator.evaluate(images, broken)
    assert 3 not in report["per_class"]
    assert report["per_class"][5]["accuracy"] < 0.6
    assert report["per_class"][5]["fd_ratio"] > 5
    assert all(report["per_class"][c]["accuracy"] >= 0.9 for c in (0, 1, 2, 4, 6, 7, 8, 9))


def test_bad_inputs_raise_clear_errors(evaluator, digits):
    images, labels = digits["fresh"]
    with pytest.raises(ValueError, match="images but"):
        evaluator.evaluate(images, labels[:-1])
    with pytest.raises(ValueError, match="not classes of the real data"):
        evaluator.evaluate(images, labels + 10)
    too_many = np.concatenate([images] * 4)
    with pytest.raises(ValueError, match="real-vs-real floor"):
        evaluator.evaluate(too_many, np.concatenate([labels] * 4))
