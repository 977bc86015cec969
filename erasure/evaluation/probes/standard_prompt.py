"""The standard prompt: the target prompts on the edited model, the baseline every other probe is compared
with."""

from __future__ import annotations

from typing import Sequence

from erasure.evaluation.generate import Settings, generate_images
from erasure.evaluation.probes.registry import Probe, ProbeImages, register_probe


def standard(pipe, edit, prompts: Sequence[str], seeds: Sequence[int], settings: Settings,
             progress=None) -> ProbeImages:
    images = generate_images(pipe, prompts, seeds, settings, edit)
    pairs = [(p, int(s)) for p in prompts for s in seeds]
    return ProbeImages("standard", images, ["standard"] * len(images), [p for p, _ in pairs], [s for _, s in pairs],
                       1, {"steps": settings.steps, "guidance": settings.guidance, "scheduler": settings.scheduler})


register_probe(Probe("standard", "standard prompt", "images", standard, column=0))
