"""Every model family on its tiny random pipeline: detection, concept rows equal to what the family's own diffusers
pipeline feeds the denoiser, and UCE and SPEED keeping the invariants they keep on SD-1.x (retain rows preserved,
the target mapped to its anchor, bitwise restore, the same image for a prompt whose every row is preserved)."""

import numpy as np
import pytest
import torch

import erasure
from erasure.engine.apply import applied
from erasure.engine.edit import Edit
from erasure.engine.families import SD_KEY_VALUE, model_family
from erasure.engine.pipeline import concept_tokenizer, edited_modules, fingerprint, method_defaults, pipeline_state
from erasure.engine.registry import ConceptRows, concept_rows
from erasure.engine.text import encode_texts, validate_concepts
from erasure.evaluation.generate import default_settings, generate_images, generate_pairs
from erasure.methods.speed import SpeedParams, speed

FAMILIES = {"tiny": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl", "tiny-flux": "flux"}
NEW_FAMILIES = ["tiny-sd2", "tiny-sdxl", "tiny-flux"]  # "tiny" (SD-1.x) has its own test files
RETAIN = ["Pikachu", "Garfield", "Popeye", "Hello Kitty", "teddy bear", "Winnie the Pooh", "Mario", "Batman"]
KEPT_PROMPT = "a photo of a cat on a sofa"
TARGET_PROMPT = "a photo of Snoopy"


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_pipe(request):
    return erasure.load_pipeline(request.param, device="cpu")


def parameters_snapshot(pipe):
    return {name: p.detach().clone() for name, p in pipeline_state(pipe).parameters.items()}


def assert_bitwise_restored(pipe, before):
    state = pipeline_state(pipe)
    assert all(torch.equal(p, before[name]) for name, p in state.parameters.items())
    assert not state.originals


def subject_rows(pipe, texts):
    return torch.stack([e.subject_row for e in encode_texts(pipe, texts)]).double()


def relative_change(old, new, rows):
    return float(((rows @ (new - old).T).norm(dim=1) / (rows @ old.T).norm(dim=1)).max())


def weights_while_applied(pipe, edit):
    """(base, edited) float64 weights of the edited text projections, read through `applied`."""
    state = pipeline_state(pipe)
    names = edit.modules()
    base = {n: state.modules[n].weight.detach().double().clone() for n in names}
    with applied(pipe, edit):
        edited = {n: state.modules[n].weight.detach().double().clone() for n in names}
    return base, edited


def pipeline_prompt_rows(pipe, prompt: str) -> torch.Tensor:
    """The rows the family's own diffusers pipeline feeds its denoiser for `prompt` ([L, d])."""
    family = model_family(pipe)
    if family.name == "flux":
        embeds, _, _ = pipe.encode_prompt(prompt, prompt_2=None, device="cpu", num_images_per_prompt=1,
                                          max_sequence_length=family.sequence_length(pipe))
    else:
        embeds = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)[0]
    return embeds[0]


def test_load_pipeline_detects_each_family(family_pipe):
    state = pipeline_state(family_pipe)
    model = state.model_id
    assert state.family.name == FAMILIES[model]
    expected = ("context_embedder",) if model == "tiny-flux" else SD_KEY_VALUE
    assert state.modules and all(name.endswith(expected) for name in state.modules)
    assert set(state.parameters) == {n for n, _ in state.family.denoiser(family_pipe).named_parameters()}


@pytest.mark.parametrize("model", NEW_FAMILIES)
def test_a_saved_folder_loads_through_its_own_class(model, tmp_path):
    random = erasure.load_pipeline(model, device="cpu")
    random.save_pretrained(tmp_path)
    loaded = erasure.load_pipeline(str(tmp_path), device="cpu")
    assert type(loaded) is type(random) and pipeline_state(loaded).family.name == FAMILIES[model]
    assert pipeline_state(loaded).modules.keys() == pipeline_state(random).modules.keys()


@pytest.mark.parametrize("prompt", [TARGET_PROMPT, ""])
def test_concept_rows_are_what_the_pipeline_feeds_the_denoiser(family_pipe, prompt):
    # Full length: every row the pipeline's own encode_prompt builds; short: its rows up to EOS, with the subject
    # (last real token) where the reference convention puts it.
    fed = pipeline_prompt_rows(family_pipe, prompt)
    full = encode_texts(family_pipe, [prompt], full_length=True)[0].rows
    short = encode_texts(family_pipe, [prompt])[0]
    n_tokens = len(concept_tokenizer(family_pipe)(prompt).input_ids)
    assert full.shape == fed.shape
    assert (full - fed).abs().max() <= 1e-6 * fed.abs().max()
    assert short.rows.shape[0] == n_tokens and (short.rows - fed[:n_tokens]).abs().max() <= 1e-6 * fed.abs().max()
    assert short.subject == max(n_tokens - 2, 0)


