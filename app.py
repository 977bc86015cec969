"""Erasure Studio: erase concepts from a diffusion model in seconds, then compare what the original and each edit
draw on the same seeds, with CLIP scores. The page's layout, wiring and handlers over `erasure.studio`.

    python app.py                  # CompVis/stable-diffusion-v1-4 on a GPU; without one, the toy world
    python app.py --model toy      # the toy world (offline, CPU); --model tiny: random weights, the mechanics only
    python app.py --model stabilityai/stable-diffusion-xl-base-1.0   # SDXL (also SD-2.x, FLUX; tiny-sdxl offline)
Gradio's own GRADIO_SERVER_NAME / GRADIO_SERVER_PORT choose where it listens (default 127.0.0.1:7860).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import anyio
import gradio as gr
from gradio.utils import get_upload_folder

import erasure
from erasure import studio as library
from erasure.engine.limits import Limits
from erasure.engine.pipeline import pipeline_state
from erasure.engine.presets import KINDS
from erasure.engine.progress import Cancelled
from erasure.engine.text import split_concepts
from erasure.evaluation.compare import GROUPS, suggest_prompts
from erasure.evaluation.probes import PROBE_TITLES, PROBES
from erasure.evaluation.probes.protocols import PROTOCOLS
from erasure.studio.downloads import FILE_LIFETIME_S
from erasure.studio.reports import (job_outcome, job_progress, layer_table, probe_column_widths,
                                    probe_note, probe_table, summary_bars, summary_table)
from erasure.studio.startup import load_models
from erasure.studio.studio import EXPORTS, PARAM_KEYS

try:  # Hugging Face ZeroGPU: a GPU is attached only while a decorated function runs
    import spaces

    on_gpu = spaces.GPU
except ImportError:
    def on_gpu(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

CSS = Path(__file__).resolve().parent / "assets" / "app.css"


@contextmanager
def user_errors():
    """The library's ValueErrors (bad concepts, parameters, files, caps) reach the user as their own sentence,
    and the server's console stays quiet: a user's mistake is not a bug, so no traceback is printed."""
    try:
        yield
    except ValueError as error:
        raise gr.Error(str(error), print_exception=False) from None


def session_id(request: gr.Request | None) -> str:
    """Gradio's session hash ("" when a handler is called directly, outside a request)."""
    return getattr(request, "session_hash", None) or ""


IDLE = (gr.Timer(active=False), gr.Button(interactive=False))  # a poll's timer and Cancel button once done


