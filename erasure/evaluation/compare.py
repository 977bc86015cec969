"""Same-seed comparisons of several edits against the original model: prompts suggested from the
concepts, generation (originals from the cache), CLIP scores per image, the summary table and a
run record. This is what the app shows; it has no UI code, so the CLI and tests can call it too.

Rows are (prompt, seed) pairs in two groups: prompts that name a target ("should be erased") and
prompts that name retain concepts or nothing in particular ("should be kept"). Columns are
"original" and one per edit, all with the same seeds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from erasure.engine.edit import Edit
from erasure.engine.pipeline import pipeline_state
from erasure.engine.presets import KINDS, concept_text, names_any, neutral_prompts, prompt_templates
from erasure.engine.progress import OnStep, ShouldStop
from erasure.engine.provenance import package_versions
from erasure.evaluation.generate import OriginalCache, Settings, generate_images, originals
from erasure.evaluation.scoring import ClipScorer, ClipScores, summarize_scores

ORIGINAL = "original"
GROUPS = {"erase": "should be erased", "keep": "should be kept"}


@dataclass(frozen=True)
class ComparisonPrompts:
    erase: tuple[str, ...]  # prompts naming a target: the edit should remove it
    keep: tuple[str, ...]  # retain and neutral prompts: the edit should leave them alone

    def rows(self, seeds: Sequence[int]) -> list[tuple[str, str, int]]:
        """(group, prompt, seed) in display order: group, then prompt, then seed."""
        return [(group, prompt, int(seed)) for group in GROUPS for prompt in getattr(self, group) for seed in seeds]


def suggest_prompts(kind: str, targets: Sequence[str], retain: Sequence[str], per_group: int = 3,
                    neutral: int = 1) -> ComparisonPrompts:
    """`per_group` prompts naming the targets (the kind's first templates, template-major so every target
    appears before any repeats), and `per_group` to keep: the first retain concepts in all but `neutral`
    slots, the rest (at least `neutral`) filled with prompts naming nothing."""
    if kind not in KINDS:
        raise ValueError(f"unknown concept kind {kind!r}; choose from {list(KINDS)}")
    templates = prompt_templates(kind)
    erase = [template.format(target) for template in templates for target in targets][:per_group]
    keep = [templates[0].format(concept) for concept in retain[: max(0, per_group - neutral)]]
    keep += [p for p in neutral_prompts(kind) if not names_any(p, targets)][: per_group - len(keep)]
    return ComparisonPrompts(tuple(erase), tuple(keep))


def prompt_lines(text: str) -> list[str]:
    """One prompt per line (prompts may contain commas)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def parse_seeds(text: str) -> list[int]:
    """'0, 1 2' -> [0, 1, 2]; seeds are whole numbers >= 0, each given once."""
    parts = (text or "").replace(",", " ").split()
    if not parts:
        raise ValueError("no seed given: enter one or more whole numbers, e.g. '0, 1'")
    seeds = []
    for part in parts:
        if not (part.isascii() and part.isdigit()) or int(part) >= 2**63:
            raise ValueError(f"seed {part!r} is not a whole number from 0 to 2**63 - 1; enter seeds like '0, 1'")
        if int(part) in seeds:
            raise ValueError(f"seed {part} is given twice; list each seed once")
        seeds.append(int(part))
    return seeds


@dataclass
class Comparison:
    prompts: ComparisonPrompts
    seeds: list[int]
    settings: Settings
    target_texts: list[str]  # what the target score compares each image with
    images: dict[str, list[Image.Image]]  # column -> one image per row of `rows()`
    prompt_scores: dict[str, ClipScores]  # column -> CLIP score of each image to its own prompt
    target_scores: dict[str, ClipScores]  # column -> CLIP score to the closest target concept text
    edits: dict[str, Edit] = field(default_factory=dict)
    originals_reused: int = 0  # original images that came from the cache instead of the pipeline

    def rows(self) -> list[tuple[str, str, int]]:
        return self.prompts.rows(self.seeds)