def test_uce_maps_target_to_anchor_keeps_retain_and_restores_bitwise(family_pipe):
    # With a tiny ridge and independent rows (9 rows, d >= 128), W' is the interpolant: W't = Wa, W'r = Wr.
    before = parameters_snapshot(family_pipe)
    edit = erasure.erase(family_pipe, "uce", targets=["Snoopy"], anchors=["a dog"], retain=RETAIN, lamb=1e-6)
    target, anchor, retain = (subject_rows(family_pipe, texts) for texts in (["Snoopy"], ["a dog"], RETAIN))
    base, edited = weights_while_applied(family_pipe, edit)
    assert set(base) == set(pipeline_state(family_pipe).modules)
    for name, w in base.items():
        goal = anchor @ w.T
        assert relative_change(w, edited[name], retain) <= 1e-4
        assert float((target @ edited[name].T - goal).norm() / goal.norm()) <= 1e-3
        assert float((target @ w.T - goal).norm() / goal.norm()) > 0.1  # the target really moved
    assert_bitwise_restored(family_pipe, before)


def test_speed_preserves_retain_rows_exactly_and_restores_bitwise(family_pipe):
    # 8 retain rows (+ DPA's one direction) span a small subspace: a threshold below every non-zero eigenvalue
    # puts the edit in its exact null space, so retain keys/values stay put to float32 round-off.
    before = parameters_snapshot(family_pipe)
    edit = erasure.erase(family_pipe, "speed", targets=["Snoopy"], anchors=[""], retain=RETAIN, params="KV",
                         threshold=1e-8, disable_filter=True)
    target, retain = subject_rows(family_pipe, ["Snoopy"]), subject_rows(family_pipe, RETAIN)
    base, edited = weights_while_applied(family_pipe, edit)
    assert set(base) == set(pipeline_state(family_pipe).modules)
    for name, w in base.items():
        assert relative_change(w, edited[name], retain) <= 1e-5
        assert relative_change(w, edited[name], target) > 1e-2  # the edit is not empty
    assert_bitwise_restored(family_pipe, before)


def kept_prompt_edit(pipe) -> Edit:
    """SPEED on every text projection with every row of KEPT_PROMPT and of "" (the pipeline's own full-length
    encodings) as the preserved set, so each key/value the denoiser sees for that prompt is unchanged."""
    encode = lambda texts, full: encode_texts(pipe, texts, full)
    state = pipeline_state(pipe)
    kept = torch.cat([encode([KEPT_PROMPT], True)[0].rows, encode([""], True)[0].rows]).double()
    assert len(kept) < kept.shape[1]  # a proper subspace: an exact null space exists
    rows = concept_rows(validate_concepts(["Snoopy"], [""], [], concept_tokenizer(pipe), 10), encode)
    rows = ConceptRows(rows.targets, rows.anchors, kept, rows.null)
    names = edited_modules(state, SD_KEY_VALUE)
    weights = {n: state.modules[n].weight.detach().double() for n in names}
    new = speed(weights, rows, SpeedParams(threshold=1e-9, disable_filter=True))
    return Edit.from_weights({n: w.float() for n, w in new.items()}, "speed", {}, ["Snoopy"], [""], [KEPT_PROMPT],
                             state.model_id, fingerprint(state, [f"{n}.weight" for n in names]))


def pixels(image):
    return np.asarray(image, dtype=np.float64) / 255


