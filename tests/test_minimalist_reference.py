"""Minimalist against its reference (YaNgZhAnG-V5/minimalist_concept_erasure @ d178324): the hard-concrete
sampler its hookers run (`hard_concrete_distribution` with the configs' masking_eps 0.5 and use_log false)
and the defaults of its UNet (SDXL) config. The reference's mask formula is written out here from its
definition, not imported, and the gradient is taken by plain autograd through forward hooks on a
float64 copy of the UNet instead of our step-by-step recompute with parameter overrides, so a slip in either
shows up."""

import copy

import torch

from erasure.engine.text import Concepts
from erasure.engine.training import TrainingJob
from erasure.methods import minimalist
from erasure.methods.minimalist import MinimalistParams

# The reference's sampler: temperature β, stretch limits γ and ζ ("eta"), and the noise offset masking_eps.
REFERENCE_TEMPERATURE, REFERENCE_GAMMA, REFERENCE_ZETA, REFERENCE_EPS = 0.83, -0.1, 1.1, 0.5
TINY = {"trajectory_steps": 2, "templates": 2, "train_size": 32}  # CPU sizes; everything else at the defaults
MAX_RELATIVE_ERROR = 1e-5


def reference_mask(logit, u, temperature=REFERENCE_TEMPERATURE):
    logistic = torch.log(u + REFERENCE_EPS) - torch.log(1 - u + REFERENCE_EPS)
    s = torch.sigmoid((logistic + logit) / temperature)
    return torch.clamp(s * (REFERENCE_ZETA - REFERENCE_GAMMA) + REFERENCE_GAMMA, 0, 1)


def test_the_defaults_are_the_reference_unet_configs():
    defaults = MinimalistParams()
    assert minimalist.TEMPERATURE == REFERENCE_TEMPERATURE
    assert minimalist.STRETCH == (REFERENCE_GAMMA, REFERENCE_ZETA) and minimalist.NOISE_EPS == REFERENCE_EPS
    assert defaults.init == 3  # init_lambda
    assert defaults.iterations == 80  # 8 epochs x 2 x 20 samples / accumulate_grad_batches 4
    assert defaults.samples_per_step == 4  # accumulate_grad_batches
    assert defaults.lr == 0.2  # ff_lr


def test_the_sampler_is_the_reference_and_its_temperature_lets_init_3_learn():
    generator = torch.Generator().manual_seed(0)
    logits = {"a": torch.linspace(-4, 4, 4001)}
    u = minimalist.uniform_draws(logits, generator)
    ours = minimalist.hard_concrete(logits, u)["a"]
    assert torch.allclose(ours, reference_mask(logits["a"], u["a"]), rtol=0, atol=1e-6)
    # |L| < 1.1 and τ ln 11 = 1.99: beyond ±3.1 every draw is clamped (exact 0s and 1s have mass).
    assert bool((ours[logits["a"] < -3.1] == 0).all()) and bool((ours[logits["a"] > 3.1] == 1).all())
    # At the initial logit 3 and the narrowed noise, the L0 paper's 2/3 clamps every draw to 1 (no gradient ever);
    # 0.83 leaves a few percent of draws inside (0, 1).
    three = torch.full((100_000,), 3.0)
    draws = torch.rand(three.shape, generator=generator)
    assert bool((reference_mask(three, draws, 2 / 3) == 1).all())
    inside = float((reference_mask(three, draws) < 1).float().mean())
    assert 0.02 < inside < 0.05, inside


def test_one_step_gives_the_logits_the_gradient_of_the_reference_sampler(pipe):
    job = TrainingJob.for_pipeline(pipe)
    params = MinimalistParams(**TINY)
    concepts = Concepts(targets=("cat",), anchors=("",), retain=("dog", "car"))
    samples = minimalist.build_samples(job, concepts, params)
    names = minimalist.unit_names(job, params.units)

    def fresh_logits():
        return {n: torch.full((minimalist.unit_count(job, n),), float(params.init), requires_grad=True) for n in names}

    logits = fresh_logits()
    u = minimalist.uniform_draws(logits, torch.Generator().manual_seed(params.seed))

    # Ours: the body of the training loop's first step.
    index, weights = minimalist.step_batch(samples, 0, params)
    minimalist.unrolled_step(job, samples, torch.tensor(index), torch.tensor(weights), logits,
                             minimalist.hard_concrete(logits, u), params.trajectory_steps)
    ours = torch.cat([logits[n].grad if logits[n].grad is not None else torch.zeros_like(logits[n]) for n in names])

    # Reference: the step's 4 samples alternate concept and retain (its interleaved data); each loss is the final
    # latent's MSE, retain ones times β, averaged over the accumulated samples. The masks come from the same u
    # in float32 (as ours); the rest runs on a float64 copy of the UNet, so the reference is the exact gradient of
    # the step and the error measured is our float32 rounding (measured here: ~5e-6, most of it from guidance 7.5
    # amplifying the retain samples' small residuals, ~2e-4 relative on their own).
    concept = torch.nonzero(~samples.retain).flatten().tolist()
    kept = torch.nonzero(samples.retain).flatten().tolist()
    assert index == [concept[0], kept[0], concept[1], kept[1]]
    expected_weights = torch.tensor([1.0, params.beta, 1.0, params.beta], dtype=torch.float64) / 4
    reference_logits = fresh_logits()
    masks = {n: reference_mask(reference_logits[n], u[n]).double() for n in names}
    unet = copy.deepcopy(job.unet).double()
    for name, mask in masks.items():
        module = unet.get_submodule(name)
        if name.endswith("ff.net.2"):  # a GEGLU neuron: mask what the linear reads
            module.register_forward_pre_hook(lambda m, args, mask=mask: (args[0] * mask,))
        else:  # a value channel: mask what the projection writes
            module.register_forward_hook(lambda m, args, out, mask=mask: out * mask)
    text = samples.conditioning[index].double()
    context = torch.cat([job.encode([""]).double().expand_as(text), text])
    x = samples.noise[index].double()
    for t, previous in job.ddim_timesteps(params.trajectory_steps):
        unconditional, conditional = unet(torch.cat([x, x]), torch.full((2 * len(x),), t), context,
                                          return_dict=False)[0].chunk(2)
        x = job.ddim_step(x, unconditional + job.guidance * (conditional - unconditional), t, previous)
    loss = (expected_weights * ((x - samples.goal[index].double()) ** 2).flatten(1).mean(1)).sum()
    reference = torch.cat(torch.autograd.grad(loss, [reference_logits[n] for n in names])).double()

    assert int((reference != 0).sum()) > 0  # some units got a gradient at init 3
    error = float((ours.double() - reference).norm() / reference.norm())
    print(f"relative gradient error {error:.3e} over {len(reference)} units, {int((reference != 0).sum())} nonzero")
    assert error <= MAX_RELATIVE_ERROR, error
