"""Minimalist concept erasure: learned binary neuron masks (Zhang et al., ICML 2025), for SD 1.x.

One learnable logit λ per unit; while training, masks are hard-concrete samples with the reference's sampler:
logistic noise L = ln(u + 0.5) − ln(1 − u + 0.5) (u uniform, so L lies in about ±1.1), s = σ((λ + L)/τ) with
τ = 0.83, stretched to (γ, ζ) = (−0.1, 1.1) and clamped to [0, 1]. Unlike the reference, u is seeded and drawn
once per optimiser step (see below). At the end a unit is kept when λ > 0, so the edit holds exact 0/1 masks.
Units (`units`):

- `v`: every output unit of the cross-attention value projections `attn2.to_v` (the value channels through
  which the text reaches the image), stored as output masks;
- `ff`: every hidden neuron of the transformer blocks' feed-forward layers, i.e. every output unit of the
  GEGLU, stored as an input mask of `ff.net.2` (the linear the neuron feeds; identical for 0/1 masks).

The reference's UNet path masks the outputs of every attention and feed-forward Linear; we mask only these
two, which carry the text condition and the concept-specific neurons the paper reports, and keep every other
path intact.

Defaults follow the reference's UNet (SDXL) config where it has one: initial logit 3, 80 optimiser steps,
4 samples averaged per step (concept and retain samples alternating), AdamW at lr 0.2. They differ in K
(4 DDIM steps on SD-1's guided model, the reference runs 2 on SDXL-turbo) and β (1; the SDXL config's 0
would let retain prompts give no gradient).

Targets by anchor substitution: for each prompt template and target, the frozen model's final latent of a
short K-step DDIM trajectory for the prompt with the target replaced by its anchor; retain prompts target
their own frozen latent, weighted by β. The loss is on the final latent, back-propagated one denoising step at
a time: the K latents are stored without grad, then each step is recomputed with grad from the last to the
first, so memory stays at one UNet step. One mask draw serves a whole optimiser step (every sample, the
forward and every recompute): the reference re-draws at every UNet call, so its recompute differentiates masks
other than those its loss was computed with; one draw keeps the gradient that of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erasure.engine.edit import Patch
from erasure.engine.presets import KINDS, prompt_templates
from erasure.engine.registry import Method, param, register, train_size_param

# The reference's sampler constants. τ = 0.83 (not the L0 paper's 2/3) matters at its initial logit 3: with the
# narrowed noise below, τ = 2/3 clamps every draw to 1 and no unit would ever get a gradient.
TEMPERATURE = 0.83
STRETCH = (-0.1, 1.1)  # (γ, ζ): s is stretched past [0, 1] so that the clamp gives exact 0s and 1s mass
NOISE_EPS = 0.5  # u + 0.5 and 1 - u + 0.5: logistic noise in about ±1.1 (the reference's masking_eps)
SEED_BASE = 10_000  # training noise seeds start here: never the app's or the tests' seeds 0, 1, 2, ...
MODULES = {"v": ("attn2.to_v",), "ff": ("ff.net.2",), "ff+v": ("attn2.to_v", "ff.net.2")}


@dataclass(frozen=True)
class MinimalistParams:
    iterations: int = param(80, "optimiser steps (the reference's UNet config: 80)", min=1, max=5000)
    samples_per_step: int = param(4, "training samples averaged per optimiser step, concept and retain samples "
                                     "alternating (the reference accumulates 4)", min=1, max=64)
    lr: float = param(0.2, "AdamW learning rate of the mask logits", min=0.0, max=100.0)
    init: float = param(3.0, "initial logit λ of every unit (the reference's 3: every unit starts on, and only "
                             "draws of low noise get a gradient at first)", min=-20.0, max=20.0)
    beta: float = param(1.0, "β, weight of the retain reconstruction loss (> 0)", min=1e-6, max=1000.0)
    trajectory_steps: int = param(4, "K, DDIM steps of the short trajectory the loss is taken at", min=2, max=50)
    units: str = param("ff+v", "which units get masks: FF neurons, cross-attention value channels, or both",
                       choices=list(MODULES))
    template_kind: str = param("object", "prompt templates the concepts are written into (a preset's kind)",
                               choices=list(KINDS))
    templates: int = param(4, "prompt templates per concept", min=1, max=50)
    train_size: int = train_size_param()
    seed: int = param(0, "seeds the noise of every sample and the mask draws: same seed, bitwise same edit", min=0)


@dataclass
class Samples:
    """Training prompts with their initial noise and the frozen model's final latent to reach."""
    conditioning: torch.Tensor  # [n, 77, d]
    noise: torch.Tensor  # [n, c, h, w]
    goal: torch.Tensor  # [n, c, h, w]
    retain: torch.Tensor  # [n] bool: a retain sample (β-weighted) or a concept sample


