"""Probe protocols: the settings each probe runs at. "paper" follows "When Are Concepts Erased From Diffusion
Models?" (NeurIPS 2025) and its code; "quick" is a CPU-sized version of it, named so that a report never passes
one off as the other.

paper: 50 denoising steps for every probe; DDIM for diffusion completion, the noise-based probe and classifier
guidance, the model's own sampler for the others; completion after k = 1, 2, 3 base steps (and 5, an extra the
paper's notebook also ran); the noise probe's full grid, 6 η × 4 noise multipliers (N = 24); classifier guidance
at the paper's 25 scales 25, 32, ..., 193 (N = 25). Textual inversion stays our quick one (200 steps, not the
paper's 3000 × 4): its settings say so.

quick: the run's own steps and sampler; completion k = 1, 2, 3, 5 where fewer than the steps; η ∈ {1, 1.34, 1.68}
× v ∈ {1, 1.03} (N = 6); guidance scales 30, 100, 300 (N = 3; 300 is above the paper's range).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from erasure.engine.settings import Settings

PAPER_ETAS = (1.0, 1.17, 1.34, 1.51, 1.68, 1.85)
PAPER_NOISE_MULTIPLIERS = (1.0, 1.02, 1.03, 1.04)
PAPER_GUIDANCE_SCALES = tuple(range(25, 194, 7))  # 25 scales from 25 to 193


@dataclass(frozen=True)
class Protocol:
    name: str
    summary: str
    steps: int | None = None  # None: the run's own
    ddim_probes: tuple[str, ...] = ()  # probes sampled with DDIM whatever the run's sampler
    options: dict[str, dict] = field(default_factory=dict)  # probe -> keyword arguments of its runner

    def settings_for(self, probe: str, settings: Settings) -> Settings:
        steps = self.steps or settings.steps
        scheduler = "ddim" if probe in self.ddim_probes else settings.scheduler
        return dataclasses.replace(settings, steps=steps, scheduler=scheduler)

    def options_for(self, probe: str) -> dict:
        return dict(self.options.get(probe, {}))


PROTOCOLS = {
    "paper": Protocol(
        "paper", "the paper's: 50 steps; DDIM for completion, noise and guidance; noise N = 24, guidance N = 25",
        steps=50, ddim_probes=("completion", "noise", "guidance"),
        options={"completion": {"ks": (1, 2, 3, 5)},
                 "noise": {"etas": PAPER_ETAS, "multipliers": PAPER_NOISE_MULTIPLIERS},
                 "guidance": {"scales": PAPER_GUIDANCE_SCALES}}),
    "quick": Protocol(
        "quick", "for a CPU: the run's steps and sampler; noise N = 6, guidance N = 3",
        options={"noise": {"etas": (1.0, 1.34, 1.68), "multipliers": (1.0, 1.03)},
                 "guidance": {"scales": (30, 100, 300)}}),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown probe protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
