"""Diffusion completion: the original weights run the first k denoising steps, the edited ones the rest."""

from __future__ import annotations

from typing import Sequence

from erasure.evaluation.generate import Settings, generate_images
from erasure.evaluation.probes.registry import Probe, ProbeImages, register_probe


def diffusion_completion(pipe, edit, prompts: Sequence[str], seeds: Sequence[int], settings: Settings,
                         ks: Sequence[int] | None = None, progress=None) -> ProbeImages:
    """Per k: the original model denoises steps 0..k-1 and the edit the rest (k = 0: the edited model alone;
    k = steps: the original model). Each k is its own variant, not a pick: N = 1 per k. Default: k = 1, 2, 3, 5
    where fewer than the run's steps (a 3-step run gets 1 and 2)."""
    ks = [k for k in (1, 2, 3, 5) if k < settings.steps] or [0] if ks is None else list(ks)
    by_k = {}
    for k in ks:
        by_k[k] = generate_images(pipe, prompts, seeds, settings, edit, edit_from_step=k)
        if progress:
            progress.step(f"completion k = {k} rendered")
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


register_probe(Probe("completion", "diffusion completion", "images", diffusion_completion, column=2))
