"""Erasure Studio: erase concepts from a Stable Diffusion model in seconds, then compare what the
original and each edit draw on the same seeds, with CLIP scores. A thin UI over the `erasure` package.

    python app.py                  # CompVis/stable-diffusion-v1-4 on a GPU; without one, the toy world
    python app.py --model toy      # the toy world: a small model trained here on shapes, offline, on a CPU
    python app.py --model tiny     # random weights (tests): only the mechanics
    python app.py --model stabilityai/stable-diffusion-xl-base-1.0   # SDXL (also SD-2.x, FLUX; tiny-sdxl offline)

Gradio's own GRADIO_SERVER_NAME / GRADIO_SERVER_PORT choose where it listens (default 127.0.0.1:7860).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import anyio
import gradio as gr
import pandas as pd
import torch
from gradio.utils import get_upload_folder

import erasure
from erasure.apply import check_applicable
from erasure.compare import (GROUPS, ORIGINAL, ComparisonPrompts, caption, parse_seeds, prompt_lines, run_comparison,
                             run_record, suggest_prompts, summary_rows)
from erasure.export import export
from erasure.generate import GenerationCancelled, OriginalCache, Settings, default_settings
from erasure.limits import MAX_TARGETS, Limits
from erasure.pipeline import concept_tokenizer, family_preset_params, method_defaults, pipeline_state
from erasure.presets import KINDS, load_preset, prompt_templates
from erasure.probes import (PROBE_TITLES, PROBES, Judge, check_probe_names, probe_sheet, recovery_table,
                            run_probes)
from erasure import scoring
from erasure.scoring import ScorerLoadError, load_clip_scorer
from erasure.sessions import CancelFlags, EditStore, Jobs
from erasure.text import split_concepts, validate_concepts
from erasure.tiny import RANDOM_MODELS
from erasure.toy import TOY_MODEL

try:  # Hugging Face ZeroGPU: a GPU is attached only while a decorated function runs
    import spaces

    on_gpu = spaces.GPU
except ImportError:
    def on_gpu(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

CSS = Path(__file__).resolve().parent / "assets" / "app.css"
FILE_LIFETIME_S = 3600  # downloads (edits, run records) are deleted after an hour
# What the app exports beside the native edit file (a baked multi-GB pipeline folder is the CLI's:
# `python -m erasure export --format diffusers`).
EXPORTS = {"LoRA, diffusers/PEFT keys": "lora", "LoRA, kohya keys": "lora-kohya",
           "Edited weights (state dict)": "state-dict"}  # label -> export.EXPORT_FORMATS


def parse_rank(rank) -> int | None:
    """The export's rank field: 0 or empty = each layer's exact rank."""
    if rank in (None, "", 0):
        return None
    if isinstance(rank, bool) or not float(rank).is_integer() or rank < 0:
        raise ValueError(f"rank must be a whole number >= 1 (or 0 for the exact rank), got {rank!r}")
    return int(rank)


@contextmanager
def user_errors():
    """The library's ValueErrors (bad concepts, parameters, files, caps) reach the user as their own sentence,
    and the server's console stays quiet: a user's mistake is not a bug, so no traceback is printed."""
    try:
        yield
    except ValueError as error:
        raise gr.Error(str(error), print_exception=False) from None


class Studio:
    """The resident pipeline and CLIP scorer shared by every session, and the event handlers over them.

    A session's gr.State is a list of {"id", "label"} of its edits; the tensors stay in `self.edits`.
    """

    def __init__(self, pipe, scorer, limits: Limits = Limits(), notice: str = "", originals_folder=None):
        self.pipe, self.scorer, self.limits, self.notice = pipe, scorer, limits, notice
        self.model_id = pipeline_state(pipe).model_id
        # method -> parameter -> default on this model (the paper's, or the family's where those cannot apply)
        self.param_defaults = {name: method_defaults(pipe, name) for name in erasure.METHODS}
        self.edits = EditStore()
        self.originals = OriginalCache(max_images=512, folder=originals_folder)
        self.cancel_flags = CancelFlags()
        self.jobs = Jobs(slots=1)  # training and probe runs: one private copy of the denoiser at a time
        self.demo: gr.Blocks | None = None  # set by build_demo
        # Downloads are written inside Gradio's cache folder, which Gradio serves in place: one copy per file
        # (a file anywhere else is copied into the cache when returned). The folder goes when the app does.
        os.makedirs(get_upload_folder(), exist_ok=True)
        self.files = Path(tempfile.mkdtemp(prefix="erasure-studio-", dir=get_upload_folder()))
        self.remove_files = weakref.finalize(self, shutil.rmtree, self.files, ignore_errors=True)
        self.defaults = default_settings(pipe)  # 3 steps on random-weight models
        # The side cap never refuses the model's own size (1024 on SDXL and FLUX, above the default cap).
        native_side = max(self.defaults.height, self.defaults.width)
        if native_side > limits.max_side:
            self.limits = dataclasses.replace(limits, max_side=native_side)

    # -- concepts ---------------------------------------------------------------------------------------
    def fill_from_preset(self, name: str):
        """Targets, anchors, retain, kind and every method parameter (the preset's, else the default)."""
        if not name:
            return [gr.skip()] * (4 + len(PARAM_KEYS))
        with user_errors():
            preset = load_preset(name)
        params = [family_preset_params(self.pipe, method, preset.method_params(method)).get(
                      param, self.param_defaults[method][param]) for method, param, _ in PARAM_KEYS]
        return [", ".join(preset.targets), ", ".join(preset.anchors), "\n".join(preset.retain), preset.kind,
                *params]

    def describe_method(self, method: str):
        spec = erasure.get_method(method)
        return [f"{spec.summary}  \n*{spec.paper}*",
                *[gr.update(visible=name == spec.name) for name in erasure.METHODS]]

    def suggest_prompts(self, kind: str, targets: str, retain: str):
        prompts = suggest_prompts(kind, split_concepts(targets), split_concepts(retain))
        return "\n".join(prompts.erase), "\n".join(prompts.keep)

    def erase(self, targets: str, anchors: str, retain: str, method: str, session: list,
              request: gr.Request | None = None, **params):
        """Compute an edit (the pipeline is only read) and add it to the session's comparison columns. A trained
        method starts a background job instead; `poll_job` adds its edit when it is done."""
        given = {name.removeprefix(f"{method}_"): value for name, value in params.items()
                 if name.startswith(f"{method}_")}
        target_list, retain_list = split_concepts(targets), split_concepts(retain)
        anchor_list = split_concepts(anchors) or [""]
        with user_errors():
            self.limits.check_concepts(target_list, retain_list)
            spec = erasure.get_method(method)
            if spec.trains:
                return self._start_job(spec, target_list, anchor_list, retain_list, given, _session_id(request))
            edit = erasure.erase(self.pipe, method, target_list, anchor_list, retain_list, **given)
        return (*self._add_edit(session, edit, _session_id(request)), gr.skip(), gr.skip(), gr.skip())

    def _add_edit(self, session: list, edit, owner: str):
        session, dropped = self._remember(session, edit, owner)
        path = edit.save(self._new_file(f"{edit.method}-{_slug(edit.targets)}", ".safetensors"))
        return session, self._edit_choices(session), self._report(edit, dropped), layer_table(edit), str(path)

    # -- training jobs ----------------------------------------------------------------------------------
    def _start_job(self, spec, targets, anchors, retain, given, owner: str):
        """Check everything a user can get wrong now (not minutes later in the job), then train in the background."""
        self.limits.check_training(spec.parse_params(given))
        validate_concepts(targets, anchors, retain, concept_tokenizer(self.pipe), MAX_TARGETS)
        retain = retain if spec.uses_retain else []
        label = f"{spec.name.upper()}: {_short(', '.join(targets), 32)}"
        self.jobs.start(owner, label, lambda on_step, should_stop: erasure.erase(
            self.pipe, spec.name, targets, anchors, retain, on_step=on_step, should_stop=should_stop, **given))
        return (gr.skip(), gr.skip(), f"Training **{label}** in the background; the edit appears here and as a "
                f"column when it is done. Generating goes on meanwhile.", gr.skip(), gr.skip(),
                f"**{label}**: starting...", gr.Timer(active=True), gr.Button(interactive=True))

    def poll_job(self, session: list, request: gr.Request):
        """The page's timer: the session's job progress; when it has finished, its edit joins the session."""
        owner = _session_id(request)
        job = self.jobs.get(owner)
        idle = (gr.Timer(active=False), gr.Button(interactive=False))
        if job is None or job.kind != "training":  # a probe run's result is for the Probe tab's poll
            return (*[gr.skip()] * 6, *idle)
        if not job.finished:
            return (*[gr.skip()] * 5, job_progress(job), gr.skip(), gr.skip())
        job = self.jobs.take(owner, kind="training")
        if job is None:  # another poll took it a moment ago
            return (*[gr.skip()] * 6, *idle)
        seconds = f"{(job.ended or time.monotonic()) - job.started:.0f} s"
        if job.state == "cancelled":
            return (*[gr.skip()] * 5, f"**{job.label}**: cancelled; nothing was kept.", *idle)
        if job.state == "failed":
            return (*[gr.skip()] * 5, f"**{job.label}**: failed: {job.error}", *idle)
        return (*self._add_edit(session, job.result, owner),
                f"**{job.label}**: done in {seconds} (final loss {job.loss:.4g}).", *idle)

    def cancel_job(self, request: gr.Request):
        if self.jobs.cancel(_session_id(request), kind="training"):
            return "Cancelling the training job after its current step..."
        return "No training job is running in this session."

    def upload_edit(self, file: str | None, session: list, request: gr.Request | None = None):
        if not file:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        with user_errors():
            edit = erasure.Edit.load(file)
            check_applicable(self.pipe, edit)
        session, dropped = self._remember(session, edit, _session_id(request))
        return session, self._edit_choices(session), self._report(edit, dropped, Path(file).name), layer_table(edit)

    def export_edit(self, session: list, form: str, rank, request: gr.Request | None = None):
        """The session's latest edit as a LoRA (exact rank, or `rank` with its error) or as its edited weights."""
        if not session:
            raise gr.Error("No edit to export yet: erase a concept or upload an edit first.", print_exception=False)
        latest = max(session, key=lambda entry: entry["number"])
        with user_errors():
            if form not in EXPORTS:
                raise ValueError(f"unknown export {form!r}; choose from {list(EXPORTS)}")
            edit = self.edits.get(latest["id"])
            path = self._new_file(f"{edit.method}-{_slug(edit.targets)}-{EXPORTS[form]}", ".safetensors")
            report = export(self.pipe, edit, path, EXPORTS[form], parse_rank(rank))
        if EXPORTS[form] == "state-dict":
            return str(path), (f"**{latest['label']}**: {len(edit.modules())} edited weights by the denoiser's "
                               f"parameter names, for `unet.load_state_dict(load_file(path), strict=False)`.")
        exact = "exact" if report["rank"] >= report["exact_rank"] else f"exact rank {report['exact_rank']}"
        return str(path), (f"**{latest['label']}**: LoRA of rank {report['rank']} ({exact}) over {report['layers']} "
                           f"layers; relative error ‖ΔW − BA‖/‖ΔW‖ = {report['relative_error']:.3g}. Load it with "
                           f"`pipe.load_lora_weights(path)`.")

    def clear_edits(self, session: list):
        self.edits.discard(entry["id"] for entry in session)
        return [], self._edit_choices([]), "No edits in this session."

    def end_session(self, request: gr.Request):
        """The browser tab closed (or a client disconnected): stop its generation, free its edits now rather
        than when Gradio expires its state an hour later."""
        self.cancel_flags.cancel(_session_id(request))
        self.jobs.discard_session(_session_id(request))
        self.edits.discard_session(_session_id(request))

    def _remember(self, session: list, edit, owner: str) -> tuple[list, list[str]]:
        number = 1 + max((entry["number"] for entry in session), default=0)
        label = f"#{number} {edit.method.upper()}: {_short(', '.join(edit.targets), 32)}"
        session = [*session, {"id": self.edits.add(edit, owner), "label": label,
                              "number": number}]
        dropped = session[: max(0, len(session) - self.limits.max_edits)]
        self.edits.discard(entry["id"] for entry in dropped)
        return session[len(dropped):], [entry["label"] for entry in dropped]

    def edit_failed(self, session: list):
        """After a failed erase or upload: say so, and which edits the session still holds."""
        held = ", ".join(entry["label"] for entry in session) or "no edits"
        return (gr.skip(), f"**Failed**: the reason is in the error notice. This session holds {held}.",
                layer_table(), "")

    @staticmethod
    def _edit_choices(session: list):
        labels = [entry["label"] for entry in session]
        return gr.CheckboxGroup(choices=labels, value=labels)

    def _report(self, edit, dropped: list[str], uploaded: str | None = None) -> str:
        report = edit_report(edit, uploaded)
        if dropped:
            report += (f"  \nThis session keeps its {self.limits.max_edits} latest edits; "
                       f"dropped {', '.join(dropped)}.")
        return report

    # -- probes -----------------------------------------------------------------------------------------
    def probe_edit_choices(self, session: list, picked: list[str] | None):
        """The Probe tab's edits follow the session's: picks that still exist stay picked; with none left, the
        newest edit is picked (a run over every edit could take minutes)."""
        labels = [entry["label"] for entry in session]
        kept = [label for label in picked or [] if label in labels]
        return gr.CheckboxGroup(choices=labels, value=kept or labels[-1:])

    def suggest_probe_prompts(self, picked: list[str] | None, kind: str, session: list) -> str:
        """The kind's prompt templates with the first picked edit's first target; empty when none is picked."""
        if not picked:
            return ""
        with user_errors():
            edit = self._session_edits(session, picked[:1])[picked[0]]
            return "\n".join(default_probe_prompts(edit, kind))

    def start_probes(self, picked: list[str] | None, names: list[str] | None, prompts: str, seeds: str, kind: str,
                     session: list, request: gr.Request | None = None):
        """Check everything a user can get wrong now, then run the probes on each picked edit in the background
        (the session's one job, shared with training); `poll_probes` shows the results when they are done."""
        with user_errors():
            if not session:
                raise ValueError("this session has no edits yet: erase a concept on the first tab, then probe it here")
            if not picked:
                raise ValueError("no edit picked: tick one or more of this session's edits to probe")
            if not names:
                raise ValueError("no probe picked: tick one or more probes")
            check_probe_names(names)
            edits = self._session_edits(session, picked)
            seed_list = parse_seeds(seeds)
            prompt_list = prompt_lines(prompts) or default_probe_prompts(next(iter(edits.values())), kind)
            self.limits.check_probes(len(prompt_list), len(seed_list))
            names = [name for name in PROBES if name in names]  # the table's column order, whatever the tick order
            work = functools.partial(self._probe_edits, edits, names, prompt_list, seed_list, kind)
            self.jobs.start(_session_id(request), f"probes of {_short(', '.join(edits), 60)}", work, kind="probes")
        return "**Probes**: starting...", gr.Timer(active=True), gr.Button(interactive=True)

    def _probe_edits(self, edits: dict, names: list[str], prompts: list[str], seeds: list[int], kind: str,
                     on_step, should_stop) -> list[dict]:
        """The job's work: every probe on each edit in turn, progress counted over all of them."""
        results, total = [], len(edits) * len(names)
        for i, (label, edit) in enumerate(edits.items()):
            where = f"{label} (edit {i + 1} of {len(edits)})" if len(edits) > 1 else label

            def step(done, count, message, before=i * len(names), where=where):
                on_step(before + done, total, message=f"{where} · probe {done} of {count} ({message})")

            on_step(i * len(names), total, message=f"{where} · running probe 1 of {len(names)}")
            judge = Judge(self.pipe, edit, kind, scorer=self.scorer)
            report, rendered = run_probes(self.pipe, edit, names, prompts, seeds, self.defaults, judge, kind,
                                          on_step=step, should_stop=should_stop)
            # A sheet per probe, not one per edit: all variants of every probe side by side are thousands of
            # pixels wide, too small to read at the page's width.
            results.append({"label": label, "params": edit.params, "report": report,
                            "sheets": [(probe_sheet([images]), f"{label} · {images.probe}") for images in rendered]})
        return results

    def poll_probes(self, request: gr.Request):
        """The Probe tab's timer: the run's progress; when it has finished, its table, sheets, note and file."""
        owner = _session_id(request)
        job = self.jobs.get(owner)
        idle = (gr.Timer(active=False), gr.Button(interactive=False))
        unchanged = [gr.skip()] * 4
        if job is None or job.kind != "probes":
            return (gr.skip(), *idle, *unchanged)
        if not job.finished:
            return (job_progress(job), gr.skip(), gr.skip(), *unchanged)
        job = self.jobs.take(owner, kind="probes")
        if job is None:  # another poll took it a moment ago
            return (gr.skip(), *idle, *unchanged)
        if job.state == "cancelled":
            return ("**Probes**: cancelled; nothing was kept.", *idle, *unchanged)
        if job.state == "failed":
            return (f"**Probes**: failed: {job.error}", *idle, *unchanged)
        results = job.result
        path = self._new_file("probes", ".json")
        path.write_text(json.dumps({"model": self.model_id, "settings": dataclasses.asdict(self.defaults),
                                    "edits": [{"label": r["label"], "params": r["params"], **r["report"]}
                                              for r in results]}, indent=2), "utf-8")
        sheets = [sheet for r in results for sheet in r["sheets"]]
        status = (f"**Probes**: done in {(job.ended or time.monotonic()) - job.started:.0f} s "
                  f"({len(results)} edit(s) × {len(results[0]['report']['probes'])} probe(s)).")
        return (status, *idle, probe_table_view(results), gr.Gallery(value=sheets or None),
                probe_note(results, self.defaults), str(path))

    def cancel_probes(self, request: gr.Request):
        if self.jobs.cancel(_session_id(request), kind="probes"):
            return "Cancelling the probes after the current one..."
        return "No probe run is in progress in this session."

    def probes_refused(self, request: gr.Request):
        """After a refused start: say so; a run already going on keeps its timer and Cancel button."""
        job = self.jobs.get(_session_id(request))
        running = job is not None and job.kind == "probes" and not job.finished
        note = " The probes already running go on." if running else ""
        return (f"**Not started**: the reason is in the error notice.{note}", gr.Timer(active=running),
                gr.Button(interactive=running))

    @staticmethod
    def clear_probe_results():
        """A new run's results replace the last ones; until they come, none are shown as if they were its."""
        return probe_table_view([]), gr.Gallery(value=None), "", None

    # -- comparison -------------------------------------------------------------------------------------
    async def generate(self, erase_prompts: str, keep_prompts: str, seeds: str, steps: float, guidance: float,
                       size: float, scheduler: str, compared: list[str], kind: str, targets: str, session: list,
                       request: gr.Request, progress=gr.Progress()):
        """Rows prompt x seed, columns original | each ticked edit; originals come from the cache.

        The work runs in a thread this coroutine can abandon: when Gradio cancels the event (a client's
        `job.cancel()`), the cancellation reaches us at once and the session's flag stops the denoising
        loop at its next step, instead of the server generating on with the lock held."""
        flag = self.cancel_flags.start(_session_id(request))
        work = functools.partial(on_gpu(duration=180)(self._generate), erase_prompts, keep_prompts, seeds, steps,
                                 guidance, size, scheduler, compared, kind, targets, session, flag, progress)
        try:
            return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            flag.set()
            raise
        finally:
            self.cancel_flags.finish(_session_id(request), flag)

    def _generate(self, erase_prompts, keep_prompts, seeds, steps, guidance, size, scheduler, compared, kind,
                  targets, session, flag, progress):
        started = time.perf_counter()
        with user_errors():
            prompts = ComparisonPrompts(tuple(prompt_lines(erase_prompts)), tuple(prompt_lines(keep_prompts)))
            seed_list = parse_seeds(seeds)
            side = whole_number("size", size)
            settings = Settings(steps=whole_number("steps", steps), guidance=number("guidance", guidance),
                                height=side, width=side, scheduler=scheduler)
            # The app's caps first (the tighter bound, e.g. 50 steps), then the library's checks (>= 1 step, ...).
            self.limits.check_generation(len(prompts.erase) + len(prompts.keep), len(seed_list), settings)
            settings.check()
            edits = self._session_edits(session, compared or [])
            target_list = list(dict.fromkeys(t for e in edits.values() for t in e.targets))
            target_list = target_list or split_concepts(targets)
            try:
                comparison = run_comparison(
                    self.pipe, self.scorer, prompts, seed_list, settings, edits, target_list, kind, self.originals,
                    on_step=lambda column, done, total: progress((done, total), desc=f"{column}: denoising"),
                    should_stop=flag.is_set)
            except GenerationCancelled:
                return (*[gr.skip()] * 5, "Generation cancelled; the model's weights are restored.")
        summary = summary_rows(comparison)
        record = run_record(self.pipe, comparison, self.scorer, summary)
        path = self._new_file("run", ".json")
        path.write_text(json.dumps(record, indent=2), "utf-8")
        rows = comparison.rows()
        galleries = []
        for group in GROUPS:
            items = [(comparison.images[column][i],
                      caption(column, prompt, seed, comparison.prompt_scores[column].score[i],
                              comparison.target_scores[column].score[i]))
                     for i, (row_group, prompt, seed) in enumerate(rows) if row_group == group
                     for column in comparison.images]
            galleries.append(gr.Gallery(value=items, columns=len(comparison.images),
                                        elem_classes=gallery_classes(settings.width)))
        status = (f"{len(rows)} rows x {len(comparison.images)} columns in {time.perf_counter() - started:.1f} s "
                  f"({comparison.originals_reused} original images reused from the cache). "
                  f"{self._scorer_note()}")
        return (*galleries, summary_table(summary), summary_plot(summary), str(path), status)

    @staticmethod
    def generation_failed():
        """After a failed generation: empty outputs, so nothing on the page reads as this request's result,
        and Cancel greyed out (Gradio runs no .then() after a failure, only .failure())."""
        return (*[gr.Gallery(value=None, elem_classes=[]) for _ in GROUPS], summary_table([]), summary_plot([]),
                None, "**Generation failed**: the reason is in the error notice. Earlier results were cleared.",
                gr.Button(interactive=False))

    async def cancel(self, request: gr.Request):
        """Stop this session's running generation at its next step, or take its waiting ones off the queue."""
        if self.cancel_flags.cancel(_session_id(request)):
            return "Cancelling after the current denoising step..."
        removed = await remove_queued_events(self.demo, _session_id(request), "generate") if self.demo else 0
        if removed:
            return f"Removed {removed} waiting generation(s) from the queue; nothing had started."
        return "Nothing is running in this session."

    def _session_edits(self, session: list, compared: list[str]) -> dict:
        by_label = {entry["label"]: entry["id"] for entry in session}
        for label in compared:
            if label not in by_label:
                raise ValueError(f"edit {label!r} is not in this session; it holds {list(by_label) or 'no edits'}")
        return {label: self.edits.get(by_label[label]) for label in compared}

    def _scorer_note(self) -> str:
        note = f"CLIP: {self.scorer.backbone}; score = 100 × max(cos, 0)."
        if self.scorer.is_random:
            note += " Random-weight demo: the numbers show the mechanics, not image content."
        return note

    def _new_file(self, stem: str, suffix: str) -> Path:
        now = time.time()
        for old in self.files.iterdir():
            try:  # another session's save may rename its temporary file away between listing and stat
                expired = now - old.stat().st_mtime > FILE_LIFETIME_S
            except FileNotFoundError:
                continue
            if expired:
                old.unlink(missing_ok=True)
        return self.files / f"{stem}-{secrets.token_hex(4)}{suffix}"

    def banner(self) -> str:
        state = pipeline_state(self.pipe)
        device = next(iter(state.parameters.values())).device
        lines = [f"**Model** `{self.model_id}` on {device.type} · {self._scorer_note()}"]
        if self.model_id == TOY_MODEL:
            lines.append("This is the **toy world**: a small model trained in this project on rendered 32×32 shapes, "
                         "colours and styles, with a CLIP trained on its captions. Try a *toy-* preset: erased shapes "
                         "visibly disappear. Start with `--model CompVis/stable-diffusion-v1-4` on a GPU for "
                         "real images.")
        if self.model_id in RANDOM_MODELS:
            lines.append("This is the offline **random-weight** model: images are noise-like and only show that "
                         "edits, seeds and scores work. Start with `--model CompVis/stable-diffusion-v1-4` for "
                         "real images.")
        if self.notice:
            lines.append(f"⚠️ {self.notice}")
        return "  \n".join(lines)


# One Advanced-panel component per (method, parameter), in a fixed order shared by layout and handlers.
PARAM_KEYS = [(name, param, spec) for name, method in sorted(erasure.METHODS.items())
              for param, spec in method.schema().items()]


def param_component(method: str, name: str, spec: dict, default):
    """The Advanced panel's field for one parameter, showing `default` (the paper's, or the model family's)."""
    common = dict(label=name, info=spec["help"], elem_id=f"{method}-{name}")
    if spec["type"] == "bool":
        return gr.Checkbox(value=default, **common)
    if "choices" in spec:
        return gr.Dropdown(spec["choices"], value=default, **common)
    if spec["type"] in ("int", "float"):
        return gr.Number(value=default, precision=0 if spec["type"] == "int" else None, **common)
    return gr.Textbox(value=str(default), **common)


def job_progress(job) -> str:
    if job.state == "waiting":
        return f"**{job.label}**: waiting for another session's background job to finish..."
    seconds = f"{time.monotonic() - job.started:.0f} s"
    if job.kind == "probes":
        return f"**Probes**: {job.message or 'starting...'} · {seconds}"
    loss = f" · loss {job.loss:.4g}" if job.done else ""
    return f"**{job.label}**: step {job.done} of {job.total or '?'}{loss} · {seconds}"


def default_probe_prompts(edit, kind: str) -> list[str]:
    """What an empty prompt box probes with: the kind's interactive templates with the edit's first target (as
    `python -m erasure probe` does)."""
    return [form.format(edit.targets[0]) for form in prompt_templates(kind)]


def probe_table(results: list[dict]) -> pd.DataFrame:
    """Edits × probes: each cell the share of the probe's images that show the target. Rows are named by the
    session's labels (two edits of one method and target stay apart); with no results, every probe's column."""
    rows = [{**row, "edit": result["label"]}
            for result, row in zip(results, recovery_table([r["report"] for r in results]))]
    columns = ["edit", *(rows[0] if rows else (PROBE_TITLES.get(name, name) for name in PROBES))]
    return pd.DataFrame(rows, columns=list(dict.fromkeys(columns)))


def probe_column_widths(table: pd.DataFrame) -> list[str]:
    """Probe columns share the width equally, so that nine or more fit the page (their cells wrap) instead of the
    widest text pushing the last ones out of sight."""
    probes = max(1, len(table.columns) - 1)
    return ["12%", *[f"{88 / probes:.2f}%"] * probes]


def probe_table_view(results: list[dict]) -> gr.Dataframe:
    """An update of the page's table: the rows and their column widths (an update made outside the layout)."""
    table = probe_table(results)
    return gr.Dataframe(table, column_widths=probe_column_widths(table))


def own_samplers(report: dict, settings: Settings) -> str:
    """' (noise-based: ddim (η, v))' for the probes that sample their own way; '' when none does."""
    own = [f"{PROBE_TITLES.get(name, name)}: {result['settings']['scheduler']}"
           for name, result in report["probes"].items()
           if result.get("settings", {}).get("scheduler", settings.scheduler) != settings.scheduler]
    return f" ({'; '.join(own)})" if own else ""


def probe_note(results: list[dict], settings: Settings) -> str:
    """What the table's numbers rest on: the judge, N per probe, prompts, seeds and sampler settings, and the
    diagnostic's verdicts in full."""
    first = results[0]["report"]
    judges = "; ".join(dict.fromkeys(r["report"]["judge"] for r in results))
    by_n: dict[int, list[str]] = {}
    for name, result in first["probes"].items():
        if "N" in result:
            by_n.setdefault(result["N"], []).append(PROBE_TITLES.get(name, name))
    ns = "; ".join(f"{', '.join(titles)}: N = {n}" for n, titles in sorted(by_n.items()))
    seeds = first["seeds"]
    lines = [f"**Judge**: {judges}. A cell is the share of the probe's images in which the judge finds the target; "
             f"best of N counts a (prompt, seed) as recovered when any of its N images shows it ({ns})." if ns
             else f"**Judge**: {judges}.",
             f"{len(first['prompts'])} prompt(s) × {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); "
             f"{settings.steps} steps, guidance {settings.guidance:g}, {settings.width} px, {settings.scheduler} "
             f"sampler{own_samplers(first, settings)}."]
    for result in results:
        verdict = result["report"]["probes"].get("diagnostic", {}).get("verdict")
        if verdict:
            lines.append(f"Avoidance vs destruction, {result['label']}: {verdict}.")
    return "  \n".join(lines)


def edit_report(edit, uploaded: str | None = None) -> str:
    stats = edit.stats
    source = f"Loaded `{uploaded}`: " if uploaded else ""
    anchors = ", ".join(repr(a) if a else "the empty prompt" for a in dict.fromkeys(edit.anchors))
    lines = [f"{source}**{edit.method.upper()}** maps {_short(', '.join(edit.targets), 80)} → {anchors}, "
             f"keeping {len(edit.retain)} retain concept(s); "
             f"{len(edit.modules())} modules changed."]
    if "solve_seconds" in stats and "encode_seconds" in stats:
        lines.append(f"Computed in **{stats['encode_seconds'] + stats['solve_seconds']:.2f} s** "
                     f"({stats['encode_seconds']:.2f} s text encoding + {stats['solve_seconds']:.2f} s solve).")
    if "train_seconds" in stats:
        lines.append(f"Trained in **{stats['train_seconds']:.1f} s**; loss {stats['loss_first']:.4g} → "
                     f"{stats['loss_last']:.4g} (means of the first and last steps).")
    if "sparsity" in stats:
        lines.append(f"Masks: **{stats['units_off']} of {stats['units']} units off** (sparsity "
                     f"{stats['sparsity']:.2%}); erasure loss {stats['concept_loss_all_on']:.4g} with every unit "
                     f"on → {stats['concept_loss']:.4g}; retain error {stats['retain_relative_error']:.2%} of the "
                     f"retain latents' mean square.")
    return "  \n".join(lines)


LAYER_COLUMNS = ["layer", "relative change", "target residual", "retain drift"]
SUMMARY_COLUMNS = ["prompts", "column", "n", "CLIP to prompt", "95% CI", "Δ vs original", "CLIP to target"]
UNET_ATTENTION = re.compile(r"(down|mid|up)_blocks?\.(?:(\d+)\.)?attentions\.(\d+)\.transformer_blocks\.(\d+)\.(.+)")


def short_layer_name(module: str) -> str:
    """'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v' -> 'down 1.0 · attn2.to_v' (block, attention
    and, when not the first, transformer index); any other module path is kept whole."""
    match = UNET_ATTENTION.fullmatch(module)
    if not match:
        return module
    side, block, attention, transformer, rest = match.groups()
    where = f"{side} {block}.{attention}" if block is not None else f"{side} {attention}"
    if transformer != "0":
        where += f" block {transformer}"
    return f"{where} · {rest}"


def layer_table(edit=None) -> pd.DataFrame:
    """One row per edited module: its short name and its statistics to 3 significant digits."""
    layers = edit.stats.get("layers", {}) if edit is not None else {}
    names = [short_layer_name(module) for module in layers]
    if len(set(names)) < len(names):  # a model whose short names collide: show the full paths
        names = list(layers)
    rows = [[name, *(float(f"{s.get(key, float('nan')):.3g}") for key in
                     ("relative_change", "target_residual", "retain_drift"))]
            for name, s in zip(names, layers.values())]
    return pd.DataFrame(rows, columns=LAYER_COLUMNS)


def summary_table(summary: list[dict]) -> pd.DataFrame:
    rows = [[r["group"], r["column"], r["n"], round(r["mean"], 2), f"{r['ci_low']:.2f}–{r['ci_high']:.2f}",
             round(r["change"], 2), round(r["target_mean"], 2)] for r in summary]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def summary_plot(summary: list[dict]) -> gr.BarPlot:
    """One bar per (prompt group, column), labelled short enough to read level ('erase: #1'); the colour
    legend names each column in full. Original is grey, as in the evaluation charts."""
    group_key = {title: key for key, title in GROUPS.items()}
    bars = pd.DataFrame([{"bar": f"{group_key[r['group']]}: {r['column'].split(' ')[0]}",
                          "column": r["column"], "mean CLIP to prompt": r["mean"]} for r in summary],
                        columns=["bar", "column", "mean CLIP to prompt"])
    edits = [c for c in dict.fromkeys(bars["column"]) if c != ORIGINAL]
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    colors = {ORIGINAL: "#9e9e9e", **{c: palette[i % len(palette)] for i, c in enumerate(edits)}}
    top = axis_end(bars["mean CLIP to prompt"].max() if len(bars) else 0.0)
    return gr.BarPlot(bars, sort=list(bars["bar"]), color_map=colors, y_lim=[0, top])  # table order, not A-Z


def axis_end(value: float) -> float:
    """The smallest round number (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 × 10^k) >= `value`: bars start at 0 and
    the axis ends on a tick."""
    if not value > 0:
        return 1.0
    scale = 10.0 ** math.floor(math.log10(value))
    return next(m * scale for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * scale >= value * (1 - 1e-12))


async def remove_queued_events(demo: gr.Blocks, session: str, api_name: str) -> int:
    """Take a session's not-yet-started events of one endpoint off Gradio's queue, and end each one's wait
    with a "cancelled" error, as Gradio's own /cancel does for a client's job. Gradio has no public call for
    this, so it reads the queue of the pinned version (6.31) directly."""
    from gradio.server_messages import ProcessCompletedMessage
    from gradio.utils import error_payload

    queue = demo._queue
    removed = 0
    for event_id in list(queue.pending_event_ids_session.get(session, ())):
        event = queue.event_ids_to_events.get(event_id)
        if event is None or getattr(event.fn, "api_name", None) != api_name:
            continue
        waiting = queue.event_queue_per_concurrency_id[event.concurrency_id].queue
        if event not in waiting:
            continue  # already started: the cancel flag stops it
        await queue.remove_from_queue(event_id)
        queue.pending_event_ids_session[session].discard(event_id)
        error = gr.Error("Generation cancelled before it started.", print_exception=False)
        queue.send_message(event, ProcessCompletedMessage(output=error_payload(error, True), title="Cancelled",
                                                          success=False))
        removed += 1
    return removed


def cancel_state(running: bool):
    """An event handler that makes the Cancel button live (`running`) or greyed out."""
    def cancel_button():
        return gr.Button(interactive=running)
    return cancel_button


def gallery_classes(side: int) -> list[str]:
    """Images under 256 px are drawn 256 px wide with crisp pixels (4x for 64 px), not blurred to the cell."""
    return ["small-images"] if side < 256 else []


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


def _session_id(request: gr.Request | None) -> str:
    """Gradio's session hash ("" when a handler is called directly, outside a request)."""
    return getattr(request, "session_hash", None) or ""


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _slug(targets) -> str:
    return "".join(c if c.isalnum() else "-" for c in "-".join(targets))[:40].strip("-") or "edit"


def build_demo(studio: Studio, gpu_concurrency: int = 1) -> gr.Blocks:
    """The Blocks app: layout, then wiring. GPU work (erase, upload checks, generate) shares one queue
    lane of `gpu_concurrency`; UI-only events skip the queue."""
    defaults, limits = studio.defaults, studio.limits
    first_method = "speed" if "speed" in erasure.METHODS else sorted(erasure.METHODS)[0]

    with gr.Blocks(title="Erasure Studio", delete_cache=(FILE_LIFETIME_S, FILE_LIFETIME_S)) as demo:
        session = gr.State([], delete_callback=lambda entries: studio.edits.discard(e["id"] for e in entries))
        gr.Markdown("# Erasure Studio\nErase concepts from a diffusion model in closed form, then compare the "
                    "original and each edit **on the same seeds**.", elem_id="title")
        gr.Markdown(studio.banner(), elem_id="banner")
        with gr.Tabs():
            with gr.Tab("Erase & compare", id="erase-tab"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=340):
                        gr.Markdown("### 1 · Concepts")
                        with gr.Row():
                            preset = gr.Dropdown(["", *erasure.presets(studio.model_id)], value="", label="Preset",
                                                 scale=2, elem_id="preset",
                                                 allow_custom_value=True)  # an unknown name gets our message
                            kind = gr.Dropdown(list(KINDS), label="Kind (picks prompt templates)", scale=2,
                                               value="toy-shape" if studio.model_id == TOY_MODEL else "object")
                        targets = gr.Textbox(label="Target: concepts to erase", placeholder="e.g. Snoopy, Mickey",
                                             info="comma-separated on one line, or one per line", elem_id="targets")
                        anchors = gr.Textbox(label="Anchor: what targets become",
                                             placeholder="empty = the empty prompt",
                                             info="one for all targets, or one per target", elem_id="anchors")
                        retain = gr.Textbox(label="Retain: concepts to keep", lines=3, max_lines=8,
                                            info="comma-separated on one line, or one per line (names may hold commas)",
                                            placeholder="e.g. Pikachu, Garfield", elem_id="retain")
                        method = gr.Dropdown(sorted(erasure.METHODS), value=first_method, label="Method",
                                             elem_id="method")
                        # Described at build time, not on page load: a load event answering after the user's
                        # first choice put SPEED's summary under UCE.
                        method_summary = gr.Markdown(studio.describe_method(first_method)[0],
                                                     elem_classes="method-summary", elem_id="method-summary")
                        param_inputs, method_groups = {}, {}
                        with gr.Accordion("Advanced: method parameters (defaults = the paper's)", open=False):
                            for name in sorted(erasure.METHODS):
                                with gr.Group(visible=name == first_method) as method_groups[name]:
                                    for method_name, param, spec in PARAM_KEYS:
                                        if method_name == name:
                                            param_inputs[f"{name}_{param}"] = param_component(
                                                name, param, spec, studio.param_defaults[name][param])
                        erase_button = gr.Button("Erase", variant="primary", elem_id="erase")
                        with gr.Row(equal_height=True):
                            job_status = gr.Markdown(elem_id="job-status")
                            job_cancel = gr.Button("Cancel training", size="sm", interactive=False,
                                                   elem_id="cancel-training", scale=0, min_width=140)
                        job_timer = gr.Timer(1.0, active=False)
                        edit_summary = gr.Markdown(elem_id="edit-report")
                        with gr.Accordion("Per-layer statistics", open=False, elem_id="layers-accordion"):
                            layers = gr.Dataframe(layer_table(), label="Means over concept rows; 'down 1.0' is "
                                                  "down_blocks.1.attentions.0", interactive=False, wrap=True,
                                                  elem_id="layers", column_widths=["40%", "20%", "20%", "20%"])
                        edit_file = gr.File(label="Download the edit (.safetensors)", interactive=False)
                        with gr.Accordion("Export the latest edit (LoRA, edited weights)", open=False,
                                          elem_id="export-accordion"):
                            with gr.Row(equal_height=True):
                                export_form = gr.Dropdown(list(EXPORTS), value=next(iter(EXPORTS)), label="Format",
                                                          elem_id="export-format", scale=3)
                                export_rank = gr.Number(0, label="LoRA rank", info="0 = exact", precision=0,
                                                        minimum=0, elem_id="export-rank", scale=1, min_width=90)
                            export_button = gr.Button("Export", size="sm", elem_id="export")
                            export_note = gr.Markdown(elem_id="export-note")
                            export_file = gr.File(label="Exported file", interactive=False, elem_id="export-file")
                        upload = gr.File(label="Upload an edit (.safetensors)", file_types=[".safetensors"],
                                         elem_id="upload")

                    with gr.Column(scale=2):
                        gr.Markdown("### 2 · Compare on the same seeds")
                        with gr.Row():
                            erase_prompts = gr.Textbox(label="Prompts that should be erased (one per line)", lines=3,
                                                       elem_id="erase-prompts")
                            keep_prompts = gr.Textbox(label="Prompts that should be kept (one per line)", lines=3,
                                                      elem_id="keep-prompts")
                        with gr.Row():
                            seeds = gr.Textbox(value="0, 1", label="Seeds", info="whole numbers", elem_id="seeds",
                                               min_width=90)
                            # Number fields, not sliders: a slider clamps a typed 0 or 10000 without a word; these
                            # values reach the server, whose checks name the valid range.
                            steps = gr.Number(defaults.steps, label="Steps", info=f"1 to {limits.max_steps}",
                                              elem_id="steps", min_width=90)
                            guidance = gr.Number(defaults.guidance, label="Guidance", info="0 = no guidance", step=0.5,
                                                 elem_id="guidance", min_width=90)
                            size = gr.Number(defaults.height, label="Size (px)", info=f"8 to {limits.max_side}, ×8",
                                             step=64, elem_id="size", min_width=90)
                            scheduler = gr.Dropdown(list(pipeline_state(studio.pipe).family.schedulers),
                                                    value=defaults.scheduler, label="Scheduler",
                                                    info="denoising sampler", elem_id="scheduler", min_width=100)
                        with gr.Row(equal_height=True):
                            compared = gr.CheckboxGroup([], label="Edits to compare (columns beside the original)",
                                                        elem_id="compared", scale=5)
                            clear_button = gr.Button("Forget edits", size="sm", scale=1, min_width=100)
                        with gr.Row():
                            generate_button = gr.Button("Generate", variant="primary", elem_id="generate", scale=4)
                            cancel_button = gr.Button("Cancel", variant="secondary", interactive=False,
                                                      elem_id="cancel", scale=1, min_width=100)
                        status = gr.Markdown(elem_id="status")
                        galleries = [gr.Gallery(label=f"Prompts that {title}", columns=2, height="auto", format="png",
                                                object_fit="contain", elem_id=f"{group}-gallery",
                                                buttons=["download", "fullscreen"])
                                     for group, title in GROUPS.items()]
                        summary = gr.Dataframe(summary_table([]), label="Summary: mean CLIP score (95% bootstrap CI)",
                                               interactive=False, elem_id="summary", wrap=True,
                                               column_widths=["16%", "22%", "5%", "13%", "17%", "13%", "14%"])
                        # No block label: Gradio sizes the chart to `height` and would push its legend out under one.
                        plot = gr.BarPlot(x="bar", y="mean CLIP to prompt", color="column", label="Mean CLIP to prompt",
                                          show_label=False, x_title="prompts: column", color_title="column", height=280,
                                          elem_id="plot")
                        run_file = gr.File(label="Run record (JSON: method, params, prompts, seeds, scores, versions)",
                                           interactive=False, elem_id="run-file")
            with gr.Tab("Probe", id="probe-tab", elem_id="probe-tab"):
                gr.Markdown("### Is the concept really gone?\nEach probe renders the target with an edited model "
                            "under some pressure (the original model's first denoising steps, a noisier sampler, "
                            "an image to repaint, ...) and a judge counts the images that show it "
                            "(*When Are Concepts Erased From Diffusion Models?*, NeurIPS 2025). Probing takes "
                            "minutes; it runs in the background.", elem_classes="method-summary")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=300):
                        probe_edits = gr.CheckboxGroup([], label="Edits to probe", elem_id="probe-edits",
                                                       info="this session's edits, from the first tab")
                        probe_names = gr.CheckboxGroup([(PROBE_TITLES.get(name, name), name) for name in PROBES],
                                                       value=list(PROBES), label="Probes", elem_id="probe-names")
                    with gr.Column(scale=1, min_width=300):
                        probe_prompts = gr.Textbox(label="Prompts of the target (one per line)", lines=3,
                                                   info="empty = the kind's templates with the first edit's target",
                                                   elem_id="probe-prompts")
                        probe_seeds = gr.Textbox(value="0, 1", label="Seeds", elem_id="probe-seeds",
                                                 info=f"whole numbers; at most {limits.max_probe_seeds} seeds and "
                                                      f"{limits.max_probe_prompts} prompts")
                        gr.Markdown(f"Sampling: the model's defaults ({defaults.steps} steps, guidance "
                                    f"{defaults.guidance:g}, {defaults.width} px, {defaults.scheduler}).",
                                    elem_classes="method-summary")
                with gr.Row():
                    probe_button = gr.Button("Run probes", variant="primary", elem_id="run-probes", scale=4)
                    probe_cancel = gr.Button("Cancel probes", interactive=False, elem_id="cancel-probes", scale=1,
                                             min_width=140)
                probe_timer = gr.Timer(1.0, active=False)
                probe_status = gr.Markdown(elem_id="probe-status")
                recovery = gr.Dataframe(probe_table([]), column_widths=probe_column_widths(probe_table([])),
                                        label="Per edit and probe: the share of its images that show the target "
                                              "(or, for a probe that counts no images, what it found)",
                                        interactive=False, wrap=True, elem_id="probe-table")
                recovery_note = gr.Markdown(elem_id="probe-note")
                probe_sheets = gr.Gallery(label="Image sheets: per edit and probe, a row per prompt and seed, a "
                                                "column per variant",
                                          columns=1, height="auto", format="png", object_fit="contain",
                                          elem_id="probe-sheets", buttons=["download", "fullscreen"])
                probe_file = gr.File(label="All reports (JSON: judge, N, prompts, seeds, settings, rates)",
                                     interactive=False, elem_id="probe-file")

        # -- wiring ---------------------------------------------------------------------------------------
        param_components = [param_inputs[f"{m}_{p}"] for m, p, _ in PARAM_KEYS]
        gpu = dict(concurrency_id="gpu", concurrency_limit=gpu_concurrency)
        preset.change(studio.fill_from_preset, [preset], [targets, anchors, retain, kind, *param_components],
                      api_name="load_preset", queue=False)
        gr.on([method.change], studio.describe_method, [method], [method_summary, *method_groups.values()],
              api_name="describe_method", queue=False)
        gr.on([targets.change, retain.change, kind.change], studio.suggest_prompts, [kind, targets, retain],
              [erase_prompts, keep_prompts], api_name="suggest_prompts", queue=False)
        ui_only = dict(queue=False, api_visibility="private")  # page state, not part of the API
        erasing = erase_button.click(on_gpu(studio.erase), [targets, anchors, retain, method, session],
                                     [session, compared, edit_summary, layers, edit_file, job_status, job_timer,
                                      job_cancel], inputs_kwargs=param_inputs, api_name="erase", **gpu)
        job_timer.tick(studio.poll_job, [session], [session, compared, edit_summary, layers, edit_file, job_status,
                                                    job_timer, job_cancel], api_name="poll_job", queue=False)
        job_cancel.click(studio.cancel_job, None, [job_status], api_name="cancel_training", queue=False)
        uploading = upload.upload(studio.upload_edit, [upload, session], [session, compared, edit_summary, layers],
                                  api_name="upload_edit", **gpu)
        export_button.click(studio.export_edit, [session, export_form, export_rank], [export_file, export_note],
                            api_name="export_edit", **gpu)
        for event in (erasing, uploading):  # a failure's "Error" badge would sit over the last edit's report
            event.failure(studio.edit_failed, [session], [compared, edit_summary, layers, job_status],
                          api_name="edit_failed", **ui_only)
        # Cancel is live only while a generation runs: enabled before it starts, disabled however it ends.
        generating = generate_button.click(cancel_state(True), None, [cancel_button], api_name="generation_started",
                                           **ui_only).then(
            studio.generate, [erase_prompts, keep_prompts, seeds, steps, guidance, size, scheduler, compared, kind,
                              targets, session],
            [*galleries, summary, plot, run_file, status], api_name="generate", **gpu)
        generating.then(cancel_state(False), None, [cancel_button], api_name="generation_ended", **ui_only)
        generating.failure(studio.generation_failed, None,
                           [*galleries, summary, plot, run_file, status, cancel_button], api_name="generation_failed",
                           **ui_only)
        clear_button.click(studio.clear_edits, [session], [session, compared, edit_summary], api_name="clear_edits",
                           queue=False)
        cancel_button.click(studio.cancel, None, [status], api_name="cancel", queue=False)

        # The Probe tab: its run is the session's background job, polled by a timer of its own so that the
        # training job's poll (and with it the first tab) is left as it was.
        probe_outputs = [recovery, probe_sheets, recovery_note, probe_file]
        # Public, so that an API client whose session's edits changed can refresh the choices as the page does.
        session.change(studio.probe_edit_choices, [session, probe_edits], [probe_edits], api_name="probe_edit_choices",
                       queue=False)
        gr.on([probe_edits.change, kind.change], studio.suggest_probe_prompts, [probe_edits, kind, session],
              [probe_prompts], api_name="suggest_probe_prompts", queue=False)
        probing = probe_button.click(studio.start_probes, [probe_edits, probe_names, probe_prompts, probe_seeds, kind,
                                                           session],
                                     [probe_status, probe_timer, probe_cancel], api_name="start_probes", queue=False)
        probing.success(studio.clear_probe_results, None, probe_outputs, api_name="probes_started", **ui_only)
        probing.failure(studio.probes_refused, None, [probe_status, probe_timer, probe_cancel],
                        api_name="probes_refused", **ui_only)
        probe_timer.tick(studio.poll_probes, None, [probe_status, probe_timer, probe_cancel, *probe_outputs],
                         api_name="poll_probes", queue=False)
        probe_cancel.click(studio.cancel_probes, None, [probe_status], api_name="cancel_probes", queue=False)
        demo.unload(studio.end_session)
    studio.demo = demo  # Cancel takes this session's waiting generations off its queue
    return demo


