"""Probes that search the text side for a way back to the target, both scored by the same loss: how well the
*edited* model denoises the *original* model's images of the target under a given conditioning.

- `quick_textual_inversion`: one new token embedding trained by gradient descent (a short, labelled "quick"
  run; the paper's 12,000 UNet passes are tens of minutes on a GPU).
- `adversarial_search`: a budgeted discrete search over k prompt tokens prepended to the target prompt
  (UnlearnDiffAtk / GCG style: the loss's gradient ranks candidate tokens per position; a few sampled swaps
  are evaluated exactly, the best kept if it lowers the loss).

Both run on the job's private frozen UNet with the edit as parameter overrides, so the shared pipeline
is never written and no lock is held while they search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from erasure.engine.apply import effective_parameters
from erasure.engine.pipeline import pipeline_state
from erasure.engine.text import encode_texts
from erasure.engine.training import TrainingJob
from erasure.evaluation.generate import Settings, generate_images, generate_pairs
from erasure.evaluation.probes.guidance import training_pairs
from erasure.evaluation.probes.noisy import single_image
from erasure.evaluation.probes.registry import Probe, ProbeImages, register_probe

PLACEHOLDER = "sks"  # one CLIP token; its row is replaced by the learned embedding wherever it occurs
SEED_BASE = 40_000  # seeds of the original-model images the searches fit (never the probe's own seeds)


def token_ids(pipe, texts: Sequence[str]) -> torch.Tensor:
    return pipe.tokenizer(list(texts), padding="max_length", truncation=True,
                          max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids


def encode_rows(pipe, ids: torch.Tensor, replace: torch.Tensor | None = None, rows: torch.Tensor | None = None):
    """The text encoder's last hidden state for token `ids` [n, 77], with the token-embedding rows at positions
    `replace` [n, 77] (bool) taken from `rows` [m, d] (in order; differentiable) instead of the table. Without a
    replacement it equals the pipeline's own encoding of those ids. Reads the shared encoder, writes nothing."""
    encoder = pipe.text_encoder
    model = getattr(encoder, "text_model", encoder)  # transformers < 5 nests the layers one level down
    ids = ids.to(encoder.device)
    embeds = model.embeddings.token_embedding(ids)
    if replace is not None:
        embeds = embeds.clone()
        embeds[replace.to(ids.device)] = rows.to(embeds.dtype)
    hidden = model.embeddings(inputs_embeds=embeds)
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf"), device=ids.device, dtype=hidden.dtype).triu(1)
    for layer in model.encoder.layers:
        output = layer(hidden, causal[None, None].expand(len(ids), 1, -1, -1))
        hidden = output[0] if isinstance(output, tuple) else output
    return model.final_layer_norm(hidden)


def target_latents(pipe, prompts: Sequence[str], count: int, settings) -> torch.Tensor:
    return torch.stack(generate_pairs(pipe, training_pairs(prompts, count, SEED_BASE), settings, None,
                                      latents=True))


def fixed_noising(latents, timesteps: Sequence[int], generator: torch.Generator):
    """Every latent at every timestep with one noise draw: a loss over them is comparable from call to call.
    Returns (latents, timesteps, noise), timestep-major."""
    t = torch.tensor(list(timesteps)).repeat_interleave(len(latents))
    repeated = latents.repeat(len(timesteps), 1, 1, 1)
    return repeated, t, torch.randn(repeated.shape, generator=generator)


