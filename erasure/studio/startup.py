"""What the app starts on: the model (with a fallback to the offline toy world) and the CLIP scorer its profile
names (with a fallback to the random-weight one), and a notice that says what was substituted and why."""

from __future__ import annotations

import sys

import torch

import erasure
from erasure.engine.profiles import profile_of
from erasure.evaluation.scoring import ScorerLoadError, load_clip_scorer, model_scorer

FALLBACK_MODEL = "toy"  # offline, trained, and on a CPU quick enough to use


def load_models(model: str | None, device: str | None) -> tuple:
    """The pipeline, its scorer and a notice for the banner. No model given: SD-1.4 on a GPU, the toy world
    without one. A model that cannot be loaded falls back to the toy world, with the reason in the notice."""
    notice = ""
    if model is None:
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        model = erasure.DEFAULT_MODEL if cuda else FALLBACK_MODEL
        if not cuda:
            notice = (f"No GPU found, so the app started on the toy world (`--model {erasure.DEFAULT_MODEL}` "
                      f"runs SD-1.4 on the CPU, at minutes per image).")
    try:
        pipe = erasure.load_pipeline(model, device=device)
    except erasure.ModelLoadError as error:
        if profile_of(model).offline:  # built here: its failure is a bug to see, not a reason to substitute
            raise
        notice = (f"{error} The app started with the offline toy world instead (`python app.py --model toy` "
                  f"starts it directly).")
        print(f"warning: {notice}", file=sys.stderr)
        pipe = erasure.load_pipeline(FALLBACK_MODEL, device=device)
    try:
        return pipe, model_scorer(pipe), notice
    except ScorerLoadError as error:
        notice = f"{notice} {error}; CLIP scores use the random-weight tiny scorer instead.".strip()
        print(f"warning: {error}", file=sys.stderr)
        return pipe, load_clip_scorer("tiny"), notice
