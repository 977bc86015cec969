"""Classifier guidance: steer the edited model's sampler toward the target with a latent classifier.

The paper's classifiers were trained on ImageNet images of ten classes. Here one is trained for whatever
the user typed: on the *original* model's own final latents of the target prompts (positives) against the
same prompts with the target replaced by each anchor and retain concept (negatives), noised at random
timesteps, so it reads noisy latents at every step of sampling. It is small (a convolutional network over the
latent, told the noise level; see `LatentClassifier`) and cached by what it was trained on, bounded in bytes.

Guided step (the paper's form): ε̂ ← ε̂_cfg − √(1 − ᾱ_t) · s · ∇ₓ log σ(f(x_t, t)); the backward pass goes
through the classifier only, never the UNet.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from erasure.engine.lru import LRU, tensor_bytes
from erasure.engine.pipeline import model_identity
from erasure.evaluation.generate import Settings, generate_pairs
from erasure.evaluation.probes.noisy import NoisyDDIMScheduler, single_image
from erasure.evaluation.probes.registry import Probe, ProbeImages, register_probe

TRAINING_SEED_BASE = 30_000  # the classifier's own images never share a seed with the probe's


class LatentClassifier(nn.Module):
    """logit(target | x_t, t): three convolutions (the last two halve the grid) whose channels are shifted by an
    embedding of the noise level [√ᾱ_t, √(1 − ᾱ_t)], averaged over the grid, then a linear head. Convolutions,
    not the paper's MLP over the flattened latent: with a few hundred generations instead of ImageNet's
    thousands, an MLP memorised where things were (81% held-out on the toy world) instead of what they were."""

    def __init__(self, latent_shape: Sequence[int], width: int = 64):
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        channels = self.latent_shape[0]
        self.convs = nn.ModuleList([nn.Conv2d(channels, width, 3, padding=1),
                                    nn.Conv2d(width, width, 3, stride=2, padding=1),
                                    nn.Conv2d(width, width, 3, stride=2, padding=1)])
        self.noise_in = nn.Linear(2, width)
        self.head = nn.Linear(width, 1)

    def forward(self, latents: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
        alpha = alpha_cumprod.reshape(-1, 1).expand(len(latents), 1)
        level = self.noise_in(torch.cat([alpha.sqrt(), (1 - alpha).sqrt()], 1).to(latents.dtype))
        hidden = latents
        for conv in self.convs:
            hidden = nn.functional.silu(conv(hidden) + level[:, :, None, None])
        return self.head(hidden.mean((2, 3))).squeeze(1)


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything a trained classifier depends on (its cache key)."""
    model: str  # pipeline.model_identity
    positives: tuple[str, ...]
    negatives: tuple[str, ...]
    images_per_class: int = 128
    held_out: int = 32  # of each class, by seed
    steps: int = 600
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    settings: tuple = ()  # generation settings of the training latents

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class TrainedClassifier:
    classifier: LatentClassifier
    spec: ClassifierSpec
    accuracy: dict[int, float]  # held-out accuracy per timestep t (t = 0: the clean final latents)
    losses: list[float]  # training loss per step


CLASSIFIERS: LRU[TrainedClassifier] = LRU(max_bytes=64 << 20, size=lambda c: tensor_bytes(
    *c.classifier.state_dict().values()))


def negative_prompts(prompts: Sequence[str], target: str, others: Sequence[str]) -> list[str]:
    """The target's prompts with the target replaced by each other concept (anchor or retain); an empty
    concept removes the word."""
    out = []
    for concept in others:
        for prompt in prompts:
            text = " ".join(prompt.replace(target, concept).split())
            if text != prompt:
                out.append(text)
    return list(dict.fromkeys(out))


def latent_classifier(pipe, target: str, prompts: Sequence[str], others: Sequence[str], settings,
                      progress=None, **options) -> TrainedClassifier:
    """The cached classifier for (model, target prompts, negatives, options), trained first if needed.
    `progress.step(message)` is called per generation batch and every 20 training steps (and may cancel)."""

    negatives = negative_prompts(prompts, target, others)
    if not negatives:
        raise ValueError("classifier guidance needs something that is not the target to tell it from: give an "
                         "anchor or retain concepts")
    spec = ClassifierSpec(model_identity(pipe), tuple(prompts), tuple(negatives),
                          settings=tuple(asdict(settings).items()), **options)
    found = CLASSIFIERS.get(spec.key())
    if found is None:
        found = CLASSIFIERS[spec.key()] = train_classifier(pipe, spec, settings, progress)
    return found


def training_pairs(prompts: Sequence[str], count: int, first_seed: int) -> list[tuple[str, int]]:
    """`count` (prompt, seed) pairs cycling through the prompts, every pair with its own seed."""
    return [(prompts[i % len(prompts)], first_seed + i) for i in range(count)]


