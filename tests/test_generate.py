"""Generation on the tiny pipeline: retain-prompt images unchanged by a null-space edit, same-seed
independence from batching, the original-image cache, cancellation and grids."""

import numpy as np
import pytest
import torch

import erasure
from erasure.engine.edit import Edit
from erasure.engine.pipeline import fingerprint, pipeline_state
from erasure.engine.registry import ConceptRows, concept_rows
from erasure.engine.text import encode_texts, validate_concepts
from erasure.evaluation.generate import (GenerationCancelled, OriginalCache, Settings,
                                         comparison_grid, generate_images, originals)
from erasure.methods.speed import SpeedParams, speed

SETTINGS = Settings(steps=3, guidance=7.5, height=64, width=64)
KEPT_PROMPT = "a photo of a cat on a sofa"
TARGET_PROMPT = "a photo of Snoopy"


def pixels(image):
    return np.asarray(image, dtype=np.float64) / 255


def test_prompt_with_all_tokens_preserved_renders_identically_after_speed(pipe, untouched):
    # Preserved set: all 77 rows of the prompt and of CFG's empty negative prompt (154 rows < d = 256).
    # SPEED confines the edit to their null space, so every key/value the UNet sees for this prompt is
    # unchanged and the image is the same (<= 1/255 per pixel, i.e. at most 8-bit rounding), while the
    # target prompt, whose rows leave that span, changes.
    encode = lambda texts, full: encode_texts(pipe, texts, full)
    state = pipeline_state(pipe)
    kept = torch.cat([encode([KEPT_PROMPT], True)[0].rows, encode([""], True)[0].rows]).double()
    concepts = validate_concepts(["Snoopy"], [""], [], pipe.tokenizer, 10)
    rows = concept_rows(concepts, encode)
    rows = ConceptRows(rows.targets, rows.anchors, kept, rows.null)
    names = [n for n in state.modules if n.endswith("to_v")]
    weights = {n: state.modules[n].weight.detach().double() for n in names}
    new = speed(weights, rows, SpeedParams(threshold=1e-9, disable_filter=True))
    edit = Edit.from_weights({n: w.float() for n, w in new.items()}, "speed", {}, ["Snoopy"], [""], [KEPT_PROMPT],
                                   state.model_id, fingerprint(state, [f"{n}.weight" for n in names]))

    # Strong guidance amplifies the conditional branch, the only place the edit can act on random weights.
    settings = Settings(steps=3, guidance=15.0, height=64, width=64)
    before = generate_images(pipe, [KEPT_PROMPT, TARGET_PROMPT], [0], settings)
    after = generate_images(pipe, [KEPT_PROMPT, TARGET_PROMPT], [0], settings, edit)
    assert np.abs(pixels(before[0]) - pixels(after[0])).max() <= 1 / 255
    assert np.abs(pixels(before[1]) - pixels(after[1])).max() >= 4 / 255


def test_same_seed_image_does_not_depend_on_batching(pipe, untouched):
    together = generate_images(pipe, ["a red car", "a blue boat", "a cat"], [0, 1], SETTINGS)  # batches of 4 + 2
    alone = generate_images(pipe, ["a blue boat"], [1], SETTINGS)
    assert np.array_equal(pixels(together[3]), pixels(alone[0]))  # the same bits, whatever rendered beside it
    assert np.array_equal(pixels(together[4]), pixels(generate_images(pipe, ["a cat"], [0], SETTINGS)[0]))
    assert np.abs(pixels(together[0]) - pixels(together[1])).max() > 0  # seeds differ


def test_original_cache_skips_recomputing_originals(pipe, untouched):
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        cache = OriginalCache()
        first, reused = originals(pipe, ["a red car", "a tree"], [0, 1], SETTINGS, cache)
        computed = sum(calls)  # latents through the UNet
        assert computed > 0 and reused == 0
        again, reused = originals(pipe, ["a red car", "a tree"], [0, 1], SETTINGS, cache)
        assert sum(calls) == computed and reused == 4  # no UNet call at all
        assert all(a is b for a, b in zip(first, again))
        # Only the missing images are rendered; every pipeline call is one batch of 4 (padded), so 2 or 1
        # new images cost one batch, as the 4 first ones did.
        _, reused = originals(pipe, ["a red car", "a tree", "a house"], [0, 1], SETTINGS, cache)
        assert sum(calls) == 2 * computed and reused == 4  # only the new prompt's images
        _, reused = originals(pipe, ["a red car"], [0, 1, 2], SETTINGS, cache)
        assert sum(calls) == 3 * computed and reused == 2  # only the new seed
    finally:
        hook.remove()


def test_original_cache_on_disk_is_shared_between_instances(pipe, tmp_path, untouched):
    first, _ = originals(pipe, ["a tree"], [0], SETTINGS, OriginalCache(folder=tmp_path))
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        second, reused = originals(pipe, ["a tree"], [0], SETTINGS, OriginalCache(folder=tmp_path))
    finally:
        hook.remove()
    assert not calls and reused == 1 and np.array_equal(np.asarray(first[0]), np.asarray(second[0]))


def test_cancel_stops_generation_and_restores_weights(pipe, untouched):
    edit = erasure.erase(pipe, "speed", ["Snoopy"], [""], ["Pikachu"])
    steps = []
    with pytest.raises(GenerationCancelled):
        generate_images(pipe, ["a", "b", "c", "d", "e"], [0], SETTINGS, edit,
                        on_step=lambda step: steps.append(step.done), should_stop=lambda: len(steps) >= 2)
    assert len(steps) < 5 * SETTINGS.steps


def test_progress_counts_every_image_of_a_batched_step_and_ends_at_the_total(pipe, untouched):
    reports, unet_calls = [], []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: unet_calls.append(1))
    try:
        generate_images(pipe, ["a", "b", "c", "d", "e"], [0], SETTINGS,  # batches of 4 and 1
                        on_step=lambda step: reports.append((step.done, step.total)))
    finally:
        hook.remove()
    iterations = len(unet_calls) // 2  # per batch (PNDM runs steps + 1)
    # every real image's every UNet evaluation counted once, and the bar ends at 100%
    assert reports[-1] == (5 * iterations, 5 * iterations) and iterations >= SETTINGS.steps
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="multiples of 8"):
        Settings(height=60).check()
    with pytest.raises(ValueError, match="unknown scheduler"):
        Settings(scheduler="magic").check()


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_other_schedulers_run_and_restore_the_pipeline_scheduler(pipe, scheduler):
    before = type(pipe.scheduler)
    images = generate_images(pipe, ["a tree"], [0], Settings(steps=2, height=64, width=64, scheduler=scheduler))
    assert images[0].size == (64, 64) and type(pipe.scheduler) is before


def test_comparison_grid_has_one_cell_per_row_and_column(pipe):
    images = generate_images(pipe, ["a tree"], [0, 1], SETTINGS)
    grid = comparison_grid(["a tree (seed 0)", "a tree (seed 1)"], ["original", "edited"], [images, images],
                           cell=64)
    assert grid.size == (220 + 2 * 64, 24 + 2 * 64)
