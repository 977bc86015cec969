"""Computing an edit: concepts -> token rows -> a method's solve -> an `Edit` with its statistics.

The pipeline is only read here; writing an edit in is `apply.py`'s job.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Sequence

import torch

from erasure.engine.apply import effective_parameters, touched_parameters
from erasure.engine.edit import Edit, Patch, check_patch, module_of
from erasure.engine.limits import MAX_TARGETS
from erasure.engine.pipeline import (PipelineState, concept_tokenizer, edited_modules, fingerprint,
                                     original_parameter, original_weight, pipeline_state)
from erasure.engine.progress import OnStep, Progress, ShouldStop
from erasure.engine.registry import ConceptRows, LowRankDelta, get_method
from erasure.engine.text import encode_texts, validate_concepts
from erasure.engine.training import TrainingJob

STATS_ROWS = 128  # retain rows the per-layer drift is averaged over: a report, not a guarantee, so keep it cheap


def check_erase_inputs(pipe, method: str, targets: Sequence[str], anchors: Sequence[str] = ("",),
                       retain: Sequence[str] = (), params: dict | None = None, max_concepts: int = MAX_TARGETS):
    """Everything about an erase request a user can get wrong, checked before any work: the method, its
    parameters (over the model family's defaults), the concepts against the tokenizer and the caps, and whether
    the family can train. Returns (method, parsed parameters, concepts); a ValueError names what is wrong."""
    spec = get_method(method)
    state = pipeline_state(pipe)
    parsed = spec.parse_params({**state.family.param_defaults.get(spec.name, {}), **(params or {})})
    concepts = validate_concepts(targets, anchors, retain, concept_tokenizer(pipe), max_concepts)
    if spec.trains:
        state.family.check_unet_method("training (ESD, Minimalist)")
    return spec, parsed, concepts


def erase(pipe, method: str, targets: Sequence[str], anchors: Sequence[str] = ("",), retain: Sequence[str] = (),
          *, max_concepts: int = MAX_TARGETS, progress: bool = False,
          on_step: OnStep | None = None, should_stop: ShouldStop | None = None,
          **params) -> Edit:
    """Compute an edit erasing `targets` (mapped onto `anchors`) while keeping `retain`.

    The pipeline is only read: its weights are untouched until the edit is `applied`. `progress`
    shows a bar while many concepts are encoded, or while a trained method trains (with its loss).
    Trained methods report `on_step(Progress(done, total, loss=...))` and stop with `Cancelled` when
    `should_stop()` turns true.
    """
    # 1. Check the request.
    spec, parsed, concepts = check_erase_inputs(pipe, method, targets, anchors, retain, params, max_concepts)
    if not spec.uses_retain and concepts.retain:
        warnings.warn(f"{spec.name} uses no retain concepts; the {len(concepts.retain)} given are ignored")
        concepts = dataclasses.replace(concepts, retain=())
    if spec.trains:  # 2–4 for a trained method: its own copy of the denoiser, optimised step by step
        return _train(pipe, spec, parsed, concepts, progress, on_step, should_stop)
    state = pipeline_state(pipe)

    # 2. Token rows of the concepts, by the method's conventions.
    start = time.perf_counter()
    rows = spec.prepare(concepts, parsed, lambda texts, full: encode_texts(pipe, texts, full, progress))
    encoded = time.perf_counter()

    # 3. The base weights it rewrites (read under the lock: another thread may have an edit applied).
    names = edited_modules(state, spec.edits(parsed))
    if not names:
        raise ValueError(f"this pipeline has no modules {spec.name} edits (modules ending in "
                         f"{', '.join(spec.edits(parsed))})")
    with state.lock:
        base = {n: original_weight(state, n) for n in names}
        digest = fingerprint(state, [f"{n}.weight" for n in names])
        originals = {n: w.double() for n, w in base.items()}

    # 4. Solve in float64.
    device = next(iter(originals.values())).device
    rows = rows.to(device)
    new = spec.solve(originals, rows, parsed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    solved = time.perf_counter()

    # 5. Package: patches (factors where smaller), fingerprint, statistics.
    edit = Edit(solution_patches(spec.name, new, originals, base), spec.name,
                {k: getattr(parsed, k) for k in spec.schema()}, list(concepts.targets), list(concepts.anchors),
                list(concepts.retain), state.model_id, digest)
    edit.stats = {"encode_seconds": encoded - start, "solve_seconds": solved - encoded,
                  "layers": layer_stats(state, edit, rows)}
    return edit


def solution_patches(method: str, new: dict, originals: dict, base: dict) -> dict[str, Patch]:
    """A solve's results as patches: low-rank factors where they hold fewer numbers than the matrix, else the new
    weight in the base dtype. Non-finite results are refused."""
    patches = {}
    for name, change in new.items():
        factored = isinstance(change, LowRankDelta)
        parts = (change.up, change.down) if factored else (change,)
        if not all(torch.isfinite(part).all() for part in parts):
            raise ValueError(f"{method} produced non-finite weights for {name}; the parameters make the system "
                             f"singular (try a larger lamb / retain_scale)")
        if factored and change.saves_memory:
            patches[f"{name}.delta"] = Patch.low_rank(change.up, change.down)
        else:  # a dense result, or factors no smaller than the matrix (SPEED's 76 rows per target on a narrow layer)
            value = originals[name] + change.dense() if factored else change
            patches[f"{name}.weight"] = Patch("tensor", value.to(base[name].dtype))
    return patches


def _train(pipe, spec, parsed, concepts, progress: bool, on_step, should_stop) -> Edit:
    from tqdm.auto import tqdm

    with tqdm(desc=f"training {spec.name}", unit="step", disable=not progress) as bar:
        def report(step: Progress):
            bar.total = step.total
            bar.set_postfix(loss=f"{step.loss:.4g}", refresh=False)
            bar.update(step.done - bar.n)
            if on_step:
                on_step(step)

        start = time.perf_counter()
        job = TrainingJob.for_pipeline(pipe, report, should_stop)
        copied = time.perf_counter()
        patches, stats = spec.train(job, concepts, parsed)
        del job  # the private copy of the denoiser goes before the edit is built
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    trained = time.perf_counter()
    params = {k: getattr(parsed, k) for k in spec.schema()}
    return edit_from_patches(pipe, spec.name, params, patches, concepts,
                             {**stats, "copy_seconds": copied - start, "train_seconds": trained - copied})


def layer_stats(state: PipelineState, edit: Edit, rows: ConceptRows | None = None) -> dict[str, dict[str, float]]:
    """Per changed module: the relative change of its effective weight ‖W′ − W‖/‖W‖ (any patch kind) and,
    when the method works on token rows, how far targets are from their anchors' outputs (‖W′t − Wa‖/‖Wa‖)
    and the retain drift (‖(W′−W)r‖/‖Wr‖) over up to STATS_ROWS evenly spaced retain rows."""
    with state.lock:
        written = {name: value for name, value in effective_parameters(state, edit).items()
                   if name.endswith(".weight")}
        # copies, taken under the lock: the base tensors are the live parameters whenever no edit is applied
        base = {name: original_parameter(state, name).double() for name in written}
    if rows is not None:
        targets, anchors, retain = torch.cat(rows.targets), torch.cat(rows.anchors), rows.retain
        if len(retain) > STATS_ROWS:
            retain = retain[torch.linspace(0, len(retain) - 1, STATS_ROWS).long().to(retain.device)]
    out = {}
    for key, w in base.items():
        module = key.removesuffix(".weight")
        w = w.double()
        new = written[key].to(w.device, torch.float64)
        delta = new - w
        stats = {"relative_change": float(delta.norm() / w.norm().clamp_min(1e-30))}
        if rows is not None and w.ndim == 2 and w.shape[1] == targets.shape[1]:
            goal = anchors.to(w.device) @ w.T
            stats["target_residual"] = float(((targets.to(w.device) @ new.T - goal).norm(dim=1)
                                              / goal.norm(dim=1).clamp_min(1e-12)).mean())
            if retain.numel():
                r = retain.to(w.device)
                stats["retain_drift"] = float(((r @ delta.T).norm(dim=1) / (r @ w.T).norm(dim=1).clamp_min(1e-12))
                                              .mean())
        out[module] = stats
    return out


def edit_from_patches(pipe, method: str, params: dict, patches: dict[str, Patch], concepts, stats: dict | None = None
                      ) -> Edit:
    """An `Edit` of arbitrary patches made by `method` (trained methods build theirs this way): fingerprinted
    over exactly the parameters it writes, with per-layer statistics of every patch kind."""

    spec = get_method(method)
    allowed = spec.edits(spec.parse_params(params))
    for key, patch in patches.items():
        check_patch(key, patch, f"{method} edit")
        if not module_of(key).endswith(allowed):
            raise ValueError(f"{method} may not change {module_of(key)!r} (it declares modules ending in "
                             f"{', '.join(allowed)})")
    state = pipeline_state(pipe)
    edit = Edit(patches, method, params, list(concepts.targets), list(concepts.anchors), list(concepts.retain),
                state.model_id, "")
    with state.lock:
        edit.fingerprint = fingerprint(state, touched_parameters(state, edit))
    edit.stats = {**(stats or {}), "layers": layer_stats(state, edit)}
    return edit
