"""Caps on concepts and generations, in one place: the library's (to keep a call bounded) and the
public app's stricter ones (to keep a shared server responsive). Each check names the cap it hit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

MAX_TARGETS = 1000  # target concepts one library call erases
MAX_RETAIN = 20_000  # retain concepts one library call encodes
MAX_METADATA_BYTES = 8 * 2**20  # an edit file's JSON metadata (its concept lists are most of it)


@dataclass(frozen=True)
class Limits:
    """The app's caps (the library and CLI use MAX_TARGETS / MAX_RETAIN only)."""
    max_targets: int = 100
    max_retain: int = 1000
    max_images: int = 16  # prompt x seed pairs per generation (each is rendered once per column)
    max_steps: int = 50
    max_side: int = 768
    max_edits: int = 3  # edits a session keeps, i.e. edited columns beside the original
    max_train_iterations: int = 1000  # a trained method's steps (it holds the one training slot meanwhile)
    max_probe_prompts: int = 8  # a probe run renders every prompt x seed once per probe variant (up to 12)
    max_probe_seeds: int = 8

    def check_concepts(self, targets: Sequence[str], retain: Sequence[str]) -> None:
        if len(targets) > self.max_targets:
            raise ValueError(f"{len(targets)} target concepts exceed this app's cap of {self.max_targets}; "
                             f"erase fewer at once (the library and CLI have no such cap)")
        if len(retain) > self.max_retain:
            raise ValueError(f"{len(retain)} retain concepts exceed this app's cap of {self.max_retain}")

    def check_generation(self, n_prompts: int, n_seeds: int, settings) -> None:
        if n_prompts * n_seeds > self.max_images:
            raise ValueError(f"{n_prompts} prompts x {n_seeds} seeds = {n_prompts * n_seeds} images per column "
                             f"exceed this app's cap of {self.max_images}; use fewer prompts or seeds")
        if settings.steps > self.max_steps:
            raise ValueError(f"{settings.steps} steps exceed this app's cap of {self.max_steps}")
        if max(settings.height, settings.width) > self.max_side:
            raise ValueError(f"{settings.height}x{settings.width} px exceeds this app's cap of {self.max_side} px "
                             f"per side")

    def check_probes(self, n_prompts: int, n_seeds: int) -> None:
        if n_prompts > self.max_probe_prompts:
            raise ValueError(f"{n_prompts} probe prompts exceed this app's cap of {self.max_probe_prompts}; "
                             f"use fewer prompts")
        if n_seeds > self.max_probe_seeds:
            raise ValueError(f"{n_seeds} probe seeds exceed this app's cap of {self.max_probe_seeds}; use fewer "
                             f"seeds")
        if n_prompts * n_seeds > self.max_images:  # each probe variant renders every pair
            raise ValueError(f"{n_prompts} prompts x {n_seeds} seeds = {n_prompts * n_seeds} images per probe "
                             f"variant exceed this app's cap of {self.max_images}; use fewer prompts or seeds")

    def check_training(self, params) -> None:
        """A trained method's parameters that bound its time and memory."""
        iterations = getattr(params, "iterations", 0)
        if iterations > self.max_train_iterations:
            raise ValueError(f"{iterations} training iterations exceed this app's cap of {self.max_train_iterations}")
        size = getattr(params, "train_size", 0)
        if size > self.max_side:
            raise ValueError(f"a training size of {size} px exceeds this app's cap of {self.max_side} px per side")


def check_concept_counts(n_targets: int, n_retain: int, max_targets: int = MAX_TARGETS,
                         max_retain: int = MAX_RETAIN) -> None:
    """The library's caps, checked before anything is encoded."""
    if n_targets > max_targets:
        raise ValueError(f"{n_targets} target concepts exceed the cap of {max_targets}; erase fewer at once "
                         f"or raise max_concepts")
    if n_retain > max_retain:
        raise ValueError(f"{n_retain} retain concepts exceed the cap of {max_retain}")