def denoising_loss(job, overrides, latents, conditioning, timesteps, noise) -> torch.Tensor:
    """Mean squared ε error of the edited model on `latents` noised at `timesteps` with `noise`."""
    alpha = job.alphas_cumprod.to(latents.device)[timesteps].float().reshape(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    predicted = job.denoise(noisy.to(job.device), timesteps.to(job.device), conditioning, overrides)
    return (predicted - noise.to(job.device)).square().mean()


def edit_overrides(pipe, edit) -> dict[str, torch.Tensor]:
    """The weights `edit` gives the parameters it changes, computed from the base weights under the pipeline's
    lock: without it, another session writing its own edit in at that moment could leak into the result."""
    if edit is None:
        return {}
    state = pipeline_state(pipe)
    with state.lock:
        return {name: value.detach().clone() for name, value in effective_parameters(state, edit).items()}


@dataclass
class Inversion:
    embedding: torch.Tensor  # [d]
    prompts: list[str]  # the target prompts with the placeholder in the target's place
    losses: list[float] = field(default_factory=list)  # per step (random t and noise: noisy)
    initial_word: str = ""
    held_loss: tuple[float, float] = (0.0, 0.0)  # before and after, on fixed latents, timesteps and noise


def quick_textual_inversion(pipe, edit, target: str, prompts: Sequence[str], settings, steps: int = 200,
                            lr: float = 2e-2, images: int = 16, batch: int = 4, initial_word: str = "object",
                            seed: int = 0, progress=None) -> Inversion:
    """A token embedding that makes the edited model denoise the original model's images of the target:
    `steps` Adam steps on the ε loss at random t, prompts = the target prompts with the target word replaced by
    the placeholder, initialised from `initial_word`'s embedding."""

    templates = [prompt.replace(target, PLACEHOLDER) for prompt in prompts]
    if any(PLACEHOLDER not in text for text in templates):
        raise ValueError(f"textual inversion needs the target {target!r} in every probe prompt")
    latents = target_latents(pipe, prompts, images, settings)
    job = TrainingJob.for_pipeline(pipe)
    overrides = edit_overrides(pipe, edit)
    placeholder_id = pipe.tokenizer.convert_tokens_to_ids(f"{PLACEHOLDER}</w>")
    initial_ids = pipe.tokenizer(initial_word, add_special_tokens=False).input_ids
    if len(initial_ids) != 1:
        raise ValueError(f"the initial word must be one token, {initial_word!r} is {len(initial_ids)}")
    table = pipe.text_encoder.get_input_embeddings().weight
    embedding = table[initial_ids[0]].detach().float().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([embedding], lr=lr)
    ids = token_ids(pipe, templates)
    generator = torch.Generator().manual_seed(seed)
    check_x, check_t, check_noise = fixed_noising(latents, (200, 500, 800), torch.Generator().manual_seed(seed + 1))
    check_ids = ids[torch.arange(len(check_x)) % len(ids)]

    @torch.no_grad()
    def held_loss():  # the same latents, timesteps, noise and prompts before and after: comparable
        replace = check_ids == placeholder_id
        conditioning = encode_rows(pipe, check_ids, replace, embedding.expand(int(replace.sum()), -1))
        return denoising_loss(job, overrides, check_x, conditioning, check_t, check_noise).item()

    before = held_loss()
    losses = []
    for step in range(steps):
        pick = torch.randint(len(latents), (batch,), generator=generator)
        which = torch.randint(len(ids), (batch,), generator=generator)
        timesteps = torch.randint(job.train_timesteps, (batch,), generator=generator)
        noise = torch.randn(latents[pick].shape, generator=generator)
        replace = ids[which] == placeholder_id
        conditioning = encode_rows(pipe, ids[which], replace, embedding.expand(int(replace.sum()), -1))
        loss = denoising_loss(job, overrides, latents[pick], conditioning, timesteps, noise)
        # autograd.grad, not backward(): the shared text encoder's parameters may require grad, and backward()
        # would accumulate into their .grad
        (embedding.grad,) = torch.autograd.grad(loss, [embedding])
        optimiser.step()
        losses.append(loss.item())
        if progress and (step + 1) % 10 == 0:
            progress.step(f"textual inversion step {step + 1} of {steps} · loss {loss.item():.4f}")
    return Inversion(embedding.detach(), templates, losses, initial_word, (before, held_loss()))


def inversion_conditioning(pipe, inversion: Inversion, prompt: str) -> torch.Tensor:
    ids = token_ids(pipe, [prompt])
    replace = ids == pipe.tokenizer.convert_tokens_to_ids(f"{PLACEHOLDER}</w>")
    with torch.no_grad():
        return encode_rows(pipe, ids, replace, inversion.embedding.expand(int(replace.sum()), -1))


@dataclass
class Attack:
    ids: list[int]  # the adversarial prompt's tokens (BOS, k searched tokens, the prompt, EOS, padding)
    text: str  # for display (a decoded token string need not tokenize back to the same ids)
    losses: list[float]  # the best loss after each iteration (index 0: the unattacked prompt)
    evaluations: int  # loss evaluations spent (the budget)


def adversarial_search(pipe, edit, prompt: str, settings, tokens: int = 5, iterations: int = 20,
                       candidates: int = 8, top_k: int = 64, images: int = 4,
                       timesteps: Sequence[int] = (200, 500, 800), seed: int = 0, progress=None) -> Attack:
    """`tokens` searched tokens after BOS, before `prompt`'s own; per iteration one gradient and `candidates`
    exact loss evaluations of single-token swaps drawn from each position's `top_k` (by the gradient); a swap
    is kept only if it lowers the loss. Budget: iterations × (candidates + 1) evaluations. The loss is fixed
    (the same original-model latents, timesteps and noise throughout), so iterations are comparable."""

    if tokens < 1 or iterations < 1 or candidates < 1:
        raise ValueError("the adversarial search needs at least one token, iteration and candidate")
    latents = target_latents(pipe, [prompt], images, settings)
    job = TrainingJob.for_pipeline(pipe)
    overrides = edit_overrides(pipe, edit)
    generator = torch.Generator().manual_seed(seed)
    fixed, t, noise = fixed_noising(latents, timesteps, generator)
    base = token_ids(pipe, [prompt])[0]
    filler = pipe.tokenizer("!", add_special_tokens=False).input_ids[0]
    ids = torch.cat([base[:1], torch.full((tokens,), filler), base[1:-tokens]])
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    special = torch.tensor(pipe.tokenizer.all_special_ids)
    positions = torch.arange(1, tokens + 1)

    def loss_of(candidate_ids, rows=None):
        replace = None
        if rows is not None:
            replace = torch.zeros(1, len(candidate_ids), dtype=torch.bool)
            replace[0, positions] = True
        conditioning = encode_rows(pipe, candidate_ids[None], replace, rows)
        return denoising_loss(job, overrides, fixed, conditioning.expand(len(fixed), -1, -1), t, noise)

    with torch.no_grad():
        best = loss_of(ids).item()
    losses, evaluations = [best], 1
    for iteration in range(iterations):
        rows = table[ids[positions]].float().clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss_of(ids, rows), rows)
        scores = -(gradient.to(table.dtype) @ table.T)  # first-order decrease of the loss per swapped-in token
        scores[:, special] = -torch.inf
        ranked = scores.topk(top_k, dim=1).indices
        with torch.no_grad():
            for _ in range(candidates):
                position = int(torch.randint(tokens, (1,), generator=generator))
                token = int(ranked[position, int(torch.randint(top_k, (1,), generator=generator))])
                trial = ids.clone()
                trial[positions[position]] = token
                value = loss_of(trial).item()
                if value < best:
                    best, ids = value, trial
        evaluations += candidates + 1
        losses.append(best)
        if progress:
            progress.step(f"adversarial search iteration {iteration + 1} of {iterations} · loss {best:.4f}")
    text = pipe.tokenizer.decode(ids[1: 1 + tokens]) + " · " + prompt
    return Attack(ids.tolist(), text, losses, evaluations)


