"""The studio: the resident pipeline and CLIP scorer shared by every session, and what each session does with them
(its numbered edits, background jobs, comparisons, probe runs and downloads). Plain values in, plain values out:
the app turns them into page updates, and tests call them without a server.

A session is a list of {"id", "label", "number"} entries (the app keeps it in a gr.State); the tensors stay in
`Studio.edits`, owned by the session's id.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import erasure
from erasure.engine.apply import check_applicable
from erasure.engine.compute import check_erase_inputs
from erasure.engine.export import export
from erasure.engine.limits import Limits
from erasure.engine.pipeline import family_preset_params, method_defaults, pipeline_state
from erasure.engine.presets import load_preset
from erasure.engine.progress import OnStep, Progress, ShouldStop
from erasure.engine.text import split_concepts
from erasure.evaluation.compare import (GROUPS, ComparisonPrompts, caption, parse_seeds,
                                        prompt_lines, run_comparison, run_record, summary_rows)
from erasure.evaluation.generate import OriginalCache, Settings, default_settings
from erasure.evaluation.probes import PROBES, Judge, check_probe_names, probe_sheet, run_probes
from erasure.evaluation.probes.protocols import get_protocol
from erasure.studio.downloads import Downloads
from erasure.studio.reports import default_probe_prompts, edit_report, short
from erasure.studio.sessions import CancelFlags, EditStore, Jobs

# What the app exports beside the native edit file (a baked multi-GB pipeline folder is the CLI's:
# `python -m erasure export --format diffusers`).
EXPORTS = {"LoRA, diffusers/PEFT keys": "lora", "LoRA, kohya keys": "lora-kohya",
           "Edited weights (state dict)": "state-dict"}  # label -> export.EXPORT_FORMATS
# One Advanced-panel field per (method, parameter), in a fixed order shared by the page and the handlers.
PARAM_KEYS = [(name, param, spec) for name, method in sorted(erasure.METHODS.items())
              for param, spec in method.schema().items()]


@dataclass(frozen=True)
class EditAdded:
    """A session after an edit joined it: its entries, the edit's report and the path of its download."""
    session: list
    edit: Any
    report: str
    path: str | None


@dataclass(frozen=True)
class ComparisonResult:
    galleries: dict  # group -> [(image, caption)], rows prompt × seed, columns original | each edit
    columns: int
    side: int  # the images' width in pixels
    summary: list[dict]
    path: str
    status: str


