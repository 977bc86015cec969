"""The probe registry: one `Probe` per probe, registered by its own file; the runner, the app's ticks and the
CLI's choices read `PROBES`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from PIL import Image


@dataclass
class ProbeImages:
    probe: str
    images: list[Image.Image]  # prompt-major, then seed, then variant
    variants: list[str]  # per image: e.g. "k=2" or "eta=1.5 v=1.02"
    prompts: list[str]  # per image
    seeds: list[int]  # per image
    per_sample: int  # N: images per (prompt, seed); a best-of-N rate picks one of them
    settings: dict = field(default_factory=dict)
    baseline: list[Image.Image] = field(default_factory=list)  # the same prompts and seeds without the probe


@dataclass(frozen=True)
class Probe:
    """One probe: its name (the CLI's and the API's), its title (the table's column), what it yields, and how
    it runs. "images": `run(pipe, edit, prompts, seeds, settings, progress=)` -> ProbeImages, judged into a
    recovery rate with N; "report": `run(pipe, edit, prompts, seeds, settings, judge=, kind=, progress=)` -> a
    JSON-ready dict (a matrix, a verdict)."""
    name: str
    title: str
    yields: str
    run: Callable
    column: int  # its place in the table (the paper's order: the standard prompt first, the diagnostic last)


PROBES: dict[str, Probe] = {}  # in column order
PROBE_TITLES: dict[str, str] = {}


def register_probe(probe: Probe) -> Probe:
    if probe.yields not in ("images", "report"):
        raise ValueError(f"probe {probe.name!r} yields {probe.yields!r}; choose images or report")
    PROBES[probe.name] = probe
    ordered = sorted(PROBES.values(), key=lambda p: p.column)
    PROBES.clear()
    PROBES.update((p.name, p) for p in ordered)
    PROBE_TITLES.clear()
    PROBE_TITLES.update((p.name, p.title) for p in ordered)
    return probe


