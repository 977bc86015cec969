"""Inpainting: an original-model image of the target with its centre repainted by the edited model."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from erasure.engine.apply import applied
from erasure.evaluation.generate import Settings, generate_images, swapped_scheduler
from erasure.evaluation.probes.registry import Probe, ProbeImages, register_probe


def centre_mask(width: int, height: int) -> Image.Image:
    """White (repaint) over the centre half of each side, black (keep) elsewhere: the paper's 256-px centre
    square of a 512-px image."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, width - width // 4, height - height // 4))
    return mask


def inpainting(pipe, edit, prompts: Sequence[str], seeds: Sequence[int], settings: Settings,
               context: Image.Image | None = None, mask: Image.Image | None = None,
               keep: list | None = None, progress=None) -> ProbeImages:
    """Visual context: an image of the target (the original model's own, same prompt and seed, unless `context`
    is given) with `mask` (default: the centre square) repainted by the edited model, through the resident
    components (diffusers' inpainting loop; a 4-channel UNet re-imposes the noised context outside the mask at
    every step). `keep` collects the final latents, for tests."""
    from diffusers import StableDiffusionInpaintPipeline

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
            if progress:
                progress.step(f"inpainting image {len(images)} of {len(contexts)}")
    return ProbeImages("inpainting", images, ["inpainting"] * len(images), texts, seed_list, 1,
                       {"steps": settings.steps, "guidance": settings.guidance, "scheduler": settings.scheduler,
                        "mask": "centre square" if mask is None else "given", "strength": 1.0,
                        "context": "given" if context else "original model, same prompt and seed"})


register_probe(Probe("inpainting", "inpainting", "images", inpainting, column=1))
