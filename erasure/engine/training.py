"""What a trained method works with: a private, frozen copy of the denoiser and the few operations
training needs (conditioning, guided ε, deterministic DDIM steps), progress and cancellation.

The copy is taken under the pipeline's lock with the base weights (also while another session has an
edit written in), and everything after that runs without the lock: other sessions keep generating while
a job trains. A method trains its own tensors and passes them to `denoise` as parameter overrides
(`torch.func.functional_call`), so the copy itself is never modified either.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.func import functional_call

from erasure.engine.pipeline import pipeline_state
from erasure.engine.progress import Cancelled, OnStep, Progress, ShouldStop, report
from erasure.engine.settings import default_settings
from erasure.engine.text import encode_texts

TrainingCancelled = Cancelled  # the run protocol's one cancellation (kept under its older name)


@dataclass
class TrainingJob:
    unet: torch.nn.Module  # private frozen copy with the base weights; never trained, never written
    encode: Callable[[Sequence[str]], torch.Tensor]  # texts -> [n, 77, d] conditioning, as the pipeline encodes
    scheduler_config: dict  # the pipeline's scheduler config: DDIM timesteps are built from it
    alphas_cumprod: torch.Tensor  # float64, the pipeline's training schedule
    final_alpha_cumprod: float
    train_timesteps: int
    latent_shape: tuple[int, int, int]  # (channels, height, width) at the model's native size
    scale: int  # pixels per latent cell
    guidance: float  # the model's default classifier-free guidance (for trajectories a method samples)
    on_step: OnStep | None = None
    should_stop: ShouldStop | None = None

    @classmethod
    def for_pipeline(cls, pipe, on_step=None, should_stop=None) -> "TrainingJob":
        pipeline_state(pipe).family.check_unet_method("training (ESD, Minimalist)")
        settings = default_settings(pipe)
        with pipeline_state(pipe).lock:  # a generation may have another sampler swapped in until it ends
            config = dict(pipe.scheduler.config)
            schedule = pipe.scheduler.alphas_cumprod.double()
            unet = private_copy(pipe)
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"trained methods support ε-prediction models; this one predicts "
                             f"{config['prediction_type']!r}")
        final = 1.0 if config.get("set_alpha_to_one", False) else float(schedule[0])
        scale = pipe.vae_scale_factor
        shape = (pipe.unet.config.in_channels, settings.height // scale, settings.width // scale)

        def encode(texts):
            return torch.stack([e.rows for e in encode_texts(pipe, list(texts), full_length=True)])

        return cls(unet, encode, config, schedule, final, len(schedule), shape, scale, settings.guidance, on_step,
                   should_stop)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def base(self, name: str) -> torch.Tensor:
        """The base value of a UNet parameter (read-only)."""
        return self.unet.get_parameter(name).detach()

    def report(self, done: int, total: int, loss: float) -> None:
        """Progress after a step; raises `Cancelled` when the job was asked to stop."""
        report(self.on_step, self.should_stop, Progress(done, total, loss=loss), "training")

    def check(self) -> None:
        """Raises `Cancelled` when the job was asked to stop (between steps of the preparation)."""
        if self.should_stop and self.should_stop():
            raise Cancelled("training cancelled before its first step")

    def denoise(self, latents, timesteps, conditioning, overrides: dict[str, torch.Tensor] | None = None):
        """ε(x_t, t, c) of the frozen copy, with `overrides` (parameter name -> tensor, may require grad) in place
        of its parameters. Casts inputs to the model's dtype and returns float32."""
        timesteps = torch.as_tensor(timesteps, device=self.device).expand(len(latents))
        args = (latents.to(self.dtype), timesteps)
        kwargs = {"encoder_hidden_states": conditioning.to(self.dtype), "return_dict": False}
        if overrides:
            output = functional_call(self.unet, {k: v.to(self.dtype) for k, v in overrides.items()}, args, kwargs,
                                     strict=False)
        else:
            output = self.unet(*args, **kwargs)
        return output[0].float()

    def guided(self, latents, timestep, conditioning, unconditional, guidance: float, overrides=None):
        """Classifier-free guided ε for a batch: one UNet call on [unconditional; conditional]."""
        both = self.denoise(torch.cat([latents, latents]), timestep,
                            torch.cat([unconditional.expand_as(conditioning), conditioning]), overrides)
        empty, text = both.chunk(2)
        return empty + guidance * (text - empty)

    def ddim_timesteps(self, steps: int) -> list[tuple[int, int]]:
        """(t, previous t) pairs of the `steps`-step DDIM schedule the pipeline's scheduler config gives (the
        app's DDIM sampler), noisiest first."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        ratio = self.train_timesteps // steps
        return [(int(t), int(t) - ratio) for t in scheduler.timesteps]

    def ddim_step(self, latents, eps, t: int, previous: int):
        """Deterministic DDIM (η = 0) from x_t to x_previous; differentiable in latents and eps."""
        alpha = float(self.alphas_cumprod[t])
        alpha_prev = float(self.alphas_cumprod[previous]) if previous >= 0 else self.final_alpha_cumprod
        x0 = (latents - (1 - alpha) ** 0.5 * eps) / alpha ** 0.5
        return alpha_prev ** 0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps

    def noise(self, seeds: Sequence[int], size: int = 0) -> torch.Tensor:
        """Initial latents for images of side `size` pixels (0: the model's native size), one CPU generator per
        seed (as the app's images), float32 on the job's device."""
        shape = self.latent_shape
        if size:
            if size % self.scale:
                raise ValueError(f"the training image size must be a multiple of {self.scale} pixels, got {size}")
            shape = (shape[0], size // self.scale, size // self.scale)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
                           ).to(self.device)


def private_copy(pipe) -> torch.nn.Module:
    """A frozen deep copy of the pipeline's UNet holding the base weights, taken under the lock (another
    session may have an edit written into the shared parameters right now). An fp16 pipeline's copy is bf16:
    fp16's range would flush the backward pass's small gradients to zero without loss scaling; bf16 has fp32's
    range (the trained tensors themselves stay fp32)."""
    state = pipeline_state(pipe)
    with state.lock, torch.no_grad():
        unet = copy.deepcopy(pipe.unet)
        copied = dict(unet.named_parameters())
        for name, value in state.originals.items():
            copied[name].copy_(value)
    if pipe.unet.dtype == torch.float16:
        unet = unet.to(torch.bfloat16)
    unet.requires_grad_(False).eval()
    return unet
