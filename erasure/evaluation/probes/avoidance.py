"""Avoidance vs destruction: does the edited model still denoise original-model latents of the target as the
original does (it avoids the concept) or not (the concept is destroyed)?"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from erasure.engine.apply import applied
from erasure.engine.text import encode_texts
from erasure.evaluation.generate import Settings, generate_pairs
from erasure.evaluation.probes.registry import Probe, register_probe


@dataclass
class Diagnostic:
    """Mean squared noise-prediction error on original-model latents of the target, noised at each t with the
    same noise, for the original and the edited model, with the target prompt and with the empty prompt."""
    timesteps: list[int]
    target_original: list[float]
    target_edited: list[float]
    empty_original: list[float]
    empty_edited: list[float]

    def verdict(self) -> str:
        """Destruction: the edited model can no longer denoise the target's images even unprompted (its
        empty-prompt error rises with the target-prompt one). Avoidance: it still denoises them from the empty
        prompt as well as the original does, and only the prompt's path was cut."""
        empty_rise = sum(self.empty_edited) / max(sum(self.empty_original), 1e-12) - 1
        target_rise = sum(self.target_edited) / max(sum(self.target_original), 1e-12) - 1
        if empty_rise > 0.5 * max(target_rise, 1e-12) and empty_rise > 0.02:
            return (f"destruction: the empty-prompt error rose {empty_rise:+.0%} with the target prompt's "
                    f"{target_rise:+.0%}")
        return (f"avoidance: the target prompt's error rose {target_rise:+.0%} while the empty prompt's moved "
                f"{empty_rise:+.0%}: the knowledge is still in the model")


@torch.no_grad()
def diagnostic(pipe, edit, prompt: str, seeds: Sequence[int], settings: Settings,
               timesteps: Sequence[int] = (100, 300, 500, 700, 900)) -> Diagnostic:

    latents = original_latents(pipe, prompt, seeds, settings)
    conditioning = torch.stack([e.rows for e in encode_texts(pipe, [prompt, ""], full_length=True)])
    noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(10_000 + int(s)))
                         for s in seeds]).to(latents.device)
    alphas = pipe.scheduler.alphas_cumprod
    unet = pipe.unet
    curves = {name: [] for name in ("target_original", "target_edited", "empty_original", "empty_edited")}
    for t in timesteps:
        alpha = float(alphas[t])
        noisy = (alpha ** 0.5 * latents + (1 - alpha) ** 0.5 * noise).to(unet.dtype)  # the same for all four
        for model, written in (("original", None), ("edited", edit)):
            with applied(pipe, written):
                for row, which in ((0, "target"), (1, "empty")):
                    context = conditioning[row:row + 1].expand(len(noisy), -1, -1).to(unet.dtype)
                    predicted = unet(noisy, t, encoder_hidden_states=context).sample.float()
                    curves[f"{which}_{model}"].append(float((predicted - noise).square().mean()))
    return Diagnostic(list(timesteps), **curves)


def original_latents(pipe, prompt: str, seeds: Sequence[int], settings: Settings) -> torch.Tensor:
    """The original model's final latents of `prompt` (before decoding), one per seed (generate's fixed batches:
    a latent does not depend on the other seeds)."""

    return torch.stack(generate_pairs(pipe, [(prompt, int(s)) for s in seeds], settings, None, latents=True))


def diagnostic_report(pipe, edit, prompts: Sequence[str], seeds: Sequence[int], settings: Settings, judge=None,
                      kind: str = "object", progress=None) -> dict:
    result = diagnostic(pipe, edit, prompts[0], seeds, settings)
    return {**vars(result), "prompt": prompts[0], "verdict": result.verdict()}


register_probe(Probe("diagnostic", "avoidance vs destruction", "report", diagnostic_report, column=8))