def launch(demo: gr.Blocks, **kwargs):
    """Launch with the app's stylesheet; server name/port come from GRADIO_SERVER_NAME/PORT unless given."""
    return demo.launch(css_paths=[CSS], max_file_size="200mb", **kwargs)


def load_models(model: str | None, device: str | None) -> tuple:
    """The pipeline, its scorer and a notice for the banner. No model given: SD-1.4 on a GPU, the toy world
    without one. A model that cannot be loaded falls back to the toy world, with the reason in the notice."""
    notice = ""
    if model is None:
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        model = erasure.DEFAULT_MODEL if cuda else TOY_MODEL
        if not cuda:
            notice = (f"No GPU found, so the app started on the toy world (`--model {erasure.DEFAULT_MODEL}` "
                      f"runs SD-1.4 on the CPU, at minutes per image).")
    try:
        pipe = erasure.load_pipeline(model, device=device)
    except erasure.ModelLoadError as error:
        if model in RANDOM_MODELS or model == TOY_MODEL:
            raise
        notice = (f"{error} The app started with the offline toy world instead (`python app.py --model toy` "
                  f"starts it directly).")
        print(f"warning: {notice}", file=sys.stderr)
        pipe = erasure.load_pipeline(TOY_MODEL, device=device)
    model_id = pipeline_state(pipe).model_id
    if model_id in RANDOM_MODELS:
        return pipe, load_clip_scorer("tiny"), notice
    try:
        return pipe, load_clip_scorer("toy" if model_id == TOY_MODEL else scoring.DEFAULT_CLIP[0]), notice
    except ScorerLoadError as error:
        notice = f"{notice} {error}; CLIP scores use the random-weight tiny scorer instead.".strip()
        print(f"warning: {error}", file=sys.stderr)
        return pipe, load_clip_scorer("tiny"), notice


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help=f"hub id or local diffusers folder (SD-1.x/2.x, SDXL, FLUX), single .safetensors/.ckpt file, "
                             f"'toy' (the offline toy world) or a random-weight model ('tiny', 'tiny-sd2', "
                             f"'tiny-sdxl', 'tiny-flux'); default: {erasure.DEFAULT_MODEL} on a GPU, else toy")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--max-images", type=int, default=Limits.max_images,
                        help="cap on prompts x seeds per generation (raise it on a private GPU machine)")
    parser.add_argument("--originals", default=None, metavar="DIR",
                        help="also keep original images on disk here, shared with `python -m erasure evaluate "
                             "--originals DIR` (same keys); default: memory only")
    args = parser.parse_args(argv)
    pipe, scorer, notice = load_models(args.model, args.device)
    studio = Studio(pipe, scorer, Limits(max_images=args.max_images), notice, originals_folder=args.originals)
    # SIGTERM (a service manager, `kill`) stops the app the way Ctrl-C does: Gradio closes its server, and the
    # interpreter's exit removes the app's temporary folder (Python's default for SIGTERM skips both).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    launch(build_demo(studio))


if __name__ == "__main__":
    main()
