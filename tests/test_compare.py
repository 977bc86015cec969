"""Comparisons: prompts suggested from concepts, seed parsing, the app's caps, and scores that line up
with the rows they caption."""

import numpy as np
import pytest

import erasure
from erasure.engine.limits import Limits
from erasure.evaluation.compare import (ORIGINAL, ComparisonPrompts, parse_seeds,
                                        run_comparison, suggest_prompts, summary_rows)
from erasure.evaluation.generate import OriginalCache, Settings
from erasure.evaluation.scoring import load_clip_scorer

SETTINGS = Settings(steps=2, guidance=7.5, height=64, width=64)


def test_suggested_prompts_name_every_target_before_repeating_one_and_keep_retain_and_neutral():
    prompts = suggest_prompts("object", ["Snoopy", "Mickey"], ["Pikachu", "Garfield", "Elmo"], per_group=3)
    assert prompts.erase == ("a photo of Snoopy", "a photo of Mickey", "a picture of Snoopy")
    assert prompts.keep[:2] == ("a photo of Pikachu", "a photo of Garfield")
    assert len(prompts.keep) == 3 and not any(c in prompts.keep[2] for c in ("Pikachu", "Garfield", "Elmo"))
    style = suggest_prompts("style", ["Van Gogh"], [])
    assert style.erase[0] == "a painting in the style of Van Gogh" and len(style.keep) == 3
    with pytest.raises(ValueError, match="unknown concept kind 'painting'"):
        suggest_prompts("painting", ["x"], [])


@pytest.mark.parametrize("text,message", [
    ("", "no seed given"), ("0, -1", "seed '-1' is not a whole number"), ("1 1", "seed 1 is given twice"),
])
def test_bad_seeds_are_refused_with_a_specific_message(text, message):
    with pytest.raises(ValueError, match=message):
        parse_seeds(text)


def test_seeds_accept_commas_and_spaces():
    assert parse_seeds("0, 1 42") == [0, 1, 42]


def test_limits_name_the_cap_that_was_hit():
    limits = Limits(max_images=4, max_steps=10, max_side=128, max_targets=2)
    limits.check_generation(2, 2, SETTINGS)
    with pytest.raises(ValueError, match="3 prompts x 2 seeds = 6 images per column exceed this app's cap of 4"):
        limits.check_generation(3, 2, SETTINGS)
    with pytest.raises(ValueError, match="20 steps exceed this app's cap of 10"):
        limits.check_generation(1, 1, Settings(steps=20, height=64, width=64))
    with pytest.raises(ValueError, match="256x256 px exceeds this app's cap of 128 px"):
        limits.check_generation(1, 1, Settings(steps=2, height=256, width=256))
    with pytest.raises(ValueError, match="3 target concepts exceed this app's cap of 2"):
        limits.check_concepts(["a", "b", "c"], [])


def test_comparison_scores_each_image_against_its_own_row(pipe, untouched):
    scorer = load_clip_scorer("tiny")
    edit = erasure.erase(pipe, "uce", ["Snoopy"], [""], ["Mickey"])
    prompts = ComparisonPrompts(("a photo of Snoopy",), ("a photo of Mickey",))
    comparison = run_comparison(pipe, scorer, prompts, [0, 1], SETTINGS, {"uce": edit}, ["Snoopy"], "object",
                                OriginalCache())
    rows = comparison.rows()
    assert [(g, p, s) for g, p, s in rows] == [("erase", "a photo of Snoopy", 0), ("erase", "a photo of Snoopy", 1),
                                               ("keep", "a photo of Mickey", 0), ("keep", "a photo of Mickey", 1)]
    # Scoring one image alone with the scorer's own pairwise API gives the same number (float32 features).
    i = 3  # "a photo of Mickey", seed 1
    alone = scorer.scores([comparison.images["uce"][i]], [rows[i][1]]).score[0]
    assert abs(comparison.prompt_scores["uce"].score[i] - alone) <= 1e-4
    target_alone = scorer.scores([comparison.images[ORIGINAL][i]], ["a photo of Snoopy"]).score[0]
    assert abs(comparison.target_scores[ORIGINAL].score[i] - target_alone) <= 1e-4

    summary = summary_rows(comparison)
    assert [(r["group"], r["column"], r["n"]) for r in summary] == [
        ("should be erased", ORIGINAL, 2), ("should be erased", "uce", 2),
        ("should be kept", ORIGINAL, 2), ("should be kept", "uce", 2)]
    kept_original = comparison.prompt_scores[ORIGINAL].score[2:]
    assert summary[2]["mean"] == pytest.approx(np.mean(kept_original), abs=1e-9)
    assert summary[3]["change"] == pytest.approx(summary[3]["mean"] - summary[2]["mean"], abs=1e-9)
