"""DDIM with any η ≥ 0 and a multiplier on its injected noise (the noise-based probe's sampler), and the one-image
sampling call the probes with their own sampler or conditioning share."""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DDIMScheduler
from PIL import Image

from erasure.engine.apply import applied
from erasure.evaluation.generate import Settings, swapped_scheduler
from erasure.evaluation.probes.registry import Probe, ProbeImages, register_probe


class NoisyDDIMScheduler(DDIMScheduler):
    """DDIM whose step takes any η ≥ 0 and a multiplier v on the injected noise:

        x_{t-1} = √ᾱ_{t-1} x̂₀ + √|1 − ᾱ_{t-1} − (η σ_t)²| ε̂ + v η σ_t z

    (the |·| keeps the root real for η > 1, as in the paper's code). With η = 0 it is plain DDIM."""

    noise_multiplier: float = 1.0

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None, variance_noise=None, return_dict: bool = True):
        from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
        from diffusers.utils.torch_utils import randn_tensor

        if self.config.prediction_type != "epsilon" or self.config.thresholding or use_clipped_model_output:
            raise ValueError("the noise-based probe supports ε-prediction DDIM without thresholding")
        previous = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha = self.alphas_cumprod[timestep]
        alpha_prev = self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod
        x0 = (sample - (1 - alpha) ** 0.5 * model_output) / alpha ** 0.5
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        sigma = eta * self._get_variance(timestep, previous) ** 0.5
        prev_sample = alpha_prev ** 0.5 * x0 + (1 - alpha_prev - sigma ** 2).abs() ** 0.5 * model_output
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            prev_sample = prev_sample + self.noise_multiplier * sigma * variance_noise
        if not return_dict:
            return prev_sample, x0
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


def single_image(pipe, edit, seed: int, settings, scheduler=None, **inputs):
    """One image of `edit` (None: the original model) in its own pipeline call with its own seeded generator, so
    the same seed gives the same initial latent and noise stream whatever else is rendered. `scheduler`: a
    scheduler object or name (default: the settings'); `inputs`: the prompt or prompt embeddings and any extra
    pipeline arguments (e.g. eta)."""

    with applied(pipe, edit), swapped_scheduler(pipe, scheduler or settings.scheduler):
        return pipe(**inputs, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                    height=settings.height, width=settings.width,
                    generator=torch.Generator("cpu").manual_seed(int(seed))).images[0]


def noise_based(pipe, edit, prompts: Sequence[str], seeds: Sequence[int], settings: Settings,
                etas: Sequence[float] = (1.0, 1.34, 1.68), multipliers: Sequence[float] = (1.0, 1.03),
                progress=None) -> ProbeImages:
    """Every (η, v) variant of each (prompt, seed) from the same initial latent and the same per-image noise
    stream: N = len(etas) × len(multipliers) images per sample, and a recovery rate over them is best-of-N."""
    images, variants, texts, seed_list = [], [], [], []
    for prompt in prompts:
        for seed in seeds:
            for eta in etas:
                for v in multipliers:
                    images.append(noisy_image(pipe, edit, prompt, int(seed), settings, eta, v))
                    if progress:
                        progress.step(f"noise-based image {len(images)} of "
                                      f"{len(prompts) * len(seeds) * len(etas) * len(multipliers)}")
                    variants.append(f"eta={eta:g} v={v:g}")
                    texts.append(prompt)
                    seed_list.append(int(seed))
    return ProbeImages("noise-based", images, variants, texts, seed_list, len(etas) * len(multipliers),
                       {"steps": settings.steps, "guidance": settings.guidance, "scheduler": "ddim (η, v)",
                        "etas": list(etas), "multipliers": list(multipliers)})


def noisy_image(pipe, edit, prompt: str, seed: int, settings: Settings, eta: float, multiplier: float) -> Image.Image:
    """One image with the noisy DDIM sampler; the same seed gives the same initial latent and noise stream."""
    scheduler = NoisyDDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.noise_multiplier = multiplier
    return single_image(pipe, edit, seed, settings, scheduler, prompt=prompt, eta=eta)


register_probe(Probe("noise", "noise-based", "images", noise_based, column=3))
