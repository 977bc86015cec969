"""The probes' one judge, shared with `evaluate`: the model profile's classifier where it has one, else CLIP
zero-shot."""

from __future__ import annotations

import numpy as np
import torch

from erasure.engine.pipeline import pipeline_state
from erasure.engine.presets import concept_text
from erasure.evaluation.scoring import model_scorer, zero_shot_predictions


class Judge:
    """Which images show the target: the model profile's classifier where it has one (the toy world's judge),
    else CLIP zero-shot of the target against the edit's anchors and retain concepts and a generic photo (the
    first class wins = recovered). `scorer`: a loaded CLIP scorer to use (default: the standard one)."""

    def __init__(self, pipe, edit, kind: str, scorer=None):
        self.target = edit.targets[0]
        self.classifier = model_classifier(pipe)
        if self.classifier is not None:
            self.name = f"{pipeline_state(pipe).profile.name} judge"
            return

        self.scorer = scorer or model_scorer(pipe)
        others = list(dict.fromkeys(c for c in [*edit.anchors, *edit.retain[:9]] if c and c != self.target))
        self.kind = kind
        texts = [concept_text(kind, c) for c in [self.target, *others]] + ["a photo"]
        self.classes = self.scorer.text_features(texts)
        self.name = f"CLIP {self.scorer.backbone} zero-shot: {self.target!r} vs {len(texts) - 1} other texts"

    def __call__(self, images) -> "np.ndarray":
        return self.shows(images, self.target)

    def shows(self, images, concept: str) -> "np.ndarray":
        """Which images show `concept` (the target, or e.g. a neighbour of it): the toy judge's reading, or CLIP
        zero-shot of the concept against the target and the same other texts."""

        if self.classifier is not None:
            return np.asarray(self.classifier(images).finds(concept))
        classes = self.classes
        if concept != self.target:
            classes = torch.cat([self.scorer.text_features([concept_text(self.kind, concept)]), classes])
        return zero_shot_predictions(self.scorer.image_features(images), classes) == 0


def model_classifier(pipe):
    """The classifier the model's profile names (`classifier(images).finds(concept)`), or None: the one judge
    choice of the probes and `evaluate`."""
    load = pipeline_state(pipe).profile.judge
    return load() if load is not None else None