def unit_names(job, units: str) -> list[str]:
    return [name for name, module in job.unet.named_modules()
            if name.endswith(MODULES[units]) and isinstance(module, torch.nn.Linear)]


def unit_count(job, name: str) -> int:
    weight = job.base(f"{name}.weight")
    return weight.shape[1] if name.endswith("ff.net.2") else weight.shape[0]


def masked_overrides(job, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks as parameter overrides: value channels scale their weight's rows and bias, FF neurons their
    column of ff.net.2, exactly as the edit's output/input masks are applied."""
    overrides = {}
    for name, mask in masks.items():
        weight = job.base(f"{name}.weight").float()
        if name.endswith("ff.net.2"):
            overrides[f"{name}.weight"] = weight * mask[None, :]
            continue
        overrides[f"{name}.weight"] = weight * mask[:, None]
        bias = job.unet.get_submodule(name).bias
        if bias is not None:
            overrides[f"{name}.bias"] = bias.detach().float() * mask
    return overrides


def uniform_draws(logits: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One u ~ U[0, 1) per unit, from the CPU generator (device-independent draws, so a seed gives one edit)."""
    return {name: torch.rand(logit.shape, generator=generator).to(logit.device) for name, logit in logits.items()}


def hard_concrete(logits: dict[str, torch.Tensor], u: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hard-concrete masks for the uniform draws `u` (kept apart so that a test can feed both this and its own
    transcription of the reference the same noise)."""
    low, high = STRETCH
    out = {}
    for name, logit in logits.items():
        noise = torch.log(u[name] + NOISE_EPS) - torch.log(1 - u[name] + NOISE_EPS)
        out[name] = (torch.sigmoid((noise + logit) / TEMPERATURE) * (high - low) + low).clamp(0, 1)
    return out


def step_batch(samples: Samples, step: int, params: MinimalistParams):
    """The samples of optimiser step `step` and their loss weights (the mean over the step, retain β-weighted).
    Concept and retain samples alternate as in the reference's interleaved data, so a step of 4 holds 2 of each;
    without retain concepts every sample is a concept sample."""
    concept = torch.nonzero(~samples.retain).flatten().tolist()
    kept = torch.nonzero(samples.retain).flatten().tolist()
    index, weights = [], []
    for position in range(step * params.samples_per_step, (step + 1) * params.samples_per_step):
        if kept and position % 2:
            index.append(kept[(position // 2) % len(kept)])
            weights.append(params.beta)
        else:
            index.append(concept[(position // 2 if kept else position) % len(concept)])
            weights.append(1.0)
    return index, [w / params.samples_per_step for w in weights]


def trajectory(job, samples: Samples, index, overrides, steps: int, keep: bool = False):
    """The final latent of the K-step guided DDIM trajectory (and, with `keep`, every latent before each step)."""
    x = samples.noise[index]
    conditioning = samples.conditioning[index]
    empty = job.encode([""])
    kept = []
    for t, previous in job.ddim_timesteps(steps):
        kept.append(x)
        x = job.ddim_step(x, job.guided(x, t, conditioning, empty, job.guidance, overrides), t, previous)
    return (x, kept) if keep else x


@torch.no_grad()
def build_samples(job, concepts, params: MinimalistParams) -> Samples:
    forms = prompt_templates(params.template_kind, full=True)[: params.templates]
    pairs = [(form.format(target), form.format(anchor).strip(), False)
             for target, anchor in zip(concepts.targets, concepts.anchors) for form in forms]
    pairs += [(form.format(kept), form.format(kept), True) for kept in concepts.retain for form in forms]
    seeds = [SEED_BASE + params.seed * 100_003 + i for i in range(len(pairs))]
    noise = job.noise(seeds, params.train_size)
    prompts = job.encode([p for p, _, _ in pairs])
    goal_prompts = job.encode([g for _, g, _ in pairs])
    goals = []
    for i in range(0, len(pairs), 8):
        job.check()
        goals.append(trajectory(job, Samples(goal_prompts[i:i + 8], noise[i:i + 8], noise[i:i + 8], None),
                                slice(None), None, params.trajectory_steps))
    goals = torch.cat(goals)
    return Samples(prompts, noise, goals, torch.tensor([r for _, _, r in pairs]))


def sample_losses(job, samples: Samples, masks: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Per sample: the mean squared error of the masked model's final latent to its goal (no grad)."""
    with torch.no_grad():
        overrides = masked_overrides(job, masks)
        out = []
        for i in range(0, len(samples.noise), 8):
            index = slice(i, i + 8)
            final = trajectory(job, samples, index, overrides, steps)
            out.append(((final - samples.goal[index]) ** 2).flatten(1).mean(1))
        return torch.cat(out)


def train_minimalist(job, concepts, params: MinimalistParams):
    samples = build_samples(job, concepts, params)
    names = unit_names(job, params.units)
    logits = {name: torch.full((unit_count(job, name),), float(params.init), device=job.device, requires_grad=True)
              for name in names}
    optimiser = torch.optim.AdamW(logits.values(), lr=params.lr)
    generator = torch.Generator().manual_seed(params.seed)
    losses = []
    for step in range(params.iterations):
        index, weights = step_batch(samples, step, params)
        masks = hard_concrete(logits, uniform_draws(logits, generator))
        loss = unrolled_step(job, samples, torch.tensor(index, device=job.device),
                             torch.tensor(weights, device=job.device), logits, masks, params.trajectory_steps)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        losses.append(loss)
        job.report(step + 1, params.iterations, loss)
    binary = {name: (logit.detach() > 0).float() for name, logit in logits.items()}
    ones = {name: torch.ones_like(mask) for name, mask in binary.items()}
    steps = params.trajectory_steps
    before, after = sample_losses(job, samples, ones, steps), sample_losses(job, samples, binary, steps)
    retain_scale = (samples.goal[samples.retain] ** 2).flatten(1).mean(1) if bool(samples.retain.any()) else None
    units = sum(len(m) for m in binary.values())
    units_off = int(sum(int((m == 0).sum()) for m in binary.values()))
    stats = {"sparsity": units_off / units, "units": units, "units_off": units_off,
             "concept_loss_all_on": float(before[~samples.retain].mean()),
             "concept_loss": float(after[~samples.retain].mean()),
             "retain_relative_error": (float((after[samples.retain] / retain_scale).mean())
                                       if retain_scale is not None else 0.0),
             "loss_first": sum(losses[:10]) / len(losses[:10]), "loss_last": sum(losses[-10:]) / len(losses[-10:])}
    if not stats["units_off"]:
        raise ValueError(f"minimalist switched no unit off in {params.iterations} steps (every mask is 1): give it "
                         f"more iterations, a higher lr or a lower init")
    # An all-ones mask changes nothing: leave it out of the edit.
    patches = {f"{name}.{mask_kind(name)}": Patch(mask_kind(name), mask.cpu())
               for name, mask in binary.items() if bool((mask == 0).any())}
    return patches, stats


def mask_kind(name: str) -> str:
    return "input_mask" if name.endswith("ff.net.2") else "output_mask"


def unrolled_step(job, samples: Samples, index, weights, logits, masks, steps: int) -> float:
    """Loss on the final latent, gradient into the logits step by step (one UNet step of memory)."""
    with torch.no_grad():
        final, latents = trajectory(job, samples, index, masked_overrides(job, masks), steps, keep=True)
    final = final.detach().requires_grad_(True)
    per_sample = ((final - samples.goal[index]) ** 2).flatten(1).mean(1)
    loss = (weights * per_sample).sum()
    (grad,) = torch.autograd.grad(loss, final)
    empty = job.encode([""])
    conditioning = samples.conditioning[index]
    # Every recomputed step uses the same draw: gradients collect on leaf copies of the masks, then go through
    # the draw into the logits once.
    leaves = {name: mask.detach().requires_grad_(True) for name, mask in masks.items()}
    for (t, previous), x in zip(reversed(job.ddim_timesteps(steps)), reversed(latents)):
        x = x.detach().requires_grad_(True)
        overrides = masked_overrides(job, leaves)
        out = job.ddim_step(x, job.guided(x, t, conditioning, empty, job.guidance, overrides), t, previous)
        out.backward(grad)
        grad = x.grad
    names = [name for name in masks if leaves[name].grad is not None]
    torch.autograd.backward([masks[n] for n in names], [leaves[n].grad for n in names])
    return loss.detach().item()


register(Method(
    name="minimalist",
    summary="Minimalist (trained, a minute on a GPU): learns binary masks on FF neurons and cross-attention value "
            "channels so the concept's prompts end where their anchor's do after a short trajectory, while "
            "retain prompts end where they did; the edit is the masks.",
    paper="Zhang et al., Minimalist Concept Erasure in Generative Models, ICML 2025",
    params=MinimalistParams,
    train=train_minimalist,
    edits=lambda p: MODULES[p.units],
))
