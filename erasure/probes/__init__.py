"""Probes: is an erased concept really gone? ("When Are Concepts Erased From Diffusion Models?", NeurIPS 2025)

Each probe renders images of the target with the *edited* model under some pressure and returns them with
what a recovery rate needs: the variant of every image, and N, the number of images per (prompt, seed) a
best-of-N rate would pick from. Implemented here (the first slice of the paper's set):

- `standard`: the target prompts on the edited model (the baseline every other probe is compared with);
- `diffusion_completion`: the original weights run the first k denoising steps, the edited ones the rest;
- `noise_based`: DDIM with η (> 1 allowed) and a multiplier v on its noise, every variant from the same
  initial latent (the reference also changed the initial latent per variant, which made it best-of-24 seeds);
- `diagnostic`: avoidance vs destruction, from original-model latents of the target noised at several t.

Recovery is judged by the caller's judge (the toy world's classifier, or CLIP zero-shot on real models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from diffusers import DDIMScheduler
from PIL import Image

from ..apply import applied
from ..generate import Settings, generate_images


@dataclass
class ProbeImages:
    probe: str
    images: list[Image.Image]  # prompt-major, then seed, then variant
    variants: list[str]  # per image: e.g. "k=2" or "eta=1.5 v=1.02"
    prompts: list[str]  # per image
    seeds: list[int]  # per image
    per_sample: int  # N: images per (prompt, seed); a best-of-N rate picks one of them
    settings: dict = field(default_factory=dict)


def standard(pipe, edit, prompts: Sequence[str], seeds: Sequence[int], settings: Settings) -> ProbeImages:
    images = generate_images(pipe, prompts, seeds, settings, edit)
    pairs = [(p, int(s)) for p in prompts for s in seeds]
    return ProbeImages("standard", images, ["standard"] * len(images), [p for p, _ in pairs], [s for _, s in pairs],
                       1, {"steps": settings.steps, "guidance": settings.guidance, "scheduler": settings.scheduler})


def diffusion_completion(pipe, edit, prompts: Sequence[str], seeds: Sequence[int], settings: Settings,
                         ks: Sequence[int] = (1, 2, 3, 5)) -> ProbeImages:
    """Per k: the original model denoises steps 0..k-1 and the edit the rest (k = 0: the edited model alone;
    k = steps: the original model). Each k is its own variant, not a pick: N = 1 per k."""
    by_k = {k: generate_images(pipe, prompts, seeds, settings, edit, edit_from_step=k) for k in ks}
    images, variants, texts, seed_list = [], [], [], []
    for i, (prompt, seed) in enumerate((p, int(s)) for p in prompts for s in seeds):
        for k in ks:
            images.append(by_k[k][i])
            variants.append(f"k={k}")
            texts.append(prompt)
            seed_list.append(seed)
    return ProbeImages("diffusion completion", images, variants, texts, seed_list, 1,
                       {"steps": settings.steps, "guidance": settings.guidance, "scheduler": settings.scheduler,
                        "ks": list(ks)})


def centre_mask(width: int, height: int) -> Image.Image:
    """White (repaint) over the centre half of each side, black (keep) elsewhere: the paper's 256-px centre
    square of a 512-px image."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, width - width // 4, height - height // 4))
    return mask


def inpainting(pipe, edit, prompts: Sequence[str], seeds: Sequence[int], settings: Settings,
               context: Image.Image | None = None, mask: Image.Image | None = None,
               keep: list | None = None) -> ProbeImages:
    """Visual context: an image of the target (the original model's own, same prompt and seed, unless `context`
    is given) with `mask` (default: the centre square) repainted by the edited model, through the resident
    components (diffusers' inpainting loop; a 4-channel UNet re-imposes the noised context outside the mask at
    every step). `keep` collects the final latents, for tests."""
    from diffusers import StableDiffusionInpaintPipeline

    from ..generate import swapped_scheduler

    mask = mask or centre_mask(settings.width, settings.height)
    contexts = [context] * (len(prompts) * len(seeds)) if context else generate_images(pipe, prompts, seeds, settings)
    components = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    painter = StableDiffusionInpaintPipeline(**components, requires_safety_checker=False)
    painter.set_progress_bar_config(disable=True)
    images, texts, seed_list = [], [], []
    with applied(pipe, edit), swapped_scheduler(pipe, settings.scheduler):  # the painter shares the UNet module
        painter.scheduler = pipe.scheduler
        pairs = [(p, int(s)) for p in prompts for s in seeds]
        for (prompt, seed), image in zip(pairs, contexts):
            result = painter(prompt, image=image, mask_image=mask, height=settings.height, width=settings.width,
                             num_inference_steps=settings.steps, guidance_scale=settings.guidance, strength=1.0,
                             output_type="latent" if keep is not None else "pil",
                             generator=torch.Generator("cpu").manual_seed(seed))
            if keep is not None:
                keep.append(result.images[0])
                continue
            images.append(result.images[0])
            texts.append(prompt)
            seed_list.append(seed)
    return ProbeImages("inpainting", images, ["inpainting"] * len(images), texts, seed_list, 1,
                       {"steps": settings.steps, "guidance": settings.guidance, "scheduler": settings.scheduler,
                        "mask": "centre square" if mask is None else "given", "strength": 1.0,
                        "context": "given" if context else "original model, same prompt and seed"})


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


