"""One run protocol for everything that takes steps (denoising, training, probing): the work calls
`on_step(Progress(...))` after each step and polls `should_stop()`; when that turns true it raises `Cancelled`,
and whatever it had made is dropped (weights are restored as on any exit)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    message: str = ""  # what the step was ("original: denoising", "probe 2 of 7 (noise-based)")
    loss: float = math.nan  # training steps only


class Cancelled(Exception):
    """The work stopped because `should_stop()` asked it to; nothing it made is kept."""


OnStep = Callable[[Progress], None]
ShouldStop = Callable[[], bool]


def report(on_step: OnStep | None, should_stop: ShouldStop | None, progress: Progress, what: str) -> None:
    """Tell `on_step` where the work is, then raise `Cancelled` if it was asked to stop."""
    if on_step:
        on_step(progress)
    if should_stop and should_stop():
        raise Cancelled(f"{what} cancelled after {progress.done} of {progress.total} steps")