def run_comparison(pipe, scorer: ClipScorer, prompts: ComparisonPrompts, seeds: Sequence[int], settings: Settings,
                   edits: dict[str, Edit], targets: Sequence[str], kind: str, cache: OriginalCache, *,
                   on_step: OnStep | None = None,
                   should_stop: ShouldStop | None = None) -> Comparison:
    """Render every row with the base model (through `cache`) and with each edit, on the same seeds,
    and score each image against its prompt and against the target concepts."""
    ordered = [prompt for _, prompt, _ in prompts.rows([0])]  # prompt-major order matches generate_images
    if not ordered:
        raise ValueError("no comparison prompt given: enter at least one prompt to compare")
    if not targets:
        raise ValueError("no target concept to score against: erase or type at least one target")
    seeds = [int(s) for s in seeds]

    def reporter(column):
        return (lambda step: on_step(dataclasses.replace(step, message=f"{column}: denoising"))) if on_step else None

    original_images, reused = originals(pipe, ordered, seeds, settings, cache, on_step=reporter(ORIGINAL),
                                        should_stop=should_stop)
    images = {ORIGINAL: original_images}
    for label, edit in edits.items():
        images[label] = generate_images(pipe, ordered, seeds, settings, edit, on_step=reporter(label),
                                        should_stop=should_stop)

    target_texts = [concept_text(kind, target) for target in targets]
    row_prompts = [prompt for _, prompt, _ in prompts.rows(seeds)]
    target_features = scorer.text_features(target_texts)
    prompt_features = scorer.text_features(row_prompts)
    prompt_scores, target_scores = {}, {}
    for column, column_images in images.items():
        features = scorer.image_features(column_images)
        prompt_scores[column] = ClipScores((features * prompt_features).sum(-1).cpu().numpy().astype(np.float64),
                                           scorer.backbone)
        # With several targets, the closest one: an image still showing any target counts as not erased.
        closest = (features @ target_features.T).max(dim=1).values
        target_scores[column] = ClipScores(closest.cpu().numpy().astype(np.float64), scorer.backbone)
    return Comparison(prompts, seeds, settings, target_texts, images, prompt_scores, target_scores, dict(edits), reused)


def summary_rows(comparison: Comparison) -> list[dict]:
    """Per group and column: mean CLIP score to the prompts with its 95% bootstrap interval, its change
    from the original column, and the mean score to the target concepts."""
    groups = np.array([group for group, _, _ in comparison.rows()])
    out = []
    for group, title in GROUPS.items():
        mask = groups == group
        if not mask.any():
            continue
        to_prompt = summarize_scores({c: s.score[mask] for c, s in comparison.prompt_scores.items()}, ORIGINAL)
        for row in to_prompt:
            row.update(group=title, target_mean=float(comparison.target_scores[row["column"]].score[mask].mean()))
            out.append(row)
    return out


def caption(column: str, prompt: str, seed: int, prompt_score: float, target_score: float) -> str:
    return f"{column} · {prompt} · seed {seed}\nCLIP to prompt {prompt_score:.1f} · to target {target_score:.1f}"


def run_record(pipe, comparison: Comparison, scorer: ClipScorer, summary: list[dict] | None = None) -> dict:
    """Everything needed to rerun and check a comparison: model, edits (method, params, concepts),
    prompts, seeds, settings, per-image scores, the summary and package versions."""
    rows = comparison.rows()
    return {
        "model": pipeline_state(pipe).model_id,
        "edits": {label: {"method": e.method, "params": e.params, "targets": e.targets, "anchors": e.anchors,
                          "retain": e.retain, "model_id": e.model_id, "fingerprint": e.fingerprint}
                  for label, e in comparison.edits.items()},
        "prompts": {"erase": list(comparison.prompts.erase), "keep": list(comparison.prompts.keep)},
        "seeds": comparison.seeds,
        "settings": asdict(comparison.settings),
        "clip": {"backbone": scorer.backbone, "convention": comparison.prompt_scores[ORIGINAL].convention,
                 "random_weights": scorer.is_random, "target_texts": comparison.target_texts},
        "images": [{"group": GROUPS[group], "prompt": prompt, "seed": seed,
                    **{column: {"clip_to_prompt": float(comparison.prompt_scores[column].score[i]),
                                "clip_to_target": float(comparison.target_scores[column].score[i])}
                       for column in comparison.images}}
                   for i, (group, prompt, seed) in enumerate(rows)],
        "summary": summary if summary is not None else summary_rows(comparison),
        "versions": package_versions(),
    }
