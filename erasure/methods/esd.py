"""ESD: erasing concepts by fine-tuning the denoiser (Gandikota et al., ICCV 2023), as the authors' reference
script (rohitgandikota/erasing, `esd_sd.py`) trains it by default, with a faster cached variant.

The edited model's ε for the prompt f (`erase_from`; the concept c itself by default) is trained towards the
frozen model's negatively guided score

    ε_θ(x_t, f)  →  ε(x_t, f) − (η + 1) (ε(x_t, c) − ε(x_t, a))

with a = the anchor (the empty prompt ∅ by default). With f = c this is the paper's form
ε(x_t, a) − η (ε(x_t, c) − ε(x_t, a)), and η = 1 is the paper's default. The reference script writes the target
as ε_f − η′(ε_c − ε_∅) with `negative_guidance` η′ = 2, so its η′ is our η + 1 (with or without erase_from).

Sampling (where the x_t come from):
- `reference` (default): every iteration samples `batch` fresh trajectories of the frozen model on f with the
  pipeline's own scheduler (PNDM on SD-1.x, not DDIM) at `sample_steps` = 50 steps and classifier-free guidance
  3, stopped after a uniformly drawn number of steps k ∈ [0, steps − 1]; x_t is the latent there and t the
  scheduler's k-th timestep. One Adam step per iteration, batch 1, 200 iterations, lr 5e-5.
- `cached` (fast): `trajectories` DDIM trajectories per target are sampled once and every x_t on them is cached
  with its target; training draws batches of (x_t, t) from the cache. `sampling=cached batch=4
  sample_steps=25` is this module's earlier fast default.

Variants (which parameters train; fp32 master weights, Adam):
- `esd-x`: every attn2 parameter (to_q, to_k, to_v, to_out with its bias); `esd-x-strict`: attn2.to_k, to_v;
- `esd-u`: the reference's unconditional variant: every Linear and Conv2d of the UNet that is not in attn2 (convs,
  time embedding, resnets, proj_in/out, self-attention, feed-forward), weight and bias; norms are not trained.

Where this deliberately differs from the reference: fp32 master weights (its bf16 Adam step of 5e-5 rounds to
nothing on weights with |w| ≥ 2⁻⁶), the model's native image size (its script hard-codes 1024 px, also for
SD-1.x), seeded draws, and the noise prediction at Euler-type schedulers' scaled inputs.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from erasure.engine.edit import Patch
from erasure.engine.registry import Method, param, register, train_size_param

SEED_BASE = 20_000  # trajectory noise seeds start here: never the app's or the tests' seeds 0, 1, 2, ...
FULL = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
STRICT = ("attn2.to_k", "attn2.to_v")
# What esd-u may change on an SD-1.x/2.x UNet (declared up front, as every method declares its modules): the
# module names of every Linear and Conv2d outside attn2. Training picks them by type (see `unconditional`) and
# refuses a UNet with such a layer not named here.
UNCONDITIONAL = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2", "conv1", "conv2",
                 "conv_shortcut", "time_emb_proj", "samplers.0.conv", "proj_in", "proj_out", "attn1.to_q",
                 "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
SAMPLING = ("reference", "cached")
# The SD samplers a scheduler config without `_class_name` (a pipeline built in code) is matched against.
SD_SCHEDULERS = ("PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                 "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
                 "HeunDiscreteScheduler", "UniPCMultistepScheduler")


@dataclass(frozen=True)
class ESDParams:
    iterations: int = param(200, "Adam steps (the reference's 200)", min=1, max=5000)
    lr: float = param(5e-5, "Adam learning rate (the reference's 5e-5), on fp32 master weights", min=0.0, max=1.0)
    eta: float = param(1.0, "η, the negative guidance in the paper's form ε(a) − η(ε(c) − ε(a)): 1 = the paper's "
                            "default = the reference script's negative_guidance 2 (its value is η + 1)",
                       min=0.0, max=100.0)
    erase_from: str = param("", "the reference's erase_from: train the prediction for this prompt, on its "
                                "trajectories, towards ε(from) − (η+1)(ε(c) − ε(a)) (for every target); empty = "
                                "the concept itself (the paper's form)")
    sampling: str = param("reference", "reference: a fresh frozen-model trajectory every iteration with the "
                                       "pipeline's own scheduler (PNDM on SD-1.x), stopped at a random step; cached: "
                                       "`trajectories` DDIM trajectories per target sampled once, every step cached "
                                       "(fast; with batch 4 and sample_steps 25 the earlier default)",
                          choices=list(SAMPLING))
    batch: int = param(1, "x_t per Adam step (the reference's 1): fresh trajectories (reference) or pairs drawn from "
                          "the cache (cached)", min=1, max=64)
    sample_steps: int = param(50, "steps of each trajectory (the reference's 50 with the pipeline's scheduler; "
                                  "cached: DDIM steps, every step's x_t cached)", min=2, max=200)
    sample_guidance: float = param(3.0, "classifier-free guidance of the trajectories (the reference's 3)",
                                   min=0.0, max=50.0)
    trajectories: int = param(8, "cached sampling only: frozen-model trajectories sampled once per target", min=1,
                              max=64)
    train_size: int = train_size_param()
    seed: int = param(0, "seeds the trajectories' noise and every random draw: same seed, bitwise same edit", min=0)


def source_prompt(params: ESDParams, target: str) -> str:
    """The prompt whose prediction is trained and whose trajectories are sampled: erase_from, else the concept."""
    return params.erase_from.strip() or target


def esd_goal(eps_from: torch.Tensor, eps_concept: torch.Tensor, eps_anchor: torch.Tensor, eta: float):
    """ε(f) − (η+1)(ε(c) − ε(a)); with f = c the paper's ε(a) − η(ε(c) − ε(a))."""
    return eps_from - (eta + 1) * (eps_concept - eps_anchor)


