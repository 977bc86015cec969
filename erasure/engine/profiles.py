"""What a model is, beyond its weights: a `ModelProfile` attached to the pipeline when it is loaded.

Everything that differs between the hub's models, the random-weight test models and the toy world (sampling
defaults, images per pipeline call, the CLIP scorer and the judge, the default prompt kind, which presets apply,
the banner's note) is read from the profile, never from the model's name. A model source that needs no hub
(`erasure.worlds`) registers its loader with its profile; every other model gets `PRETRAINED`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class ModelProfile:
    name: str = "pretrained"
    # Overrides of the family's sampling defaults (steps, guidance, scheduler); the side is the family's.
    settings: dict = field(default_factory=dict)
    generation_batch: int = 4  # images per pipeline call: fixed per model, so an image never depends on its batch
    scorer: str | None = None  # CLIP scorer name for `evaluation.scoring.load_clip_scorer`; None: the default CLIP
    judge: Callable[[], Any] | None = None  # loads a classifier naming what an image shows; None: CLIP zero-shot
    prompt_kind: str = "object"  # the default kind of prompt templates
    presets: str | None = None  # the `model` field of the presets made for it (None: the real-model presets)
    neighbours: tuple[str, ...] = ()  # candidate neighbours of a target for the interference probe; () = presets'
    banner: str = ""  # what the app says about it under the model line
    offline: bool = False  # built here without the hub: a failure to load it is a bug, not a reason to fall back
    real_images: bool = True  # its images can be compared with real photographs (FID on Inception features)


PRETRAINED = ModelProfile()


@dataclass(frozen=True)
class ModelSource:
    load: Callable[[], Any]  # builds the pipeline (CPU, fp32)
    profile: ModelProfile


SOURCES: dict[str, ModelSource] = {}


def register_source(name: str, load: Callable[[], Any], profile: ModelProfile) -> None:
    """Make `load_pipeline(name)` build the model with `load` and attach `profile` to it."""
    SOURCES[name] = ModelSource(load, profile)


def profile_of(model: str) -> ModelProfile:
    """The profile `load_pipeline(model)` attaches: a registered source's, else `PRETRAINED`."""
    source = SOURCES.get(model)
    return source.profile if source else PRETRAINED
