"""Sampling settings: steps, guidance, size and sampler, checked; each model's defaults (the family's, then its
profile's)."""

from __future__ import annotations

from dataclasses import dataclass

from erasure.engine.pipeline import pipeline_state

SCHEDULERS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",  # FLUX's own (rectified flow); the others are SD's
}


@dataclass(frozen=True)
class Settings:
    steps: int = 20
    guidance: float = 7.5
    height: int = 512
    width: int = 512
    scheduler: str = "pndm"

    def check(self) -> "Settings":
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose from {sorted(SCHEDULERS)}")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be between 1 and 1000, got {self.steps}")
        if not (self.guidance >= 0 and self.guidance < 1e4):
            raise ValueError(f"guidance must be a number >= 0, got {self.guidance}")
        for side in (self.height, self.width):
            if side < 8 or side % 8:
                raise ValueError(f"height and width must be multiples of 8 (>= 8), got {self.height}x{self.width}")
        return self


def default_settings(pipe, **overrides) -> Settings:
    """Settings at the model's native size (512 for SD-1.x, 1024 for SDXL and FLUX, 64 for the tiny models, 32 for
    the toy world), the family's own guidance and sampler (FLUX: its distilled guidance and flow-matching Euler),
    then the model profile's own (3 steps on random-weight models, the toy world's sampler): the app's and
    `evaluate`'s defaults alike."""
    state = pipeline_state(pipe)
    side = state.family.native_side(pipe)
    defaults = {"height": side, "width": side, **state.family.settings, **state.profile.settings}
    return Settings(**{**defaults, **overrides}).check()