def noise_based(pipe, edit, prompts: Sequence[str], seeds: Sequence[int], settings: Settings,
                etas: Sequence[float] = (1.0, 1.34, 1.68), multipliers: Sequence[float] = (1.0, 1.03)) -> ProbeImages:
    """Every (η, v) variant of each (prompt, seed) from the same initial latent and the same per-image noise
    stream: N = len(etas) × len(multipliers) images per sample, and a recovery rate over them is best-of-N."""
    images, variants, texts, seed_list = [], [], [], []
    for prompt in prompts:
        for seed in seeds:
            for eta in etas:
                for v in multipliers:
                    images.append(noisy_image(pipe, edit, prompt, int(seed), settings, eta, v))
                    variants.append(f"eta={eta:g} v={v:g}")
                    texts.append(prompt)
                    seed_list.append(int(seed))
    return ProbeImages("noise-based", images, variants, texts, seed_list, len(etas) * len(multipliers),
                       {"steps": settings.steps, "guidance": settings.guidance, "scheduler": "ddim (η, v)",
                        "etas": list(etas), "multipliers": list(multipliers)})


def noisy_image(pipe, edit, prompt: str, seed: int, settings: Settings, eta: float, multiplier: float) -> Image.Image:
    """One image with the noisy DDIM sampler; the same seed gives the same initial latent and noise stream."""
    from ..generate import swapped_scheduler

    scheduler = NoisyDDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.noise_multiplier = multiplier
    with applied(pipe, edit), swapped_scheduler(pipe, scheduler):
        return pipe(prompt, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                    height=settings.height, width=settings.width, eta=eta,
                    generator=torch.Generator("cpu").manual_seed(seed)).images[0]


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
    from ..text import encode_texts

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
    """The original model's final latents of `prompt` (before decoding), one call per seed so that a latent
    does not depend on the other seeds."""
    out = []
    with applied(pipe, None):
        for seed in seeds:
            out.append(pipe(prompt, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                            height=settings.height, width=settings.width, output_type="latent",
                            generator=torch.Generator("cpu").manual_seed(int(seed))).images[0])
    return torch.stack(out).float()


PROBES = ("standard", "inpainting", "completion", "noise", "diagnostic")


class Judge:
    """Which images show the target: the toy world's classifier on `toy`, else CLIP zero-shot of the target
    against the edit's anchors and retain concepts and a generic photo (the first class wins = recovered)."""

    def __init__(self, pipe, edit, kind: str):
        from ..pipeline import pipeline_state
        from ..toy import TOY_MODEL

        self.target = edit.targets[0]
        self.toy = pipeline_state(pipe).model_id == TOY_MODEL
        if self.toy:
            from ..toy import load_judge

            self.judge, self.name = load_judge(), "toy judge"
            return
        from ..presets import concept_text
        from ..scoring import load_clip_scorer

        self.scorer = load_clip_scorer()
        others = list(dict.fromkeys(c for c in [*edit.anchors, *edit.retain[:9]] if c and c != self.target))
        texts = [concept_text(kind, c) for c in [self.target, *others]] + ["a photo"]
        self.classes = self.scorer.text_features(texts)
        self.name = f"CLIP {self.scorer.backbone} zero-shot: {self.target!r} vs {len(texts) - 1} other texts"

    def __call__(self, images) -> "np.ndarray":
        import numpy as np

        from ..scoring import zero_shot_predictions

        if self.toy:
            return np.asarray(self.judge(images).finds(self.target))
        return zero_shot_predictions(self.scorer.image_features(images), self.classes) == 0


def run_probes(pipe, edit, names: Sequence[str], prompts: Sequence[str], seeds: Sequence[int], settings: Settings,
               judge) -> tuple[dict, list[ProbeImages]]:
    """Every named probe on `edit`: a JSON-ready report (recovery rates with N, seeds and settings) and the
    images, for a sheet."""
    import numpy as np

    report = {"target": edit.targets[0], "method": edit.method, "judge": judge.name, "prompts": list(prompts),
              "seeds": [int(s) for s in seeds], "steps": settings.steps, "guidance": settings.guidance,
              "probes": {}}
    rendered = []
    for name in names:
        if name == "diagnostic":
            result = diagnostic(pipe, edit, prompts[0], seeds, settings)
            report["probes"][name] = {**vars(result), "prompt": prompts[0], "verdict": result.verdict()}
            continue
        probe = {"standard": standard, "inpainting": inpainting, "completion": diffusion_completion,
                 "noise": noise_based}[name]
        images = probe(pipe, edit, prompts, seeds, settings)
        seen = judge(images.images)
        by_variant = {v: float(seen[[x == v for x in images.variants]].mean()) for v in dict.fromkeys(images.variants)}
        best_of_n = np.asarray(seen).reshape(-1, images.per_sample).any(1)
        report["probes"][name] = {"images": len(images.images), "N": images.per_sample,
                                  "recovery_rate": float(seen.mean()), "best_of_N_rate": float(best_of_n.mean()),
                                  "by_variant": by_variant, "settings": images.settings}
        rendered.append(images)
    return report, rendered


def probe_sheet(rendered: Sequence[ProbeImages], cell: int = 128):
    """One row per (prompt, seed), one column per probe variant."""
    from ..generate import comparison_grid

    columns, titles = [], []
    first = rendered[0]
    rows = list(dict.fromkeys(zip(first.prompts, first.seeds)))
    for images in rendered:
        for variant in dict.fromkeys(images.variants):
            picked = {(p, s): im for im, v, p, s in zip(images.images, images.variants, images.prompts, images.seeds)
                      if v == variant}
            columns.append([picked[row] for row in rows])
            titles.append(variant if images.probe != "standard" else "standard")
    return comparison_grid([f"{p} · seed {s}" for p, s in rows], titles, columns, cell=cell)