class Studio:
    def __init__(self, pipe, scorer, limits: Limits = Limits(), notice: str = "", originals_folder=None,
                 downloads_folder=None):
        self.pipe, self.scorer, self.limits, self.notice = pipe, scorer, limits, notice
        self.model_id = pipeline_state(pipe).model_id
        self.profile = pipeline_state(pipe).profile
        # method -> parameter -> default on this model (the paper's, or the family's where those cannot apply)
        self.param_defaults = {name: method_defaults(pipe, name) for name in erasure.METHODS}
        self.edits = EditStore()
        self.originals = OriginalCache(max_images=512, folder=originals_folder)
        self.cancel_flags = CancelFlags()
        self.jobs = Jobs(slots=1)  # training and probe runs: one private copy of the denoiser at a time
        self.downloads = Downloads(downloads_folder)
        self.defaults = default_settings(pipe)  # 3 steps on random-weight models
        # The paper's probe protocol takes hours on a CPU; there the Probe tab starts on the quick one.
        on_cpu = next(iter(pipeline_state(pipe).parameters.values())).device.type == "cpu"
        self.probe_protocol = "quick" if on_cpu else "paper"
        # The side cap never refuses the model's own size (1024 on SDXL and FLUX, above the default cap).
        native_side = max(self.defaults.height, self.defaults.width)
        if native_side > limits.max_side:
            self.limits = dataclasses.replace(limits, max_side=native_side)

    @property
    def files(self) -> Path:
        return self.downloads.folder

    @property
    def remove_files(self):
        return self.downloads.remove

    # -- concepts and edits -----------------------------------------------------------------------------
    def preset_fields(self, name: str) -> list:
        """Targets, anchors and retain (as the text fields show them), kind, and every PARAM_KEYS value: the
        preset's, else this model's default."""
        preset = load_preset(name)
        params = [family_preset_params(self.pipe, method, preset.method_params(method)).get(
                      param, self.param_defaults[method][param]) for method, param, _ in PARAM_KEYS]
        return [", ".join(preset.targets), ", ".join(preset.anchors), "\n".join(preset.retain), preset.kind,
                *params]

    def erase_concepts(self, targets: str, anchors: str, retain: str, method: str, given: dict, session: list,
                       owner: str) -> EditAdded | str:
        """A closed form's edit joins the session at once; a trained method starts a background job (its label
        is returned) whose edit `finished_training` adds."""
        target_list, retain_list = split_concepts(targets), split_concepts(retain)
        anchor_list = split_concepts(anchors) or [""]
        self.limits.check_concepts(target_list, retain_list)
        spec = erasure.get_method(method)
        if not spec.trains:
            return self.add_edit(session, erasure.erase(self.pipe, method, target_list, anchor_list, retain_list,
                                                        **given), owner)
        # Everything a user can get wrong is checked now, not minutes later in the job.
        self.limits.check_training(spec.parse_params(given))
        check_erase_inputs(self.pipe, spec.name, target_list, anchor_list, retain_list, given)
        retain_list = retain_list if spec.uses_retain else []
        label = f"{spec.name.upper()}: {short(', '.join(target_list), 32)}"
        self.jobs.start(owner, label, lambda on_step, should_stop: erasure.erase(
            self.pipe, spec.name, target_list, anchor_list, retain_list, on_step=on_step, should_stop=should_stop,
            **given))
        return label

    def add_edit(self, session: list, edit, owner: str, uploaded: str | None = None) -> EditAdded:
        """Number and label the edit, keep the session's latest `max_edits`, and write its download (not for an
        upload: the user has that file)."""
        number = 1 + max((entry["number"] for entry in session), default=0)
        label = f"#{number} {edit.method.upper()}: {short(', '.join(edit.targets), 32)}"
        session = [*session, {"id": self.edits.add(edit, owner), "label": label, "number": number}]
        dropped = session[: max(0, len(session) - self.limits.max_edits)]
        self.edits.discard(entry["id"] for entry in dropped)
        report = edit_report(edit, uploaded)
        if dropped:
            report += (f"  \nThis session keeps its {self.limits.max_edits} latest edits; "
                       f"dropped {', '.join(entry['label'] for entry in dropped)}.")
        path = None if uploaded else str(edit.save(self.downloads.new_file(
            f"{edit.method}-{slug(edit.targets)}", ".safetensors")))
        return EditAdded(session[len(dropped):], edit, report, path)

    def upload(self, file: str, session: list, owner: str) -> EditAdded:
        edit = erasure.Edit.load(file)
        check_applicable(self.pipe, edit)
        return self.add_edit(session, edit, owner, uploaded=Path(file).name)

    def export_latest(self, session: list, form: str, rank) -> tuple[str, str]:
        """The session's latest edit as a LoRA (exact rank, or `rank` with its error) or as its edited weights:
        (path, what it is)."""
        if not session:
            raise ValueError("No edit to export yet: erase a concept or upload an edit first.")
        latest = max(session, key=lambda entry: entry["number"])
        if form not in EXPORTS:
            raise ValueError(f"unknown export {form!r}; choose from {list(EXPORTS)}")
        edit = self.edits.get(latest["id"])
        path = self.downloads.new_file(f"{edit.method}-{slug(edit.targets)}-{EXPORTS[form]}", ".safetensors")
        result = export(self.pipe, edit, path, EXPORTS[form], parse_rank(rank))
        if EXPORTS[form] == "state-dict":
            return str(path), (f"**{latest['label']}**: {len(edit.modules())} edited weights by the denoiser's "
                               f"parameter names, for `unet.load_state_dict(load_file(path), strict=False)`.")
        exact = "exact" if result["rank"] >= result["exact_rank"] else f"exact rank {result['exact_rank']}"
        return str(path), (f"**{latest['label']}**: LoRA of rank {result['rank']} ({exact}) over {result['layers']} "
                           f"layers; relative error ‖ΔW − BA‖/‖ΔW‖ = {result['relative_error']:.3g}. Load it with "
                           f"`pipe.load_lora_weights(path)`.")

    def forget(self, session: list) -> None:
        self.edits.discard(entry["id"] for entry in session)

    def close_session(self, owner: str) -> None:
        """Stop the session's generation and job, and free its edits now."""
        self.cancel_flags.cancel(owner)
        self.jobs.discard_session(owner)
        self.edits.discard_session(owner)

    def session_edits(self, session: list, labels: list[str]) -> dict:
        """label -> Edit for the picked labels, in their order; a label the session lacks is refused."""
        by_label = {entry["label"]: entry["id"] for entry in session}
        for label in labels:
            if label not in by_label:
                raise ValueError(f"edit {label!r} is not in this session; it holds {list(by_label) or 'no edits'}")
        return {label: self.edits.get(by_label[label]) for label in labels}

    # -- background jobs --------------------------------------------------------------------------------
    def finished_job(self, owner: str, kind: str):
        """(job, finished) of the session's job of `kind`: finished ones are taken (their result is the caller's);
        (None, False) when there is none, or another poll took it a moment ago."""
        job = self.jobs.get(owner)
        if job is None or job.kind != kind:
            return None, False
        if not job.finished:
            return job, False
        job = self.jobs.take(owner, kind=kind)
        return job, job is not None

    # -- probes -----------------------------------------------------------------------------------------
    def probe_prompts(self, picked: list[str] | None, kind: str, session: list) -> str:
        """The kind's prompt templates with the first picked edit's first target; empty when none is picked."""
        if not picked:
            return ""
        edit = self.session_edits(session, picked[:1])[picked[0]]
        return "\n".join(default_probe_prompts(edit, kind))

    def start_probe_run(self, picked: list[str] | None, names: list[str] | None, prompts: str, seeds: str, kind: str,
                        protocol: str, session: list, owner: str) -> None:
        """Check everything a user can get wrong now, then run the probes on each picked edit in the background
        (the session's one job, shared with training)."""
        if not session:
            raise ValueError("this session has no edits yet: erase a concept on the first tab, then probe it here")
        if not picked:
            raise ValueError("no edit picked: tick one or more of this session's edits to probe")
        if not names:
            raise ValueError("no probe picked: tick one or more probes")
        check_probe_names(names)
        get_protocol(protocol)
        edits = self.session_edits(session, picked)
        seed_list = parse_seeds(seeds)
        prompt_list = prompt_lines(prompts) or default_probe_prompts(next(iter(edits.values())), kind)
        self.limits.check_probes(len(prompt_list), len(seed_list))
        names = [name for name in PROBES if name in names]  # the table's column order, whatever the tick order
        work = functools.partial(self.probe_edits, edits, names, prompt_list, seed_list, kind, protocol)
        self.jobs.start(owner, f"probes of {short(', '.join(edits), 60)}", work, kind="probes")

    def probe_edits(self, edits: dict, names: list[str], prompts: list[str], seeds: list[int], kind: str,
                    protocol: str, on_step: OnStep, should_stop: ShouldStop) -> list[dict]:
        """The job's work: every probe on each edit in turn, progress counted over all of them."""
        results, total = [], len(edits) * len(names)
        for i, (label, edit) in enumerate(edits.items()):
            where = f"{label} (edit {i + 1} of {len(edits)})" if len(edits) > 1 else label

            def step(progress, before=i * len(names), where=where):
                on_step(dataclasses.replace(progress, done=before + progress.done, total=total, message=(
                    f"{where} · probe {progress.done} of {progress.total} ({progress.message})")))

            on_step(Progress(i * len(names), total, f"{where} · running probe 1 of {len(names)}"))
            judge = Judge(self.pipe, edit, kind, scorer=self.scorer)
            report, rendered = run_probes(self.pipe, edit, names, prompts, seeds, self.defaults, judge, kind,
                                          on_step=step, should_stop=should_stop, protocol=protocol)
            # A sheet per probe, not one per edit: all variants of every probe side by side are thousands of
            # pixels wide, too small to read at the page's width.
            results.append({"label": label, "params": edit.params, "report": report,
                            "sheets": [(probe_sheet([images]), f"{label} · {images.probe}") for images in rendered]})
        return results

    def probe_record(self, results: list[dict]) -> str:
        """The run's JSON download: model, settings and each edit's report."""
        path = self.downloads.new_file("probes", ".json")
        path.write_text(json.dumps({"model": self.model_id, "settings": dataclasses.asdict(self.defaults),
                                    "edits": [{"label": r["label"], "params": r["params"], **r["report"]}
                                              for r in results]}, indent=2), "utf-8")
        return str(path)

    # -- comparison -------------------------------------------------------------------------------------
    def compare(self, erase_prompts: str, keep_prompts: str, seeds: str, steps, guidance, size, scheduler: str,
                compared: list[str], kind: str, targets: str, session: list, on_step: OnStep | None = None,
                should_stop: ShouldStop | None = None) -> ComparisonResult:
        """Rows prompt × seed, columns original | each ticked edit, with CLIP scores; originals come from the
        cache. Raises `Cancelled` when `should_stop` turns true (the weights are restored)."""
        started = time.perf_counter()
        prompts = ComparisonPrompts(tuple(prompt_lines(erase_prompts)), tuple(prompt_lines(keep_prompts)))
        seed_list = parse_seeds(seeds)
        side = whole_number("size", size)
        settings = Settings(steps=whole_number("steps", steps), guidance=number("guidance", guidance),
                            height=side, width=side, scheduler=scheduler)
        # The app's caps first (the tighter bound, e.g. 50 steps), then the library's checks (>= 1 step, ...).
        self.limits.check_generation(len(prompts.erase) + len(prompts.keep), len(seed_list), settings)
        settings.check()
        edits = self.session_edits(session, compared or [])
        target_list = list(dict.fromkeys(t for e in edits.values() for t in e.targets)) or split_concepts(targets)
        comparison = run_comparison(self.pipe, self.scorer, prompts, seed_list, settings, edits, target_list, kind,
                                    self.originals, on_step=on_step, should_stop=should_stop)
        summary = summary_rows(comparison)
        path = self.downloads.new_file("run", ".json")
        path.write_text(json.dumps(run_record(self.pipe, comparison, self.scorer, summary), indent=2), "utf-8")
        rows = comparison.rows()
        galleries = {group: [(comparison.images[column][i],
                              caption(column, prompt, seed, comparison.prompt_scores[column].score[i],
                                      comparison.target_scores[column].score[i]))
                             for i, (row_group, prompt, seed) in enumerate(rows) if row_group == group
                             for column in comparison.images]
                     for group in GROUPS}
        status = (f"{len(rows)} rows x {len(comparison.images)} columns in {time.perf_counter() - started:.1f} s "
                  f"({comparison.originals_reused} original images reused from the cache). {self.scorer_note()}")
        return ComparisonResult(galleries, len(comparison.images), settings.width, summary, str(path), status)

    # -- words ------------------------------------------------------------------------------------------
    def scorer_note(self) -> str:
        note = f"CLIP: {self.scorer.backbone}; score = 100 × max(cos, 0)."
        if self.scorer.is_random:
            note += " Random-weight demo: the numbers show the mechanics, not image content."
        return note

    def banner(self) -> str:
        state = pipeline_state(self.pipe)
        device = next(iter(state.parameters.values())).device
        lines = [f"**Model** `{self.model_id}` on {device.type} · {self.scorer_note()}"]
        if self.profile.banner:
            lines.append(self.profile.banner)
        if self.notice:
            lines.append(f"⚠️ {self.notice}")
        return "  \n".join(lines)


def parse_rank(rank) -> int | None:
    """The export's rank field: 0 or empty = each layer's exact rank."""
    if rank in (None, "", 0):
        return None
    if isinstance(rank, bool) or not float(rank).is_integer() or rank < 0:
        raise ValueError(f"rank must be a whole number >= 1 (or 0 for the exact rank), got {rank!r}")
    return int(rank)


def whole_number(name: str, value: float | None) -> int:
    """A number field's value as an int; an empty field or a fraction is refused, not rounded."""
    if value is None:
        raise ValueError(f"{name} is empty; enter a whole number")
    if not float(value).is_integer():
        raise ValueError(f"{name} must be a whole number, got {value}")
    return int(value)


def number(name: str, value: float | None) -> float:
    """A number field's value as a float; an empty field is refused."""
    if value is None:
        raise ValueError(f"{name} is empty; enter a number")
    return float(value)


def slug(targets) -> str:
    return "".join(c if c.isalnum() else "-" for c in "-".join(targets))[:40].strip("-") or "edit"
