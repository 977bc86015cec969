"""Interference: what the edit did to the concepts nearest the target.

Neighbours are the candidate concepts whose text embedding is closest (cosine of the mean of their own token
rows) to the target's: the model profile's own candidates where it has them (the toy world's shapes), elsewhere every concept of the presets of the
same kind plus the edit's own retain list. Each is rendered with the target's prompts (target word
replaced) by the original and the edited model on the same seeds and judged for *that* neighbour.
"""

from __future__ import annotations

from typing import Sequence

import torch

from erasure.engine.pipeline import pipeline_state
from erasure.engine.presets import load_preset, presets
from erasure.engine.text import encode_texts
from erasure.evaluation.generate import generate_images
from erasure.evaluation.probes.registry import Probe, register_probe


def candidate_concepts(pipe, edit, kind: str) -> list[str]:
    neighbours = pipeline_state(pipe).profile.neighbours
    if neighbours:
        pool = list(neighbours)
    else:
        pool = list(edit.retain)
        for name in presets():
            preset = load_preset(name)
            if preset.kind == kind and preset.model is None:
                pool += [*preset.targets, *preset.anchors, *preset.retain]
    skip = {c.lower() for c in edit.targets} | {""}
    return [c for c in dict.fromkeys(pool) if c.lower() not in skip]


def nearest_concepts(pipe, target: str, candidates: Sequence[str], count: int) -> list[tuple[str, float]]:
    """The `count` candidates nearest the target by cosine similarity of their mean token rows."""

    if not candidates:
        return []
    encoded = encode_texts(pipe, [target, *candidates])
    means = torch.stack([e.rows[1:max(e.subject, 1) + 1].float().mean(0) for e in encoded])
    similarity = torch.nn.functional.cosine_similarity(means[:1], means[1:])
    order = similarity.argsort(descending=True)[:count]
    return [(candidates[i], float(similarity[i])) for i in order]


def interference(pipe, edit, prompts: Sequence[str], seeds: Sequence[int], settings, judge, kind: str,
                 neighbours: int = 4, progress=None) -> tuple[dict, list]:
    """A targets × neighbours matrix of the share of images the judge assigns to the neighbour, original and
    edited, from the target's prompts with each neighbour in the target's place. Returns the report and
    (neighbour, original images, edited images) per neighbour."""
    rows, rendered = {}, []
    candidates = candidate_concepts(pipe, edit, kind)
    for target in edit.targets:
        found = nearest_concepts(pipe, target, candidates, neighbours)
        row = {}
        for neighbour, similarity in found:
            texts = list(dict.fromkeys(p.replace(edit.targets[0], neighbour) for p in prompts))
            original = generate_images(pipe, texts, seeds, settings)
            edited = generate_images(pipe, texts, seeds, settings, edit)
            row[neighbour] = {"similarity": similarity, "original": float(judge.shows(original, neighbour).mean()),
                              "edited": float(judge.shows(edited, neighbour).mean()), "images": len(edited)}
            rendered.append((neighbour, original, edited))
            if progress:
                progress.step(f"interference: {neighbour}")
        rows[target] = row
    return {"matrix": rows, "neighbours_per_target": neighbours,
            "note": "share of images the judge assigns to the neighbour, original vs edited"}, rendered


def interference_report(pipe, edit, prompts: Sequence[str], seeds: Sequence[int], settings, judge=None,
                        kind: str = "object", progress=None) -> dict:
    return interference(pipe, edit, prompts, seeds, settings, judge, kind, progress=progress)[0]


register_probe(Probe("interference", "interference", "report", interference_report, column=7))