class Studio(library.Studio):
    """The page's event handlers over the library's studio (downloads go to Gradio's cache folder, which Gradio
    serves in place)."""

    demo: gr.Blocks | None = None  # set by build_demo: Cancel takes waiting generations off its queue

    def __init__(self, pipe, scorer, limits: Limits = Limits(), notice: str = "", originals_folder=None):
        super().__init__(pipe, scorer, limits, notice, originals_folder, downloads_folder=get_upload_folder())

    # -- concepts and edits -----------------------------------------------------------------------------
    def fill_from_preset(self, name: str):
        if not name:
            return [gr.skip()] * (4 + len(PARAM_KEYS))
        with user_errors():
            return self.preset_fields(name)

    def describe_method(self, method: str):
        spec = erasure.get_method(method)
        return [f"{spec.summary}  \n*{spec.paper}*",
                *[gr.update(visible=name == spec.name) for name in sorted(erasure.METHODS)]]  # the groups' order

    def suggest_prompts(self, kind: str, targets: str, retain: str):
        prompts = suggest_prompts(kind, split_concepts(targets), split_concepts(retain))
        return "\n".join(prompts.erase), "\n".join(prompts.keep)

    def erase(self, targets: str, anchors: str, retain: str, method: str, session: list,
              request: gr.Request | None = None, **params):
        """A closed form's edit joins the session's columns; a trained method starts a job `poll_job` finishes."""
        given = {name.removeprefix(f"{method}_"): value for name, value in params.items()
                 if name.startswith(f"{method}_")}
        with user_errors():
            added = self.erase_concepts(targets, anchors, retain, method, given, session, session_id(request))
        if isinstance(added, str):  # the training job's label
            return (gr.skip(), gr.skip(), f"Training **{added}** in the background; the edit appears here and as a "
                    f"column when it is done. Generating goes on meanwhile.", gr.skip(), gr.skip(),
                    f"**{added}**: starting...", gr.Timer(active=True), gr.Button(interactive=True))
        return (*edit_updates(added), gr.skip(), gr.skip(), gr.skip())

    def poll_job(self, session: list, request: gr.Request):
        """The page's timer: the training job's progress; when it has finished, its edit joins the session."""
        job, finished = self.finished_job(session_id(request), "training")
        if job is None:
            return (*[gr.skip()] * 6, *IDLE)
        if not finished:
            return (*[gr.skip()] * 5, job_progress(job), gr.skip(), gr.skip())
        if job.state != "done":
            return (*[gr.skip()] * 5, job_outcome(job), *IDLE)
        return (*edit_updates(self.add_edit(session, job.result, session_id(request))), job_outcome(job), *IDLE)

    def cancel_job(self, request: gr.Request):
        if self.jobs.cancel(session_id(request), kind="training"):
            return "Cancelling the training job after its current step..."
        return "No training job is running in this session."

    def upload_edit(self, file: str | None, session: list, request: gr.Request | None = None):
        if not file:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        with user_errors():
            added = self.upload(file, session, session_id(request))
        return edit_updates(added)[:4]

    def export_edit(self, session: list, form: str, rank, request: gr.Request | None = None):
        with user_errors():
            return self.export_latest(session, form, rank)

    def clear_edits(self, session: list):
        self.forget(session)
        return [], edit_choices([]), "No edits in this session."

    def end_session(self, request: gr.Request):
        """The tab closed (or a client disconnected): stop its work and free its edits now, not an hour later."""
        self.close_session(session_id(request))

    @staticmethod
    def edit_failed(session: list):
        """After a failed erase or upload: say so, and which edits the session still holds."""
        held = ", ".join(entry["label"] for entry in session) or "no edits"
        return (gr.skip(), f"**Failed**: the reason is in the error notice. This session holds {held}.",
                layer_table(), "")

    # -- probes -----------------------------------------------------------------------------------------
    @staticmethod
    def probe_edit_choices(session: list, picked: list[str] | None):
        """Picks that still exist stay picked; with none left, the newest edit (every edit could take minutes)."""
        labels = [entry["label"] for entry in session]
        kept = [label for label in picked or [] if label in labels]
        return gr.CheckboxGroup(choices=labels, value=kept or labels[-1:])

    def suggest_probe_prompts(self, picked: list[str] | None, kind: str, session: list) -> str:
        with user_errors():
            return self.probe_prompts(picked, kind, session)

    def start_probes(self, picked: list[str] | None, names: list[str] | None, prompts: str, seeds: str, kind: str,
                     protocol: str, session: list, request: gr.Request | None = None):
        with user_errors():
            self.start_probe_run(picked, names, prompts, seeds, kind, protocol, session, session_id(request))
        return "**Probes**: starting...", gr.Timer(active=True), gr.Button(interactive=True)

    def poll_probes(self, request: gr.Request):
        """The Probe tab's timer: the run's progress; when it has finished, its table, sheets, note and file."""
        job, finished = self.finished_job(session_id(request), "probes")
        unchanged = [gr.skip()] * 4
        if job is None:
            return (gr.skip(), *IDLE, *unchanged)
        if not finished:
            return (job_progress(job), gr.skip(), gr.skip(), *unchanged)
        if job.state != "done":
            return (job_outcome(job), *IDLE, *unchanged)
        sheets = [sheet for result in job.result for sheet in result["sheets"]]
        return (job_outcome(job), *IDLE, probe_table_view(job.result), gr.Gallery(value=sheets or None),
                probe_note(job.result, self.defaults), self.probe_record(job.result))

    def cancel_probes(self, request: gr.Request):
        if self.jobs.cancel(session_id(request), kind="probes"):
            return "Cancelling the probes after the current one..."
        return "No probe run is in progress in this session."

    def probes_refused(self, request: gr.Request):
        """After a refused start: say so; a run already going on keeps its timer and Cancel button."""
        job = self.jobs.get(session_id(request))
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
        """The comparison, in a thread this coroutine can abandon: a cancelled event (a client's `job.cancel()`)
        sets the session's flag at once, which stops the denoising loop at its next step, with the lock released."""
        flag = self.cancel_flags.start(session_id(request))
        fields = (erase_prompts, keep_prompts, seeds, steps, guidance, size, scheduler, compared, kind, targets)
        work = functools.partial(on_gpu(duration=180)(self._generate), (*fields, session), flag, progress)
        try:
            return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            flag.set()
            raise
        finally:
            self.cancel_flags.finish(session_id(request), flag)

    def _generate(self, fields, flag, progress):
        with user_errors():
            try:
                result = self.compare(*fields, on_step=lambda step: progress((step.done, step.total),
                                                                              desc=step.message),
                                      should_stop=flag.is_set)
            except Cancelled:
                return (*[gr.skip()] * 5, "Generation cancelled; the model's weights are restored.")
        galleries = [gr.Gallery(value=result.galleries[group], columns=result.columns,
                                elem_classes=gallery_classes(result.side)) for group in GROUPS]
        return (*galleries, summary_table(result.summary), summary_plot(result.summary), result.path, result.status)

    @staticmethod
    def generation_failed():
        """After a failed generation: empty outputs, so nothing on the page reads as this request's result,
        and Cancel greyed out (Gradio runs no .then() after a failure, only .failure())."""
        return (*[gr.Gallery(value=None, elem_classes=[]) for _ in GROUPS], summary_table([]), summary_plot([]),
                None, "**Generation failed**: the reason is in the error notice. Earlier results were cleared.",
                gr.Button(interactive=False))

    async def cancel(self, request: gr.Request):
        """Stop this session's running generation at its next step, or take its waiting ones off the queue."""
        if self.cancel_flags.cancel(session_id(request)):
            return "Cancelling after the current denoising step..."
        removed = await remove_queued_events(self.demo, session_id(request), "generate") if self.demo else 0
        if removed:
            return f"Removed {removed} waiting generation(s) from the queue; nothing had started."
        return "Nothing is running in this session."