def render_conditioned(pipe, edit, conditioning: torch.Tensor, seeds: Sequence[int], settings) -> list:
    """Images of the edited model from a given text conditioning [1, 77, d], one pipeline call per seed."""

    empty = encode_texts(pipe, [""], full_length=True)[0].rows[None].to(pipe.device, pipe.unet.dtype)
    conditioning = conditioning.to(pipe.device, pipe.unet.dtype)
    return [single_image(pipe, edit, seed, settings, prompt_embeds=conditioning, negative_prompt_embeds=empty)
            for seed in seeds]


def textual_inversion(pipe, edit, prompts: Sequence[str], seeds: Sequence[int], settings: Settings,
                      progress=None, **options) -> ProbeImages:
    """A quick textual inversion on the edited model, then the target prompts with the learned token in the
    target's place (N = 1)."""

    inversion = quick_textual_inversion(pipe, edit, edit.targets[0], prompts, settings, progress=progress, **options)
    images, texts, seed_list = [], [], []
    for prompt, learned in zip(prompts, inversion.prompts):
        images += render_conditioned(pipe, edit, inversion_conditioning(pipe, inversion, learned), seeds, settings)
        texts += [prompt] * len(seeds)
        seed_list += [int(s) for s in seeds]
    return ProbeImages("quick textual inversion", images, ["inversion"] * len(images), texts, seed_list, 1,
                       {"steps": settings.steps, "guidance": settings.guidance, "scheduler": settings.scheduler,
                        "quick": "a short run, weaker than the paper's 3000 x 4 steps",
                        "training_steps": len(inversion.losses), "initial_word": inversion.initial_word,
                        "held_out_loss_before": inversion.held_loss[0], "held_out_loss_after": inversion.held_loss[1],
                        "prompts": inversion.prompts})


def adversarial(pipe, edit, prompts: Sequence[str], seeds: Sequence[int], settings: Settings,
                progress=None, **options) -> ProbeImages:
    """A budgeted token search on the first prompt, then that adversarial prompt on every seed: the share of
    seeds recovered is the attack success rate (N = 1 per seed; the search's budget is in the settings)."""

    attack = adversarial_search(pipe, edit, prompts[0], settings, progress=progress, **options)
    with torch.no_grad():
        conditioning = encode_rows(pipe, torch.tensor([attack.ids]))
    images = render_conditioned(pipe, edit, conditioning, seeds, settings)
    baseline = generate_images(pipe, prompts[:1], seeds, settings, edit)  # one prompt attacked: its own yardstick
    return ProbeImages("adversarial prompt", images, ["adversarial"] * len(images), [prompts[0]] * len(images),
                       [int(s) for s in seeds], 1,
                       {"steps": settings.steps, "guidance": settings.guidance, "scheduler": settings.scheduler,
                        "attacked_prompt": prompts[0], "adversarial_prompt": attack.text,
                        "loss_evaluations": attack.evaluations, "loss_before": attack.losses[0],
                        "loss_after": attack.losses[-1]}, baseline)


register_probe(Probe("inversion", "quick textual inversion", "images", textual_inversion, column=5))
register_probe(Probe("adversarial", "adversarial prompt", "images", adversarial, column=6))
