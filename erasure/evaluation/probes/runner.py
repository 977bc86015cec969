"""Running probes on an edit: progress over all of them, each probe's images judged into rates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from erasure.engine.pipeline import pipeline_state
from erasure.engine.progress import Progress
from erasure.engine.progress import report as report_progress
from erasure.evaluation.generate import Settings
from erasure.evaluation.probes.protocols import Protocol, get_protocol
from erasure.evaluation.probes.registry import PROBE_TITLES, PROBES, ProbeImages


def check_probe_names(names: Sequence[str]) -> None:
    unknown = [name for name in names if name not in PROBES]
    if unknown:
        raise ValueError(f"unknown probe {unknown[0]!r}; the probes are {', '.join(PROBES)}")


class ProbeProgress:
    """A probe run's progress: `step(message)` inside a probe (a training step, a batch) and `finish(probe)` after
    it report (probes done, probes in all, message) and raise `Cancelled` when the run was asked to stop."""

    def __init__(self, total: int, on_step=None, should_stop=None):
        self.total, self.done, self.on_step, self.should_stop = total, 0, on_step, should_stop

    def step(self, message: str = "") -> None:
        report_progress(self.on_step, self.should_stop, Progress(self.done, self.total, message), "probing")

    def finish(self, name: str) -> None:
        self.done += 1
        self.step(f"{PROBE_TITLES[name]} done")


@dataclass
class JudgedImages:
    """A probe's images with the judge's verdict on each (and on the unprobed baseline, where it has one)."""
    images: ProbeImages
    seen: np.ndarray
    baseline_seen: np.ndarray | None = None


def run_probes(pipe, edit, names: Sequence[str], prompts: Sequence[str], seeds: Sequence[int], settings: Settings,
               judge, kind: str = "object", on_step=None, should_stop=None,
               protocol: str = "paper") -> tuple[dict, list[ProbeImages]]:
    """Every named probe on `edit` under `protocol` ("paper" or "quick", see protocols.py): a JSON-ready report
    (recovery rates with N, seeds and each probe's settings) and the images, for a sheet. `on_step(Progress(probes
    done, probes in all, message))` is called during and after each probe; `should_stop()` is polled then
    (`Cancelled` ends the run)."""
    check_probe_names(names)
    rules = get_protocol(protocol)
    pipeline_state(pipe).family.check_unet_method("the probes")
    report = report_header(edit, judge, prompts, seeds, settings, rules)
    rendered = []
    progress = ProbeProgress(len(names), on_step, should_stop)
    for name in names:
        progress.step(f"running {PROBES[name].title}")
        if PROBES[name].yields == "report":
            report["probes"][name] = run_report_probe(pipe, edit, name, prompts, seeds, settings, judge, kind, rules,
                                                      progress)
        else:
            judged = render_and_judge(pipe, edit, name, prompts, seeds, settings, judge, rules, progress)
            report["probes"][name] = rates(judged)
            rendered.append(judged.images)
        progress.finish(name)
    return report, rendered


def report_header(edit, judge, prompts: Sequence[str], seeds: Sequence[int], settings: Settings,
                  rules: Protocol) -> dict:
    return {"target": edit.targets[0], "method": edit.method, "judge": judge.name, "protocol": rules.name,
            "protocol_summary": rules.summary, "prompts": list(prompts), "seeds": [int(s) for s in seeds],
            "steps": rules.steps or settings.steps, "guidance": settings.guidance, "probes": {}}


def run_report_probe(pipe, edit, name: str, prompts, seeds, settings: Settings, judge, kind: str, rules: Protocol,
                     progress=None) -> dict:
    return PROBES[name].run(pipe, edit, prompts, seeds, rules.settings_for(name, settings), judge=judge, kind=kind,
                            progress=progress, **rules.options_for(name))


def render_and_judge(pipe, edit, name: str, prompts, seeds, settings: Settings, judge, rules: Protocol,
                     progress=None) -> JudgedImages:
    images = PROBES[name].run(pipe, edit, prompts, seeds, rules.settings_for(name, settings), progress=progress,
                              **rules.options_for(name))
    baseline = np.array([bool(judge([image])[0]) for image in images.baseline]) if images.baseline else None
    return JudgedImages(images, judge_per_sample(judge, images), baseline)


def judge_per_sample(judge, images: ProbeImages) -> np.ndarray:
    """The judge's verdicts, each (prompt, seed)'s images judged as one batch: a verdict then does not depend on
    which other samples were rendered beside it (by one process or by several)."""
    seen = np.zeros(len(images.images), dtype=bool)
    samples = list(zip(images.prompts, images.seeds))
    start = 0
    for end in range(1, len(samples) + 1):
        if end == len(samples) or samples[end] != samples[start]:
            seen[start:end] = np.asarray(judge(images.images[start:end]), dtype=bool)
            start = end
    return seen


def rates(judged: JudgedImages) -> dict:
    """A probe's verdicts as rates: the share the judge finds the target in, best of N per (prompt, seed), per
    variant, and the same prompts unprobed where the probe rendered that baseline."""
    images, seen = judged.images, judged.seen
    by_variant = {v: float(seen[[x == v for x in images.variants]].mean()) for v in dict.fromkeys(images.variants)}
    best_of_n = seen.reshape(-1, images.per_sample).any(1)
    result = {"images": len(images.images), "N": images.per_sample, "recovery_rate": float(seen.mean()),
              "best_of_N_rate": float(best_of_n.mean()), "by_variant": by_variant, "settings": images.settings}
    if judged.baseline_seen is not None:
        result["baseline_rate"] = float(judged.baseline_seen.mean())
    return result
