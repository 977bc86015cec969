"""The toy world on its shipped weights (erasure/toy/weights): the model draws its world, its judge and
CLIP know it, and every method in the registry erases "circle" while the other shapes stay.

Sizes (all seeded, CPU, 20 DDIM steps, guidance 5): drawing quality over 8 shapes × 6 colours × 2 seeds =
96 images; erasure over the toy-circle preset with 4 prompt templates × 4 seeds = 16 images per concept,
8 concepts: 128 originals once, then 128 edited images per method.
"""

import random

import numpy as np
import pytest
import torch

import erasure
from erasure.generate import OriginalCache
from erasure.methods import METHODS
from erasure.presets import load_preset
from erasure.toy import load_judge, models
from erasure.toy.measure import drawing_quality, preset_rates
from erasure.toy.world import COLOURS, SHAPES, render, sample_scene, scenes

ERASURE_SEEDS = [0, 1, 2, 3]
ERASURE_TEMPLATES = 4
KEPT_PIXEL_CHANGE = 0.02  # mean |edited - original| of kept prompts' same-seed images, 0-1 scale


@pytest.fixture(scope="module")
def toy():
    return erasure.load_pipeline("toy", device="cpu")


@pytest.fixture(scope="module")
def originals():
    return OriginalCache(max_images=512)


def test_the_judge_reads_rendered_scenes_it_never_saw():
    held_out = scenes(400, seed=12345)  # training rendered seed 0's scenes
    verdict = load_judge()([render(s) for s in held_out])
    for head in ("shape", "colour", "style"):
        wrong = [scene for i, scene in enumerate(held_out)
                 if {label for label in verdict.labels(head) if verdict.present(label)[i]}
                 != {getattr(t, head) for t in scene.things}]
        assert len(wrong) <= 0.02 * len(held_out), (head, wrong[:3])
    assert verdict.main("background") == [s.background for s in held_out]


def test_the_model_draws_its_world(toy):
    quality = drawing_quality(toy, seeds=[0, 1])
    assert quality.images == 96
    assert quality.shape_rate >= 0.9 and quality.colour_rate >= 0.9, quality


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_erases_circle_and_keeps_the_other_shapes(toy, originals, method, untouched_toy):
    preset = load_preset("toy-circle")
    retain = preset.retain if METHODS[method].uses_retain else ()
    edit = erasure.erase(toy, method, preset.targets, preset.anchors, retain, **preset.method_params(method))
    rates = preset_rates(toy, edit, "toy-circle", ERASURE_SEEDS, ERASURE_TEMPLATES, cache=originals)
    (circle,) = [r for r in rates if r.role == "erased"]
    assert circle.images == 16 and circle.original >= 0.9 and circle.edited <= 0.2, circle
    kept = [r for r in rates if r.role == "kept"]
    assert [r.concept for r in kept] == list(preset.retain)
    for rate in kept:
        assert abs(rate.edited - rate.original) <= 0.1, rate
    assert np.mean([r.pixel_change for r in kept]) <= KEPT_PIXEL_CHANGE, kept


@pytest.fixture
def untouched_toy(toy):
    before = {n: p.detach().clone() for n, p in toy.unet.named_parameters()}
    yield
    assert all(torch.equal(p, before[n]) for n, p in toy.unet.named_parameters())


def test_the_toy_clip_tells_shapes_apart_zero_shot():
    from erasure.scoring import load_clip_scorer, zero_shot_predictions

    scorer = load_clip_scorer("toy", device="cpu")
    assert not scorer.is_random
    rng = random.Random(7)
    held_out = [sample_scene(rng, two_objects=0) for _ in range(160)]
    classes = scorer.class_features(list(SHAPES), ["a {}", "a {} on a black background"])
    predicted = zero_shot_predictions(scorer.image_features([render(s) for s in held_out]), classes)
    truth = np.array([SHAPES.index(s.things[0].shape) for s in held_out])
    assert (predicted == truth).mean() >= 0.8
    colours = scorer.class_features(list(COLOURS), ["a {} shape"])
    predicted = zero_shot_predictions(scorer.image_features([render(s) for s in held_out]), colours)
    assert (predicted == np.array([list(COLOURS).index(s.things[0].colour) for s in held_out])).mean() >= 0.8


def test_the_seeded_token_table_is_checked_against_the_stored_rows(monkeypatch):
    from erasure.toy import toy_pipeline

    monkeypatch.setattr(models, "TOKEN_SEED", models.TOKEN_SEED + 1)
    monkeypatch.setattr(models.seeded_token_table, "__defaults__", (models.TOKEN_SEED,))
    with pytest.raises(RuntimeError, match="draws the toy text encoder's seeded token table differently"):
        toy_pipeline()
