"""Scores on tiny real models: the random-weight open_clip scorer, NudeNet's bundled detector on a
tiny-pipeline image, FID/KID from torchmetrics, and the bootstrap intervals."""

import numpy as np
import pytest
import torch
from PIL import Image

from erasure.evaluation.generate import Settings, generate_images
from erasure.evaluation.scoring import (CONVENTION, NUDENET_CLASSES, NUDENET_THRESHOLD, ClipScores, bootstrap_mean,
                                        distribution_distance, load_clip_scorer, load_nudity_detector, own_class_rate,
                                        paired_change, same_seed_win_rate, summarize_scores, zero_shot_predictions)

CONCEPTS = ["Snoopy", "Mickey", "a red car", "a bowl of fruit", "Van Gogh"]
TEMPLATES = ["a photo of {}", "a drawing of {}", "a painting of {}"]


@pytest.fixture(scope="module")
def scorer():
    return load_clip_scorer("tiny", device="cpu")


@pytest.fixture(scope="module")
def images(pipe):
    return generate_images(pipe, ["a photo of Snoopy", "a bowl of fruit"], [0, 1],
                           Settings(steps=2, height=64, width=64))


def test_clip_score_is_reproducible_and_equals_the_embedding_cosine(scorer, images):
    texts = ["a photo of Snoopy"] * 2 + ["a bowl of fruit"] * 2
    first, again = scorer.scores(images, texts), scorer.scores(images, texts)
    np.testing.assert_array_equal(first.cosine, again.cosine)
    # Batching does not change a score beyond float32 rounding of the encoders (1e-5 on cosines in [-1, 1]).
    one_by_one = np.concatenate([scorer.scores([im], [t]).cosine for im, t in zip(images, texts)])
    np.testing.assert_allclose(first.cosine, one_by_one, atol=1e-5)
    direct = (scorer.image_features(images) * scorer.text_features(texts)).sum(-1).numpy()
    np.testing.assert_allclose(first.cosine, direct, atol=1e-6)
    assert scorer.is_random and "random-weight" in first.backbone


def test_clip_score_convention_is_100_times_cosine_clamped_at_zero():
    scores = ClipScores(np.array([-0.31, 0.0, 0.2537, 1.0]), "test")
    np.testing.assert_allclose(scores.score, [0.0, 0.0, 25.37, 100.0], atol=1e-12)
    np.testing.assert_array_equal(scores.cosine, [-0.31, 0.0, 0.2537, 1.0])  # raw cosine kept, unclamped
    assert scores.convention == CONVENTION and "100 * max(cos, 0)" in CONVENTION


def test_class_features_average_the_template_embeddings(scorer):
    classes = scorer.class_features(CONCEPTS[:2], TEMPLATES)
    mean = scorer.text_features([t.format("Mickey") for t in TEMPLATES]).mean(dim=0)
    torch.testing.assert_close(classes[1], mean / mean.norm(), atol=1e-6, rtol=0)
    torch.testing.assert_close(classes.norm(dim=-1), torch.ones(2), atol=1e-6, rtol=0)


def test_zero_shot_accuracy_is_exact_on_images_built_from_class_embeddings(scorer):
    classes = scorer.class_features(CONCEPTS, TEMPLATES)
    labels = np.array([0, 1, 2, 3, 4, 0, 2, 4])
    # "Images" whose embeddings are their class's text embedding, slightly perturbed: each must be
    # classified as its own class (the perturbation, 1e-3, is far below the gap between classes).
    noise = 1e-3 * torch.randn(len(labels), classes.shape[1], generator=torch.Generator().manual_seed(0))
    image_features = classes[labels] + noise
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    np.testing.assert_array_equal(zero_shot_predictions(image_features, classes), labels)
    assert own_class_rate(zero_shot_predictions(image_features, classes), labels).mean == 1.0
    # Relabel three of the eight: exactly 5/8 are then "classified as their own concept".
    claimed = labels.copy()
    claimed[[0, 3, 6]] = [1, 4, 0]
    assert own_class_rate(zero_shot_predictions(image_features, classes), claimed).mean == 5 / 8
    with pytest.raises(ValueError, match="dims"):
        zero_shot_predictions(image_features[:, :10], classes)


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    values = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    interval = bootstrap_mean(values)
    assert interval.low <= interval.mean <= interval.high and interval.n == 400
    assert interval.mean == pytest.approx(values.mean())
    # Normal theory: half-width 1.96 * sd / sqrt(n); the percentile bootstrap agrees within 15%.
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert (interval.high - interval.low) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_mean(values) == interval  # seeded: the same numbers every time
    constant = bootstrap_mean([0.7] * 5)
    assert constant.low == constant.mean == constant.high == 0.7


def test_same_seed_win_rate_and_paired_change_count_pairs():
    original = np.array([0.30, 0.25, 0.20, 0.10])
    edited = np.array([0.10, 0.25, 0.22, 0.05])  # lower in pairs 0 and 3; a tie is not a win
    win = same_seed_win_rate(original, edited)
    assert win.mean == 0.5 and win.low <= 0.5 <= win.high
    assert paired_change(original, edited).mean == pytest.approx((edited - original).mean())
    with pytest.raises(ValueError, match="one edited"):
        same_seed_win_rate(original, edited[:3])


def test_summary_rows_report_change_from_the_original_column():
    rows = summarize_scores({"original": np.array([30.0, 32.0]), "edited": np.array([20.0, 22.0])})
    assert [r["column"] for r in rows] == ["original", "edited"]
    assert rows[1]["change"] == pytest.approx(-10.0) and rows[0]["ci_low"] <= 31.0 <= rows[0]["ci_high"]


def test_nudenet_runs_offline_on_a_generated_image(images, tmp_path):
    detector = load_nudity_detector()
    found = detector.detections(images)
    assert len(found) == len(images)
    for image_found in found:
        assert all(d["class"] in NUDENET_CLASSES and d["score"] > NUDENET_THRESHOLD for d in image_found)
    np.testing.assert_array_equal(detector.flags(images), [bool(f) for f in found])
    # Same detections as the reference's path-based call (cv2.imread of the saved PNG), before filtering.
    images[0].save(tmp_path / "image.png")
    raw_from_path = detector.detector.detect(str(tmp_path / "image.png"))
    raw_from_image = detector.detector.detect(np.ascontiguousarray(np.asarray(images[0])[:, :, ::-1]))
    assert raw_from_path == raw_from_image
    assert load_nudity_detector() is detector  # loaded once, reused


def test_fid_is_zero_for_one_set_and_the_squared_shift_for_a_translated_set():
    reference = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    same = distribution_distance(reference, reference.clone(), "test features", False)
    assert abs(same.fid) < 1e-6
    # Translating every feature by m leaves the covariance unchanged, so FID = ||m||^2 exactly
    # (up to the eigen-solver's rounding, 1e-6 relative).
    shift = torch.full((8,), 0.5, dtype=torch.float64)
    moved = distribution_distance(reference, reference + shift, "test features", False)
    assert moved.fid == pytest.approx(float(shift.square().sum()), rel=1e-6)
    assert moved.kid_mean > same.kid_mean
    assert moved.kid_subset_size == 64 and moved.features == "test features" and not moved.comparable_to_papers
    assert distribution_distance(reference, reference + shift, "test features", False) == moved  # KID seeded
    with pytest.raises(ValueError, match="at least 2"):
        distribution_distance(reference[:1], reference, "x", False)
