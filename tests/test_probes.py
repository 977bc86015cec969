"""Probe mechanics on the tiny random-weight pipeline (64 px, 3 DDIM steps): diffusion completion's ends are
the edited and the original generations, the noisy DDIM sampler is plain DDIM at η = 0 and at η = 1 with
v = 1, and the diagnostic's original and edited curves come from the same noised latents."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import erasure
from erasure.engine.edit import Edit, Patch
from erasure.engine.pipeline import original_parameter, pipeline_state
from erasure.evaluation import probes
from erasure.evaluation.generate import Settings, generate_images

SETTINGS = Settings(steps=3, guidance=7.5, height=64, width=64, scheduler="ddim")


@pytest.fixture(scope="module")
def edit(pipe):
    return erasure.erase(pipe, "uce", ["cat"], [""], ["dog"])


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_diffusion_completion_runs_from_the_edited_to_the_original_model(pipe, edit, untouched):
    result = probes.diffusion_completion(pipe, edit, ["a photo of a cat"], [0, 1], SETTINGS, ks=(0, 1, 3))
    assert result.variants == ["k=0", "k=1", "k=3"] * 2 and result.per_sample == 1
    edited = generate_images(pipe, ["a photo of a cat"], [0, 1], SETTINGS, edit)
    original = generate_images(pipe, ["a photo of a cat"], [0, 1], SETTINGS)
    for i in range(2):
        k0, k1, k3 = result.images[3 * i: 3 * i + 3]
        assert np.array_equal(pixels(k0), pixels(edited[i])) and np.array_equal(pixels(k3), pixels(original[i]))
        assert not np.array_equal(pixels(k1), pixels(edited[i]))  # k = 1 is neither end
    assert not np.array_equal(pixels(edited[0]), pixels(original[0]))
    short = probes.diffusion_completion(pipe, edit, ["a photo of a cat"], [0], SETTINGS)  # 3 steps: k = 1, 2
    assert short.variants == ["k=1", "k=2"] and np.array_equal(pixels(short.images[0]), pixels(result.images[1]))


def stock_ddim(pipe, prompt, seed, eta):
    current = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(current.config)
    try:
        return pipe(prompt, num_inference_steps=SETTINGS.steps, guidance_scale=SETTINGS.guidance, height=64,
                    width=64, eta=eta, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    finally:
        pipe.scheduler = current


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_the_noisy_sampler_is_plain_ddim_at_multiplier_one_for_eta_up_to_one(pipe, untouched, eta):
    noisy = probes.noisy_image(pipe, None, "a photo of a cat", 3, SETTINGS, eta, 1.0)
    assert np.array_equal(pixels(noisy), pixels(stock_ddim(pipe, "a photo of a cat", 3, eta)))


def test_the_noise_based_probe_varies_only_eta_and_v_from_one_initial_latent(pipe, edit, untouched):
    result = probes.noise_based(pipe, edit, ["a photo of a cat"], [0], SETTINGS, etas=(0.0, 1.5),
                                multipliers=(1.0, 1.05))
    assert result.per_sample == 4
    assert result.variants == ["eta=0 v=1", "eta=0 v=1.05", "eta=1.5 v=1", "eta=1.5 v=1.05"]
    first, no_noise_v, *noisy = [pixels(image) for image in result.images]
    assert np.array_equal(first, no_noise_v)  # at η = 0 there is no noise for v to scale
    assert not np.array_equal(noisy[0], noisy[1]) and not np.array_equal(first, noisy[0])
    assert all(np.isfinite(image).all() for image in noisy)  # η > 1: the root of |1 − ᾱ − σ²| stays real


def test_the_diagnostic_compares_both_models_on_the_same_noised_latents(pipe, edit, untouched):
    state = pipeline_state(pipe)
    base = {f"{module}.weight": Patch("tensor", original_parameter(state, f"{module}.weight").clone())
            for module in edit.modules()}
    unchanged = Edit(base, "uce", edit.params, ["cat"], [""], ["dog"], edit.model_id, edit.fingerprint)
    same = probes.diagnostic(pipe, unchanged, "a photo of a cat", [0, 1], SETTINGS, timesteps=(200, 800))
    assert same.target_edited == same.target_original and same.empty_edited == same.empty_original
    moved = probes.diagnostic(pipe, edit, "a photo of a cat", [0, 1], SETTINGS, timesteps=(200, 800))
    assert moved.target_original == same.target_original  # the same latents and noise, whatever the edit
    assert moved.target_edited != moved.target_original
    assert moved.verdict().startswith(("avoidance", "destruction"))


def test_on_the_toy_world_diffusion_completion_brings_back_circles_a_uce_edit_erased():
    """The paper's central finding, counted by the toy world's judge: after UCE erases "circle", letting the
    original model take the first 5 of 20 DDIM steps recovers the circle far more often than the standard
    prompt does (measured: 25% -> 62% of 32 images; 4 templates x seeds 0-7)."""
    from erasure.engine.presets import load_preset, prompt_templates
    from erasure.evaluation.generate import default_settings
    from erasure.worlds.toy import load_judge

    toy = erasure.load_pipeline("toy", device="cpu")
    preset = load_preset("toy-circle")
    edit = erasure.erase(toy, "uce", preset.targets, preset.anchors, preset.retain)
    prompts = [form.format("circle") for form in prompt_templates("toy-shape", full=True)[:4]]
    settings = default_settings(toy)
    judge = load_judge()
    standard = judge(probes.standard(toy, edit, prompts, range(8), settings).images).finds("circle").mean()
    completed = probes.diffusion_completion(toy, edit, prompts, range(8), settings, ks=(5,))
    recovered = judge(completed.images).finds("circle").mean()
    assert len(completed.images) == 32 and recovered >= standard + 0.2, (standard, recovered)


def test_inpainting_repaints_only_the_masked_square_and_keeps_the_context_outside(pipe, edit, untouched):
    """Final latents of two different repaintings (edited and original model) of the same context and seed:
    equal outside the mask (the context's latents are re-imposed there), different inside."""
    context = generate_images(pipe, ["a photo of a cat"], [5], SETTINGS)[0]
    edited, original = [], []
    probes.inpainting(pipe, edit, ["a photo of a cat"], [0], SETTINGS, context=context, keep=edited)
    probes.inpainting(pipe, None, ["a photo of a cat"], [0], SETTINGS, context=context, keep=original)
    inside = torch.zeros(edited[0].shape[-2:], dtype=torch.bool)
    side = inside.shape[0]  # 64 px -> 32 latent cells (the tiny VAE scales by 2): the centre 16 x 16
    inside[side // 4: side - side // 4, side // 4: side - side // 4] = True
    assert torch.equal(edited[0][:, ~inside], original[0][:, ~inside])
    assert not torch.equal(edited[0][:, inside], original[0][:, inside])
    result = probes.inpainting(pipe, edit, ["a photo of a cat"], [0, 1], SETTINGS)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)


def test_the_classifier_guided_sampler_is_plain_ddim_at_scale_zero_and_follows_the_gradient_otherwise(pipe, untouched):
    from erasure.evaluation.probes.guidance import ClassifierGuidedDDIMScheduler, LatentClassifier, guided_image
    from erasure.evaluation.probes.noisy import NoisyDDIMScheduler

    torch.manual_seed(0)
    classifier = LatentClassifier((4, 32, 32)).eval().requires_grad_(False)
    unguided = guided_image(pipe, None, "a photo of a cat", 3, SETTINGS, classifier, 0.0)
    assert np.array_equal(pixels(unguided), pixels(stock_ddim(pipe, "a photo of a cat", 3, 0.0)))
    guided = guided_image(pipe, None, "a photo of a cat", 3, SETTINGS, classifier, 50.0)
    assert not np.array_equal(pixels(guided), pixels(unguided))

    # One step against the formula: ε̂ − √(1 − ᾱ_t) · s · ∇ log σ(f(x_t, t)), then the plain step.
    plain = NoisyDDIMScheduler.from_config(pipe.scheduler.config)
    steered = ClassifierGuidedDDIMScheduler.from_config(pipe.scheduler.config)
    steered.classifier, steered.guidance_scale = classifier, 50.0
    for scheduler in (plain, steered):
        scheduler.set_timesteps(SETTINGS.steps)
    t = int(plain.timesteps[0])
    x, eps = torch.randn(2, 4, 32, 32), torch.randn(2, 4, 32, 32)
    x_grad = x.clone().requires_grad_(True)
    alpha = plain.alphas_cumprod[t]
    (gradient,) = torch.autograd.grad(torch.nn.functional.logsigmoid(classifier(x_grad, alpha)).sum(), x_grad)
    expected = plain.step(eps - (1 - alpha) ** 0.5 * 50.0 * gradient, t, x).prev_sample
    assert torch.allclose(steered.step(eps, t, x).prev_sample, expected, atol=1e-6)


def test_the_latent_classifier_tells_the_target_from_its_neighbours_on_held_out_toy_images():
    """Trained on the original toy model's latents of "circle" prompts against the same prompts with each other
    shape: ≥ 90% right on 64 held-out clean latents (measured 97%); it leaves the global random stream as it
    found it, and a second request with the same inputs is served from the cache."""
    from erasure.engine.presets import load_preset, prompt_templates
    from erasure.evaluation.generate import default_settings
    from erasure.evaluation.probes.guidance import latent_classifier

    toy = erasure.load_pipeline("toy", device="cpu")
    preset = load_preset("toy-circle")
    prompts = [form.format("circle") for form in prompt_templates("toy-shape", full=True)[:4]]
    settings = default_settings(toy)
    stream = torch.random.get_rng_state()
    trained = latent_classifier(toy, "circle", prompts, [*preset.anchors, *preset.retain], settings)
    assert torch.equal(torch.random.get_rng_state(), stream)
    assert trained.accuracy[0] >= 0.9, trained.accuracy
    assert sum(trained.losses[-50:]) / 50 < 0.5 * sum(trained.losses[:50]) / 50
    assert latent_classifier(toy, "circle", prompts, [*preset.anchors, *preset.retain], settings) is trained


def test_the_probe_text_encoding_equals_the_pipelines_and_replaces_only_the_chosen_rows(pipe):
    from erasure.engine.text import encode_texts
    from erasure.evaluation.probes.inversion import encode_rows, token_ids

    texts = ["a photo of a sks", "a cat"]
    ids = token_ids(pipe, texts)
    with torch.no_grad():
        reference = pipe.text_encoder(ids)[0]  # the encoder's own forward on the same batch: the same bits
        assert torch.equal(encode_rows(pipe, ids), reference)
    cached = torch.stack([e.rows for e in encode_texts(pipe, texts, full_length=True)])  # batched by 8: close
    assert torch.allclose(encode_rows(pipe, ids), cached, atol=1e-5)
    replace = ids == pipe.tokenizer.convert_tokens_to_ids("sks</w>")
    row = torch.randn(1, reference.shape[-1])
    with torch.no_grad():
        moved = encode_rows(pipe, ids, replace, row)
    position = int(replace[0].nonzero())
    assert torch.equal(moved[1], reference[1]) and torch.equal(moved[0, :position], reference[0, :position])
    assert not torch.equal(moved[0, position], reference[0, position])


def test_quick_textual_inversion_lowers_the_edited_models_loss_without_writing_anything(pipe, edit, untouched):
    from erasure.evaluation.probes.inversion import quick_textual_inversion

    grads_before = [p.grad for p in pipe.text_encoder.parameters()]
    inversion = quick_textual_inversion(pipe, edit, "cat", ["a photo of a cat", "a cat"], SETTINGS, steps=30,
                                        images=4, initial_word="object")
    before, after = inversion.held_loss
    assert after < before, inversion.held_loss
    assert inversion.prompts == ["a photo of a sks", "a sks"] and len(inversion.losses) == 30
    assert [p.grad for p in pipe.text_encoder.parameters()] == grads_before  # the shared encoder untouched


def test_the_adversarial_search_never_raises_its_loss_and_spends_exactly_its_budget(pipe, edit, untouched):
    from erasure.evaluation.probes.inversion import adversarial_search, token_ids

    attack = adversarial_search(pipe, edit, "a photo of a cat", SETTINGS, tokens=3, iterations=6, candidates=4,
                                images=2)
    assert attack.evaluations == 1 + 6 * (4 + 1) and len(attack.losses) == 7
    assert all(b <= a for a, b in zip(attack.losses, attack.losses[1:]))
    assert attack.losses[-1] < attack.losses[0], attack.losses  # random weights: some swap always helps
    prompt_ids = token_ids(pipe, ["a photo of a cat"])[0]
    assert attack.ids[4:9] == prompt_ids[1:6].tolist()  # BOS, 3 searched tokens, then the prompt itself


def test_interference_scores_the_nearest_concepts_on_both_models(pipe, edit, untouched):
    from erasure.evaluation.probes import interference as probe
    from erasure.evaluation.scoring import load_clip_scorer

    judge = probes.Judge(pipe, edit, "object", scorer=load_clip_scorer("tiny"))
    report, rendered = probe.interference(pipe, edit, ["a photo of a cat"], [0], SETTINGS, judge,
                                                        "object", neighbours=3)
    cells = report["matrix"]["cat"]
    assert len(cells) == 3 and "cat" not in cells and "dog" in probe.candidate_concepts(pipe, edit, "object")
    similarities = [cell["similarity"] for cell in cells.values()]
    assert similarities == sorted(similarities, reverse=True)
    assert all(0 <= cell[side] <= 1 and cell["images"] == 1 for cell in cells.values() for side in ("original", "edited"))
    for neighbour, original, edited in rendered:  # the edited column is really the edited model
        assert np.array_equal(pixels(original[0]), pixels(generate_images(pipe, [f"a photo of a {neighbour}"], [0],
                                                                          SETTINGS)[0]))


def test_a_probe_run_stops_inside_a_probe_when_asked_and_leaves_the_pipeline_as_it_was(pipe, edit, untouched):
    """Cancel is polled per image inside a probe, not only between probes (on a real model one probe takes
    minutes); messages say where the run is."""
    from erasure.engine.training import TrainingCancelled
    from erasure.evaluation.scoring import load_clip_scorer

    messages = []
    judge = probes.Judge(pipe, edit, "object", scorer=load_clip_scorer("tiny"))
    with pytest.raises(TrainingCancelled):
        probes.run_probes(pipe, edit, ["standard", "noise"], ["a photo of a cat"], [0, 1], SETTINGS, judge,
                          on_step=lambda step: messages.append((step.done, step.total, step.message)),
                          should_stop=lambda: len(messages) >= 5, protocol="quick")
    assert messages[-1] == (1, 2, "noise-based image 2 of 12"), messages


def test_a_searching_probe_never_reads_another_sessions_edit_while_it_is_written_in(pipe, edit, untouched):
    """Textual inversion and the adversarial search build their edit's weights from the base weights; another
    thread writing its own edit in and out meanwhile must never show through (500 computations; without the lock
    about 1 in 200 read the other edit)."""
    import threading

    from erasure.engine.apply import restore, write_edit
    from erasure.evaluation.probes.inversion import edit_overrides

    other = erasure.erase(pipe, "uce", ["Snoopy"], [""], ["Mickey"])  # the same layers as `edit`
    expected = edit_overrides(pipe, edit)
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            restore(pipe, write_edit(pipe, other))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        computed = [edit_overrides(pipe, edit) for _ in range(500)]
    finally:
        stop.set()
        thread.join()
    differing = sum(any(not torch.equal(value, expected[name]) for name, value in overrides.items())
                    for overrides in computed)
    assert differing == 0
