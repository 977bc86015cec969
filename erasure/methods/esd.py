"""ESD-x: erasing concepts by fine-tuning cross-attention (Gandikota et al., ICCV 2023), fast variant.

The edited model's ε for the concept prompt c is trained towards the frozen model's negatively guided
score, in the paper's form

    ε_θ(x_t, c)  →  ε(x_t, a) − η (ε(x_t, c) − ε(x_t, a))

with a = the anchor. With the empty anchor this is the paper's ε(x_t, ∅) − η (ε(x_t, c) − ε(x_t, ∅)), and
η = 1 is the paper's default (the reference's newer script writes the same target as
ε_c − η′(ε_c − ε_∅), so its η′ = 2 is this η = 1).

Fast: instead of sampling a new trajectory with the model being trained at every iteration, a few
trajectories of the frozen model are sampled once (DDIM, classifier-free guidance) and every x_t on them
is cached with the frozen ε for c, ∅ and the anchor, which the sampling computed anyway. Training then
draws batches of (x_t, t) from the cache: fp32 master weights, Adam. `esd-x` trains every attn2 parameter
(to_q, to_k, to_v, to_out with its bias); `esd-x-strict` only to_k and to_v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erasure.engine.edit import Patch
from erasure.engine.registry import Method, param, register, train_size_param

SEED_BASE = 20_000  # trajectory noise seeds start here: never the app's or the tests' seeds 0, 1, 2, ...
FULL = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
STRICT = ("attn2.to_k", "attn2.to_v")


@dataclass(frozen=True)
class ESDParams:
    iterations: int = param(200, "Adam steps on batches drawn from the cached trajectories", min=1, max=5000)
    lr: float = param(5e-5, "Adam learning rate", min=0.0, max=1.0)
    eta: float = param(1.0, "η, the negative guidance (paper form: 1 = the paper's default)", min=0.0, max=100.0)
    batch: int = param(4, "cached (x_t, t) pairs per step", min=1, max=64)
    trajectories: int = param(8, "frozen-model trajectories sampled once per target", min=1, max=64)
    sample_steps: int = param(25, "DDIM steps of each trajectory: every step's x_t is cached", min=2, max=200)
    sample_guidance: float = param(3.0, "classifier-free guidance of the trajectories", min=0.0, max=50.0)
    train_size: int = train_size_param()
    seed: int = param(0, "seeds the trajectories' noise and the batch draws: same seed, bitwise same edit", min=0)


@dataclass
class ScoreCache:
    """Every x_t on the sampled trajectories with the training target at it."""
    latents: torch.Tensor  # [n, c, h, w] float32
    timesteps: torch.Tensor  # [n] long
    concept: torch.Tensor  # [n] long: which target concept's prompt the pair trains
    goal: torch.Tensor  # [n, c, h, w] float32: ε(x_t, a) − η (ε(x_t, c) − ε(x_t, a)) of the frozen model
    concept_conditioning: torch.Tensor  # [targets, 77, d]


@torch.no_grad()
def sample_scores(job, targets, anchors, params: ESDParams, seed_offset: int = 0) -> ScoreCache:
    """Sample `trajectories` frozen-model trajectories per target and cache (x_t, t, goal) at every step.
    `seed_offset` draws other trajectories (held-out x_t in the tests)."""
    texts = list(dict.fromkeys(["", *targets, *anchors]))
    rows = dict(zip(texts, job.encode(texts)))
    latents, timesteps, concepts, goals = [], [], [], []
    for index, (target, anchor) in enumerate(zip(targets, anchors)):
        seeds = [SEED_BASE + params.seed * 100_003 + seed_offset + index * params.trajectories + k
                 for k in range(params.trajectories)]
        x = job.noise(seeds, params.train_size)
        count = len(x)
        conditioning = torch.stack([rows[""], rows[target], rows[anchor]]).repeat_interleave(count, 0)
        for t, previous in job.ddim_timesteps(params.sample_steps):
            empty, concept, anchored = job.denoise(torch.cat([x, x, x]), t, conditioning).chunk(3)
            job.check()
            latents.append(x)
            timesteps.append(torch.full((count,), t, device=job.device))
            concepts.append(torch.full((count,), index, device=job.device))
            goals.append(anchored - params.eta * (concept - anchored))
            x = job.ddim_step(x, empty + params.sample_guidance * (concept - empty), t, previous)
    return ScoreCache(torch.cat(latents), torch.cat(timesteps), torch.cat(concepts), torch.cat(goals),
                      torch.stack([rows[t] for t in targets]))


def trainable_names(job, modules) -> list[str]:
    return [name for name, _ in job.unet.named_parameters() if name.rsplit(".", 1)[0].endswith(modules)]


def score_loss(job, cache: ScoreCache, index: torch.Tensor, overrides) -> torch.Tensor:
    prediction = job.denoise(cache.latents[index], cache.timesteps[index],
                             cache.concept_conditioning[cache.concept[index]], overrides)
    return torch.nn.functional.mse_loss(prediction, cache.goal[index])


def train_esd(job, concepts, params: ESDParams, modules=FULL):
    cache = sample_scores(job, concepts.targets, concepts.anchors, params)
    names = trainable_names(job, modules)
    masters = {name: job.base(name).float().clone().requires_grad_(True) for name in names}
    optimiser = torch.optim.Adam(masters.values(), lr=params.lr)
    generator = torch.Generator().manual_seed(params.seed)
    losses = []
    for step in range(params.iterations):
        index = torch.randint(len(cache.latents), (params.batch,), generator=generator).to(job.device)
        loss = score_loss(job, cache, index, masters)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.detach().item())
        job.report(step + 1, params.iterations, losses[-1])
    window = max(1, min(20, params.iterations // 5))
    stats = {"loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window,
             "cached_pairs": len(cache.latents), "trained_parameters": sum(m.numel() for m in masters.values())}
    patches = {name: Patch("tensor", value.detach().to(job.dtype)) for name, value in masters.items()}
    return patches, stats


for _name, _modules, _which in (("esd-x", FULL, "every attn2 parameter (to_q, to_k, to_v, to_out incl. bias)"),
                                ("esd-x-strict", STRICT, "attn2.to_k and attn2.to_v only")):
    register(Method(
        name=_name,
        summary=f"ESD-x (trained, seconds on a GPU): fine-tunes {_which} so the concept prompt's noise prediction "
                f"follows the frozen model's negatively guided one, ε(a) − η(ε(c) − ε(a)); trajectories are "
                f"sampled once and cached.",
        paper="Gandikota et al., Erasing Concepts from Diffusion Models, ICCV 2023",
        params=ESDParams,
        train=lambda job, concepts, params, _m=_modules: train_esd(job, concepts, params, _m),
        edits=lambda p, _m=_modules: _m,
        uses_retain=False,
    ))