def frozen_eps(job, latents, t, rows: dict, roles: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """ε(x, t, ·) of the frozen model for each role's per-row prompts, in one UNet call; roles with the same
    prompts (the anchor ∅ and the unconditional branch, erase_from = the concept) share their rows."""
    distinct = list(dict.fromkeys(tuple(texts) for texts in roles.values()))
    conditioning = torch.cat([torch.stack([rows[text] for text in texts]) for texts in distinct])
    eps = job.denoise(torch.cat([latents] * len(distinct)), t, conditioning).chunk(len(distinct))
    by_texts = dict(zip(distinct, eps))
    return {role: by_texts[tuple(texts)] for role, texts in roles.items()}


def encoded(job, targets, anchors, params: ESDParams) -> dict[str, torch.Tensor]:
    texts = list(dict.fromkeys(["", *(source_prompt(params, t) for t in targets), *targets, *anchors]))
    return dict(zip(texts, job.encode(texts)))


# ---- cached sampling -------------------------------------------------------------------------------------------

@dataclass
class ScoreCache:
    """Every x_t on the sampled trajectories with the training target at it."""
    latents: torch.Tensor  # [n, c, h, w] float32
    timesteps: torch.Tensor  # [n] long
    concept: torch.Tensor  # [n] long: which target concept's prompt the pair trains
    goal: torch.Tensor  # [n, c, h, w] float32: ε(x_t, f) − (η+1)(ε(x_t, c) − ε(x_t, a)) of the frozen model
    concept_conditioning: torch.Tensor  # [targets, 77, d]: the trained prompt's (erase_from's, else the concept's)


@torch.no_grad()
def sample_scores(job, targets, anchors, params: ESDParams, seed_offset: int = 0) -> ScoreCache:
    """Sample `trajectories` frozen-model DDIM trajectories per target and cache (x_t, t, goal) at every step.
    `seed_offset` draws other trajectories (held-out x_t in the tests)."""
    rows = encoded(job, targets, anchors, params)
    latents, timesteps, concepts, goals = [], [], [], []
    for index, (target, anchor) in enumerate(zip(targets, anchors)):
        seeds = [SEED_BASE + params.seed * 100_003 + seed_offset + index * params.trajectories + k
                 for k in range(params.trajectories)]
        x = job.noise(seeds, params.train_size)
        count = len(x)
        roles = {"empty": [""] * count, "from": [source_prompt(params, target)] * count,
                 "concept": [target] * count, "anchor": [anchor] * count}
        for t, previous in job.ddim_timesteps(params.sample_steps):
            eps = frozen_eps(job, x, t, rows, roles)
            job.check()
            latents.append(x)
            timesteps.append(torch.full((count,), t, device=job.device))
            concepts.append(torch.full((count,), index, device=job.device))
            goals.append(esd_goal(eps["from"], eps["concept"], eps["anchor"], params.eta))
            guided = eps["empty"] + params.sample_guidance * (eps["from"] - eps["empty"])
            x = job.ddim_step(x, guided, t, previous)
    return ScoreCache(torch.cat(latents), torch.cat(timesteps), torch.cat(concepts), torch.cat(goals),
                      torch.stack([rows[source_prompt(params, t)] for t in targets]))


def cached_batch(cache: ScoreCache, index: torch.Tensor):
    """(x_t, t, conditioning, goal) of the cached pairs at `index`."""
    return (cache.latents[index], cache.timesteps[index], cache.concept_conditioning[cache.concept[index]],
            cache.goal[index])


def score_loss(job, cache: ScoreCache, index: torch.Tensor, overrides) -> torch.Tensor:
    latents, timesteps, conditioning, goal = cached_batch(cache, index)
    return torch.nn.functional.mse_loss(job.denoise(latents, timesteps, conditioning, overrides), goal)


# ---- reference sampling ----------------------------------------------------------------------------------------

def scheduler_class(config: dict):
    """The diffusers class of the pipeline's own scheduler: its config's `_class_name` (pipelines loaded from
    files carry it), else the SD sampler whose arguments are exactly the config's keys (a pipeline built in code,
    e.g. the tiny test models)."""
    import diffusers

    named = config.get("_class_name")
    if isinstance(named, str) and isinstance(getattr(diffusers, named, None), type):
        return getattr(diffusers, named)
    keys = {key for key in config if not key.startswith("_")}
    exact = [name for name in SD_SCHEDULERS
             if set(inspect.signature(getattr(diffusers, name).__init__).parameters) - {"self"} == keys]
    if len(exact) != 1:
        raise ValueError(f"cannot tell the pipeline's scheduler from its config (no _class_name; matches "
                         f"{exact or 'none'} of {list(SD_SCHEDULERS)}); use ESD's sampling='cached'")
    return getattr(diffusers, exact[0])


def pipeline_scheduler(job, steps: int):
    """A fresh instance of the pipeline's own scheduler with its `steps`-step timesteps set (each trajectory gets a
    copy: multistep samplers such as PNDM keep state)."""
    scheduler = scheduler_class(job.scheduler_config).from_config(job.scheduler_config)
    scheduler.set_timesteps(steps, device=job.device)
    return scheduler


@torch.no_grad()
def reference_batch(job, prototype, rows, pairs, seeds, stop: int, params: ESDParams):
    """(x_t, t, conditioning, goal) for `pairs` [(target, anchor)]: fresh trajectories from `seeds` sampled with a
    copy of `prototype` for `stop` steps (classifier-free guided on each pair's trained prompt), then the frozen
    ε at the scheduler's `stop`-th timestep."""
    scheduler = copy.deepcopy(prototype)
    x = job.noise(seeds, params.train_size) * scheduler.init_noise_sigma
    sources = [source_prompt(params, target) for target, _ in pairs]
    for t in scheduler.timesteps[:stop]:
        eps = frozen_eps(job, scheduler.scale_model_input(x, t), t, rows,
                         {"empty": [""] * len(pairs), "from": sources})
        x = scheduler.step(eps["empty"] + params.sample_guidance * (eps["from"] - eps["empty"]), t, x).prev_sample
    t = scheduler.timesteps[stop]
    x = scheduler.scale_model_input(x, t)  # the UNet's input (PNDM, DDIM: x itself)
    eps = frozen_eps(job, x, t, rows, {"from": sources, "concept": [target for target, _ in pairs],
                                       "anchor": [anchor for _, anchor in pairs]})
    conditioning = torch.stack([rows[source] for source in sources])
    return x, t, conditioning, esd_goal(eps["from"], eps["concept"], eps["anchor"], params.eta)


def reference_batches(job, concepts, params: ESDParams, generator: torch.Generator):
    """step -> a batch of fresh trajectories (targets, stopping step and noise drawn with `generator`)."""
    prototype = pipeline_scheduler(job, params.sample_steps)
    rows = encoded(job, concepts.targets, concepts.anchors, params)
    pairs = list(zip(concepts.targets, concepts.anchors))
    last = min(params.sample_steps, len(prototype.timesteps)) - 1  # PNDM has steps + 1 timesteps: its last is unused

    def draw(step: int):
        which = torch.randint(len(pairs), (params.batch,), generator=generator).tolist()
        stop = int(torch.randint(last + 1, (), generator=generator))
        seeds = [SEED_BASE + params.seed * 100_003 + step * params.batch + k for k in range(params.batch)]
        return reference_batch(job, prototype, rows, [pairs[i] for i in which], seeds, stop, params), stop

    return draw, {"sampler": type(prototype).__name__}


def cached_batches(job, concepts, params: ESDParams, generator: torch.Generator):
    cache = sample_scores(job, concepts.targets, concepts.anchors, params)

    def draw(step: int):
        index = torch.randint(len(cache.latents), (params.batch,), generator=generator).to(job.device)
        return cached_batch(cache, index), 0

    return draw, {"cached_pairs": len(cache.latents)}


# ---- training --------------------------------------------------------------------------------------------------

def unconditional(name: str, module: torch.nn.Module) -> bool:
    """esd-u's layers: every Linear and Conv2d outside cross-attention (norms are neither)."""
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "attn2" not in name


def trainable_names(job, modules, picks: Callable[[str, torch.nn.Module], bool] | None = None) -> list[str]:
    """The parameters (weight and bias) of the modules named `*modules`, or, with `picks`, of the modules it picks
    (each of which must end in one of `modules`: a method's edit changes only the modules it declares)."""
    if picks is None:
        return [name for name, _ in job.unet.named_parameters() if name.rsplit(".", 1)[0].endswith(modules)]
    chosen = {name for name, module in job.unet.named_modules() if picks(name, module)}
    undeclared = sorted(name for name in chosen if not name.endswith(modules))
    if undeclared:
        raise ValueError(f"this UNet has layers ESD does not know how to declare: {undeclared[:5]}")
    return [name for name, _ in job.unet.named_parameters() if name.rsplit(".", 1)[0] in chosen]


def train_esd(job, concepts, params: ESDParams, modules=FULL, picks=None):
    if params.sampling not in SAMPLING:
        raise ValueError(f"ESD sampling must be one of {SAMPLING}, got {params.sampling!r}")
    names = trainable_names(job, modules, picks)
    generator = torch.Generator().manual_seed(params.seed)
    batches = reference_batches if params.sampling == "reference" else cached_batches
    draw, sampling_stats = batches(job, concepts, params, generator)
    masters = {name: job.base(name).float().clone().requires_grad_(True) for name in names}
    optimiser = torch.optim.Adam(masters.values(), lr=params.lr)
    losses, sampled = [], 0
    for step in range(params.iterations):
        (latents, timesteps, conditioning, goal), steps = draw(step)
        sampled += steps
        loss = torch.nn.functional.mse_loss(job.denoise(latents, timesteps, conditioning, masters), goal)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.detach().item())
        job.report(step + 1, params.iterations, losses[-1])
    window = max(1, min(20, params.iterations // 5))
    stats = {"loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window,
             **sampling_stats, "trained_parameters": sum(m.numel() for m in masters.values())}
    if params.sampling == "reference":
        stats["trajectory_steps"] = sampled * params.batch
    patches = {name: Patch("tensor", value.detach().to(job.dtype)) for name, value in masters.items()}
    return patches, stats


@dataclass(frozen=True)
class Variant:
    name: str
    modules: tuple[str, ...]  # the module suffixes it declares (an edit of it changes nothing else)
    which: str  # what it trains, in words
    picks: Callable[[str, torch.nn.Module], bool] | None = None  # None: every module ending in `modules`


VARIANTS = (
    Variant("esd-x", FULL, "ESD-x: every attn2 parameter (to_q, to_k, to_v, to_out incl. bias)"),
    Variant("esd-x-strict", STRICT, "ESD-x-strict: attn2.to_k and attn2.to_v only"),
    Variant("esd-u", UNCONDITIONAL, "ESD-u: every Linear and Conv2d outside cross-attention (convs, time embedding, "
                                    "self-attention, feed-forward; norms excluded)", unconditional),
)

for _variant in VARIANTS:
    register(Method(
        name=_variant.name,
        summary=f"{_variant.which}, fine-tuned (trained; minutes on a GPU at the reference's settings) so that the "
                f"concept prompt's noise prediction follows the frozen model's negatively guided one, "
                f"ε(a) − η(ε(c) − ε(a)) (or, with erase_from f, ε(f) − (η+1)(ε(c) − ε(a)) for f's prediction), on "
                f"fresh trajectories of the pipeline's own sampler (or on cached DDIM ones: sampling=cached).",
        paper="Gandikota et al., Erasing Concepts from Diffusion Models, ICCV 2023",
        params=ESDParams,
        train=lambda job, concepts, params, _v=_variant: train_esd(job, concepts, params, _v.modules, _v.picks),
        edits=lambda p, _v=_variant: _v.modules,
        uses_retain=False,
    ))
