"""Scores, one implementation for the app, the CLI and the tests.

CLIP score convention (stated in every output): score = 100 × max(cos(image, text), 0), the
torchmetrics `CLIPScore` convention; the raw cosine is reported alongside. Default backbone: open_clip
ViT-L-14 with `openai` weights. "tiny" is a random-weight open_clip model built from a config, for
tests and the offline demo: its numbers mean nothing and are labelled so.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

DEFAULT_CLIP = ("ViT-L-14", "openai")
CONVENTION = "CLIP score = 100 * max(cos, 0) (torchmetrics convention); raw cosine alongside"
TINY_CLIP = dict(embed_dim=64,
                 vision_cfg=dict(image_size=64, layers=2, width=64, head_width=32, patch_size=16),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))


class ScorerLoadError(RuntimeError):
    """A scorer's weights could not be loaded (e.g. offline without a cache)."""


@dataclass(frozen=True)
class ClipScores:
    cosine: np.ndarray  # [n] raw cosine similarity of each (image, text) pair
    backbone: str

    @property
    def score(self) -> np.ndarray:
        return 100 * np.clip(self.cosine, 0, None)

    @property
    def convention(self) -> str:
        return CONVENTION


class ClipScorer:
    """An open_clip model loaded once, scoring images against texts in batches."""

    def __init__(self, model, preprocess, tokenizer, backbone: str, device: str):
        self.model, self.preprocess, self.tokenizer = model.eval().to(device), preprocess, tokenizer
        self.backbone, self.device = backbone, device
        self._lock = threading.Lock()  # one forward at a time; the model is shared across app sessions

    @property
    def is_random(self) -> bool:
        return self.backbone.startswith("tiny")

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """L2-normalised image embeddings, [n, e]."""
        out = []
        with self._lock:
            for start in range(0, len(images), batch_size):
                batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start:start + batch_size]])
                out.append(self.model.encode_image(batch.to(self.device)).float())
        features = torch.cat(out) if out else torch.zeros(0, 1)
        return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings, [n, e]."""
        out = []
        with self._lock:
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
                out.append(self.model.encode_text(tokens).float())
        features = torch.cat(out) if out else torch.zeros(0, 1)
        return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def scores(self, images: Sequence[Image.Image], texts: Sequence[str]) -> ClipScores:
        """Pairwise-aligned scores: image i against text i."""
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images but {len(texts)} texts; score pairs need one text per image")
        if not images:
            return ClipScores(np.zeros(0), self.backbone)
        image, text = self.image_features(images), self.text_features(texts)
        return ClipScores((image * text).sum(-1).cpu().numpy().astype(np.float64), self.backbone)


_SCORERS: dict[tuple, ClipScorer] = {}
_SCORERS_LOCK = threading.Lock()


def load_clip_scorer(name: str = DEFAULT_CLIP[0], pretrained: str = DEFAULT_CLIP[1],
                     device: str | None = None) -> ClipScorer:
    """A cached scorer: `name`/`pretrained` are open_clip's (e.g. "ViT-B-32", "openai"); "tiny" is offline."""
    import open_clip

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    key = (name, pretrained if name != "tiny" else None, device)
    with _SCORERS_LOCK:
        if key in _SCORERS:
            return _SCORERS[key]
        if name == "tiny":
            torch.manual_seed(0)
            model = open_clip.CLIP(**TINY_CLIP)
            preprocess = open_clip.image_transform(TINY_CLIP["vision_cfg"]["image_size"], is_train=False)
            scorer = ClipScorer(model, preprocess, open_clip.get_tokenizer("ViT-B-32"),
                                "tiny (random-weight demo)", device)
        else:
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
            except Exception as error:
                raise ScorerLoadError(f"could not load CLIP {name} ({pretrained}): {str(error)[:200]}. Check the "
                                      f"network or the open_clip/Hugging Face cache, or use the 'tiny' scorer "
                                      f"(random weights, offline)") from None
            scorer = ClipScorer(model, preprocess, open_clip.get_tokenizer(name), f"{name} ({pretrained})", device)
        _SCORERS[key] = scorer
        return scorer


@dataclass(frozen=True)
class MeanInterval:
    """A mean with a percentile-bootstrap confidence interval."""
    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95


def bootstrap_mean(values, n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> MeanInterval:
    """Mean of `values` with a seeded percentile-bootstrap interval (resampling the values with replacement)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return MeanInterval(float("nan"), float("nan"), float("nan"), 0, level)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    mean = float(values.mean())
    return MeanInterval(mean, min(float(low), mean), max(float(high), mean), int(values.size), level)


def same_seed_win_rate(original_cosine, edited_cosine, **bootstrap) -> MeanInterval:
    """Share of (prompt, seed) pairs whose edited image is less similar to the target than the original."""
    original_cosine, edited_cosine = np.asarray(original_cosine), np.asarray(edited_cosine)
    if original_cosine.shape != edited_cosine.shape:
        raise ValueError("win rate needs one edited image per original image (same prompts and seeds)")
    return bootstrap_mean((edited_cosine < original_cosine).astype(np.float64), **bootstrap)


def summarize_scores(scores: dict[str, np.ndarray], baseline: str = "original") -> list[dict]:
    """One row per column (e.g. original, each edit): mean score with its 95% interval and the change
    from the baseline column. Used for the app's summary table and the evaluate command."""
    base = bootstrap_mean(scores[baseline]).mean if baseline in scores else float("nan")
    rows = []
    for column, values in scores.items():
        interval = bootstrap_mean(values)
        rows.append({"column": column, "mean": interval.mean, "ci_low": interval.low, "ci_high": interval.high,
                     "n": interval.n, "change": interval.mean - base})
    return rows