def train_classifier(pipe, spec: ClassifierSpec, settings, progress=None) -> TrainedClassifier:
    count = spec.images_per_class
    pairs = (training_pairs(spec.positives, count, TRAINING_SEED_BASE)
             + training_pairs(spec.negatives, count, TRAINING_SEED_BASE + count))
    latents = []
    for start in range(0, len(pairs), 16):
        latents += generate_pairs(pipe, pairs[start:start + 16], settings, None, latents=True)
        if progress:
            progress.step(f"classifier data {min(start + 16, len(pairs))} of {len(pairs)} images")
    device = pipe.device  # the classifier trains where the model runs (a GPU makes its 600 steps seconds)
    latents = torch.stack(latents).to(device)
    labels = torch.cat([torch.ones(count), torch.zeros(count)]).to(device)
    held = torch.zeros(2 * count, dtype=torch.bool)  # the last seeds of each class are held out
    held[count - spec.held_out: count] = held[2 * count - spec.held_out:] = True
    alphas = pipe.scheduler.alphas_cumprod.float().to(device)

    torch_state = torch.random.get_rng_state()  # initialisation draws from the global stream: seed it, then put
    torch.manual_seed(spec.seed)                # the stream back so nothing else changes
    classifier = LatentClassifier(latents.shape[1:]).to(device)
    torch.random.set_rng_state(torch_state)
    optimiser = torch.optim.AdamW(classifier.parameters(), lr=spec.lr, weight_decay=1e-3)
    generator = torch.Generator().manual_seed(spec.seed)
    train_x, train_y = latents[~held], labels[~held]
    loss_fn = nn.BCEWithLogitsLoss()
    losses = []
    classifier.train()
    for step in range(spec.steps):
        pick = torch.randint(len(train_x), (spec.batch,), generator=generator).to(device)
        t = torch.randint(len(alphas), (spec.batch,), generator=generator).to(device)
        noise = torch.randn(train_x[pick].shape, generator=generator).to(device)
        alpha = alphas[t].reshape(-1, 1, 1, 1)
        noisy = alpha.sqrt() * train_x[pick] + (1 - alpha).sqrt() * noise
        loss = loss_fn(classifier(noisy, alphas[t]), train_y[pick])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if progress and (step + 1) % 20 == 0:
            progress.step(f"classifier step {step + 1} of {spec.steps} · loss {loss:.3f}")
    classifier.eval().requires_grad_(False)
    accuracy = held_out_accuracy(classifier, latents[held], labels[held], alphas, spec.seed)
    return TrainedClassifier(classifier, spec, accuracy, losses)


@torch.no_grad()
def held_out_accuracy(classifier, latents, labels, alphas, seed: int,
                      timesteps: Sequence[int] = (0, 200, 400, 600, 800)) -> dict[int, float]:
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + 1)).to(latents.device)
    accuracy = {}
    for t in timesteps:
        alpha = alphas[t]
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise if t else latents
        accuracy[t] = float(((classifier(noisy, alpha) > 0).float() == labels).float().mean())
    return accuracy


class ClassifierGuidedDDIMScheduler(NoisyDDIMScheduler):
    """The noisy DDIM step (η = 0: plain DDIM) on ε̂ − √(1 − ᾱ_t) · s · ∇ₓ log σ(f(x_t, t))."""

    classifier: LatentClassifier | None = None
    guidance_scale: float = 0.0

    def step(self, model_output, timestep, sample, *args, **kwargs):
        if self.classifier is not None and self.guidance_scale:
            alpha = self.alphas_cumprod[timestep].float()
            with torch.enable_grad():
                x = sample.detach().float().requires_grad_(True)
                log_p = nn.functional.logsigmoid(self.classifier(x, alpha.to(x.device))).sum()
                (gradient,) = torch.autograd.grad(log_p, x)
            model_output = model_output - ((1 - alpha) ** 0.5 * self.guidance_scale * gradient).to(model_output.dtype)
        return super().step(model_output, timestep, sample, *args, **kwargs)


def guided_image(pipe, edit, prompt: str, seed: int, settings, classifier: LatentClassifier, scale: float):
    """One image of the edited model sampled with classifier guidance at `scale` (0: plain DDIM)."""
    scheduler = ClassifierGuidedDDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.classifier = classifier.to(pipe.device)
    scheduler.guidance_scale = scale
    return single_image(pipe, edit, seed, settings, scheduler, prompt=prompt)


def classifier_guidance(pipe, edit, prompts: Sequence[str], seeds: Sequence[int], settings: Settings,
                        scales: Sequence[float] = (30, 100, 300), progress=None) -> ProbeImages:
    """The edited model sampled (DDIM) with a latent classifier's guidance at each scale, from the same initial
    latent: N = len(scales). The classifier is trained on the original model's images first (cached)."""

    trained = latent_classifier(pipe, edit.targets[0], prompts, [*edit.anchors, *edit.retain], settings,
                                progress=progress)
    images, variants, texts, seed_list = [], [], [], []
    for prompt in prompts:
        for seed in seeds:
            for scale in scales:
                images.append(guided_image(pipe, edit, prompt, int(seed), settings, trained.classifier, scale))
                if progress:
                    progress.step(f"guided image {len(images)} of {len(prompts) * len(seeds) * len(scales)}")
                variants.append(f"scale={scale:g}")
                texts.append(prompt)
                seed_list.append(int(seed))
    spec = trained.spec
    return ProbeImages("classifier guidance", images, variants, texts, seed_list, len(scales),
                       {"steps": settings.steps, "guidance": settings.guidance, "scheduler": "ddim",
                        "scales": list(scales), "classifier_held_out_accuracy": trained.accuracy,
                        "classifier_images_per_class": spec.images_per_class, "classifier_steps": spec.steps,
                        "classifier_negatives": list(spec.negatives)})


register_probe(Probe("guidance", "classifier guidance", "images", classifier_guidance, column=4))