def edit_updates(added: library.EditAdded) -> tuple:
    """session, the compare choices, the edit's report, its layer table and its download."""
    return added.session, edit_choices(added.session), added.report, layer_table(added.edit), added.path


def edit_choices(session: list):
    return gr.CheckboxGroup(choices=[e["label"] for e in session], value=[e["label"] for e in session])


def param_component(method: str, name: str, spec: dict, default):
    """The Advanced panel's field for one parameter, showing `default` (the paper's, or the model family's)."""
    common = dict(label=name, info=spec["help"], elem_id=f"{method}-{name}")
    if spec["type"] == "bool":
        return gr.Checkbox(value=default, **common)
    if "choices" in spec:
        return gr.Dropdown(spec["choices"], value=default, **common)
    if spec["type"] in ("int", "float"):
        return gr.Number(value=default, **common)  # no precision: a fraction reaches the check, not a rounding
    return gr.Textbox(value=str(default), **common)


def probe_table_view(results: list[dict]) -> gr.Dataframe:
    """An update of the page's table: the rows and their column widths (an update made outside the layout)."""
    table = probe_table(results)
    return gr.Dataframe(table, column_widths=probe_column_widths(table))


def summary_plot(summary: list[dict]) -> gr.BarPlot:
    bars, colors, top = summary_bars(summary)
    return gr.BarPlot(bars, sort=list(bars["bar"]), color_map=colors, y_lim=[0, top])  # table order, not A-Z


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


def gallery_classes(side: int) -> list[str]:
    """Images under 256 px are drawn 256 px wide with crisp pixels (4x for 64 px), not blurred to the cell."""
    return ["small-images"] if side < 256 else []


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
                                               value=studio.profile.prompt_kind)
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
                                export_rank = gr.Number(0, label="LoRA rank", info="0 = exact",
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
                        probe_protocol = gr.Dropdown([(f"{p.name}: {p.summary}", p.name) for p in PROTOCOLS.values()],
                                                     value=studio.probe_protocol, label="Protocol",
                                                     elem_id="probe-protocol", info=f"quick samples at the model's "
                                                     f"defaults ({defaults.steps} steps, {defaults.scheduler})")
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
        live, greyed = (lambda: gr.Button(interactive=True)), (lambda: gr.Button(interactive=False))
        generating = generate_button.click(live, None, [cancel_button], api_name="generation_started", **ui_only).then(
            studio.generate, [erase_prompts, keep_prompts, seeds, steps, guidance, size, scheduler, compared, kind,
                              targets, session],
            [*galleries, summary, plot, run_file, status], api_name="generate", **gpu)
        generating.then(greyed, None, [cancel_button], api_name="generation_ended", **ui_only)
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
                                                           probe_protocol, session],
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
