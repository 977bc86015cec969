"""What the toy world shows, measured with its judge: can the model draw its world, and does an edit
remove the target while its neighbours stay? Used by the tests, the README table and
`python -m erasure.worlds.toy.report`.

"Judged X" means the judge's sigmoid for X is above 0.5. The pixel change of a kept prompt is the mean
absolute difference of the same-seed original and edited images over all RGB values, on a 0–1 scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from erasure.engine.presets import load_preset, prompt_templates
from erasure.evaluation.generate import OriginalCache, Settings, default_settings, generate_images, originals
from erasure.worlds.toy import load_judge
from erasure.worlds.toy.world import COLOURS, SHAPES, article


@dataclass(frozen=True)
class DrawingQuality:
    shape_rate: float  # share of images in which the prompted shape is judged present
    colour_rate: float
    per_shape: dict[str, float]
    images: int
    seeds: int


def drawing_quality(pipe, seeds: Sequence[int], settings: Settings | None = None) -> DrawingQuality:
    """The base model on "a {colour} {shape}" for every colour and shape, `seeds` each."""
    settings = settings or default_settings(pipe)
    pairs = [(shape, colour) for shape in SHAPES for colour in COLOURS]
    images = generate_images(pipe, [article(f"{c} {s}") for s, c in pairs], seeds, settings)
    verdict = load_judge()(images)
    shapes = np.repeat([s for s, _ in pairs], len(seeds))
    colours = np.repeat([c for _, c in pairs], len(seeds))
    shape_ok = np.array([verdict.present(s)[i] for i, s in enumerate(shapes)])
    colour_ok = np.array([verdict.present(c)[i] for i, c in enumerate(colours)])
    return DrawingQuality(float(shape_ok.mean()), float(colour_ok.mean()),
                          {s: float(shape_ok[shapes == s].mean()) for s in SHAPES}, len(images), len(seeds))


@dataclass(frozen=True)
class ConceptRate:
    concept: str
    role: str  # "erased" or "kept"
    original: float  # share of images judged to show the concept
    edited: float
    pixel_change: float  # mean |edited - original| over RGB values, 0-1 scale
    images: int


def concept_rates(pipe, edit, erased: Sequence[str], kept: Sequence[str], kind: str, seeds: Sequence[int],
                  templates: int = 4, settings: Settings | None = None, cache: OriginalCache | None = None,
                  erased_seeds: Sequence[int] | None = None) -> list[ConceptRate]:
    """Per concept: the share of same-seed original and edited images the judge sees it in, over the
    kind's first `templates` prompt templates × `seeds` (`erased_seeds` for the erased concepts, if given:
    an anchor such as "shape" draws the target itself 1 time in 8, so its rate needs more images to be
    told from 20%). Original images come from `cache` when it has them."""
    settings = settings or default_settings(pipe)
    cache = cache or OriginalCache()
    forms = prompt_templates(kind, full=True)[:templates]
    judge = load_judge()
    rates = []
    for role, concepts in (("erased", erased), ("kept", kept)):
        for concept in concepts:
            prompts = [form.format(concept) for form in forms]
            these = erased_seeds if role == "erased" and erased_seeds is not None else seeds
            before, _ = originals(pipe, prompts, these, settings, cache)
            after = generate_images(pipe, prompts, these, settings, edit)
            change = np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() / 255
                              for a, b in zip(before, after)])
            rates.append(ConceptRate(concept, role, float(judge(before).finds(concept).mean()),
                                     float(judge(after).finds(concept).mean()), float(change),
                                     len(before)))
    return rates


def preset_rates(pipe, edit, preset: str, seeds: Sequence[int], templates: int = 4,
                 cache: OriginalCache | None = None, erased_seeds: Sequence[int] | None = None,
                 settings: Settings | None = None) -> list[ConceptRate]:
    spec = load_preset(preset)
    return concept_rates(pipe, edit, spec.targets, spec.retain, spec.kind, seeds, templates, settings, cache,
                         erased_seeds)