def test_prompt_with_every_row_preserved_renders_the_same_image(family_pipe):
    # The final latents show what 8-bit images hide on a random VAE (tiny-flux's target moves its latents by
    # ~6e-4 relative, its pixels by at most 1/255): the kept prompt's stay put to float32 round-off (~1e-7..4e-6
    # measured), the target prompt's move by orders of magnitude more.
    before = parameters_snapshot(family_pipe)
    edit = kept_prompt_edit(family_pipe)
    settings = default_settings(family_pipe, guidance=15.0)  # strong guidance amplifies the conditional branch
    pairs = [(KEPT_PROMPT, 0), (TARGET_PROMPT, 0)]
    original = generate_pairs(family_pipe, pairs, settings, latents=True)
    edited = generate_pairs(family_pipe, pairs, settings, edit, latents=True)
    kept, target = (float((o - e).abs().max() / o.abs().max()) for o, e in zip(original, edited))
    assert kept <= 1e-5 and target >= 1e-4
    images = [generate_images(family_pipe, [KEPT_PROMPT], [0], settings, e)[0] for e in (None, edit)]
    assert np.abs(pixels(images[0]) - pixels(images[1])).max() <= 1 / 255
    assert_bitwise_restored(family_pipe, before)


def test_flux_refuses_an_edit_of_keys_or_values_alone_and_speed_defaults_to_both_there():
    pipe = erasure.load_pipeline("tiny-flux", device="cpu")
    with pytest.raises(ValueError, match="context_embedder, which feeds both keys and values"):
        erasure.erase(pipe, "speed", targets=["Snoopy"], retain=RETAIN, params="V")
    edit = erasure.erase(pipe, "speed", targets=["Snoopy"], retain=RETAIN)  # the paper's "V" cannot apply here
    assert edit.params["params"] == "KV" and edit.modules() == ["context_embedder"]
    assert method_defaults(pipe, "speed")["params"] == "KV"
    assert method_defaults(erasure.load_pipeline("tiny-sdxl", device="cpu"), "speed")["params"] == "V"


def test_a_preset_holding_speeds_value_only_setting_erases_on_flux_with_keys_and_values(tmp_path):
    from erasure.cli.main import main

    out = tmp_path / "edit.safetensors"  # the instance preset sets SPEED params = "V" (the paper's, for SD)
    assert main(["erase", "--model", "tiny-flux", "--method", "speed", "--preset", "instance", "--targets", "Snoopy",
                 "--out", str(out)]) == 0
    assert Edit.load(out).params["params"] == "KV"
    assert main(["erase", "--model", "tiny-flux", "--method", "speed", "--preset", "instance", "--targets", "Snoopy",
                 "--params", "V", "--out", str(out)]) == 2  # asked for explicitly: refused, with its reason


def test_the_app_on_flux_offers_the_defaults_and_samplers_flux_can_take():
    import app
    from erasure.engine.limits import Limits
    from erasure.evaluation.scoring import load_clip_scorer

    pipe = erasure.load_pipeline("tiny-flux", device="cpu")
    studio = app.Studio(pipe, load_clip_scorer("tiny"), Limits(max_side=16))
    assert studio.limits.max_side == default_settings(pipe).height  # the cap never refuses the model's own size
    filled = dict(zip([f"{m}_{p}" for m, p, _ in app.PARAM_KEYS], studio.fill_from_preset("instance")[4:]))
    assert filled["speed_params"] == "KV"
    demo = app.build_demo(studio)
    fields = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert fields["speed-params"].value == "KV"
    assert [choice[0] for choice in fields["scheduler"].choices] == ["flow-euler"]  # only samplers FLUX can use
    assert "SPEED" in fields["method-summary"].value  # the default method, described when the page is built


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
@pytest.mark.parametrize("method", ["esd-x", "minimalist"])
def test_trained_methods_refuse_non_unet_families_by_name(model, method):
    pipe = erasure.load_pipeline(model, device="cpu")
    with pytest.raises(ValueError, match=f"this model is {FAMILIES[model].upper()}"):
        erasure.erase(pipe, method, targets=["Snoopy"])


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_probes_refuse_non_unet_families_by_name(model):
    from erasure.evaluation.probes import run_probes

    pipe = erasure.load_pipeline(model, device="cpu")
    edit = erasure.erase(pipe, "uce", targets=["Snoopy"])
    with pytest.raises(ValueError, match=f"the probes: SD-1.x/2.x UNet pipelines only; this model is "
                                         f"{FAMILIES[model].upper()}"):
        run_probes(pipe, edit, ["standard"], [TARGET_PROMPT], [0], default_settings(pipe), None)


def test_flux_refuses_sd_samplers_and_sd_refuses_flux_sampler(family_pipe):
    family = model_family(family_pipe)
    other = "pndm" if family.name == "flux" else "flow-euler"
    with pytest.raises(ValueError, match=f"does not sample {family.name.upper()} models"):
        generate_images(family_pipe, ["a cat"], [0], default_settings(family_pipe, scheduler=other))
