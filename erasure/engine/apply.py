"""Writing an edit into the resident pipeline and taking it out again, bitwise.

Two primitives, `write_edit` (returns an `UndoRecord`) and `restore`, let code swap an edit in or out
between denoising steps; `applied` is the context manager over them. Parameters are written in place
(modules are never replaced, so hooks, attention processors and compiled graphs stay valid), and only
the replaced tensors are kept. Everything happens under the pipeline's re-entrant lock: callers that
swap between steps hold it for the whole generation (`applied(pipe, None)` does).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from erasure.engine.edit import Edit, EditMismatchError, module_of
from erasure.engine.pipeline import PipelineState, fingerprint, original_parameter, pipeline_state


@dataclass
class UndoRecord:
    saved: dict[str, torch.Tensor]  # parameter -> its tensor before the write, in write order
    versions: dict[str, tuple[int, int]]  # parameter -> (data_ptr, version) before the write
    added: list[str]  # parameters whose base copy this write put in `state.originals`


def touched_parameters(state: PipelineState, edit: Edit) -> list[str]:
    """The parameters an edit writes: tensor patches' own, a masked module's weight (and bias for an
    output mask). Raises EditMismatchError for a patch this pipeline has no parameter or shape for."""
    names = []
    for key, patch in edit.patches.items():
        module = module_of(key)
        weight_key = key if patch.kind == "tensor" else f"{module}.weight"
        if weight_key not in state.parameters:
            raise EditMismatchError(f"the edit changes {weight_key!r}, which is not a parameter of this pipeline's "
                                    f"denoiser; it was made for {edit.model_id!r}, not {state.model_id!r}")
        shape = tuple(state.parameters[weight_key].shape)
        value = tuple(patch.value.shape)
        if patch.kind == "low_rank" and (len(shape) != 2 or value[1] != shape[0] + shape[1]):
            raise EditMismatchError(f"the edit's {key} has factors of width {value[1]}, but {module!r} has a "
                                    f"{shape[0]}x{shape[1]} weight (width {shape[0] + shape[1]}); it was made for "
                                    f"{edit.model_id!r}, not {state.model_id!r}")
        if patch.kind == "tensor" and value != shape:
            raise EditMismatchError(f"the edit's {key} has shape {value} but this pipeline's is {shape}; it was made "
                                    f"for {edit.model_id!r}, not {state.model_id!r}")
        if patch.kind == "output_mask" and (len(shape) < 2 or value != shape[:1]):
            raise EditMismatchError(f"the edit's {key} has {value[0]} factors but {module!r} has {shape[0]} "
                                    f"output units")
        if patch.kind == "input_mask" and (len(shape) != 2 or shape[1] % value[0]):
            raise EditMismatchError(f"the edit's {key} has {value[0]} factors, which do not divide the "
                                    f"{shape[-1]} input columns of {module!r}")
        names.append(weight_key)
        if patch.kind == "output_mask" and f"{module}.bias" in state.parameters:
            names.append(f"{module}.bias")
    return list(dict.fromkeys(names))


def effective_parameters(state: PipelineState, edit: Edit) -> dict[str, torch.Tensor]:
    """parameter -> the value to write: tensor patches as they are, low-rank changes added to the base weight
    (W + up @ down in float64, cast once), then masks applied to the (patched or base) weight as row scalings
    of weight and bias (output masks) or column scalings (input masks)."""
    values = {key: patch.value for key, patch in edit.patches.items() if patch.kind == "tensor"}
    for key, patch in edit.patches.items():
        if patch.kind == "low_rank":
            name = f"{module_of(key)}.weight"
            base = original_parameter(state, name)
            up, down = (f.to(base.device, torch.float64) for f in patch.factors(base.shape[0]))
            values[name] = torch.addmm(base.double(), up, down).to(base.dtype)
    for key, patch in edit.patches.items():
        if patch.kind in ("tensor", "low_rank"):
            continue
        module = module_of(key)
        for name in (f"{module}.weight", f"{module}.bias"):
            if name not in state.parameters or (patch.kind == "input_mask" and name.endswith(".bias")):
                continue
            current = values.get(name, original_parameter(state, name))
            mask = patch.value.to(current.device, torch.promote_types(current.dtype, torch.float32))
            if patch.kind == "input_mask":  # one factor per block of columns (a feature, or a head)
                factors = mask.repeat_interleave(current.shape[1] // len(mask))[None, :]
            else:
                factors = mask.view(-1, *[1] * (current.ndim - 1))
            values[name] = (current.to(mask.dtype) * factors).to(state.parameters[name].dtype)
    return values


def edited_weights(pipe, edit: Edit) -> dict[str, torch.Tensor]:
    """The weights `edit` writes, by module name, in the pipeline's dtype (what `applied` puts in place)."""
    state = pipeline_state(pipe)
    with state.lock:
        _check_applicable(state, edit)
        return {name.removesuffix(".weight"): value for name, value in effective_parameters(state, edit).items()
                if name.endswith(".weight")}


def check_applicable(pipe, edit: Edit) -> None:
    """Raise EditMismatchError unless `edit` fits this pipeline's parameters and was made for its base
    weights (checked without applying it, e.g. when an edit file is uploaded)."""
    state = pipeline_state(pipe)
    with state.lock:  # another thread may be writing an edit in; under the lock the base tensors read consistently
        _check_applicable(state, edit)


def _check_applicable(state: PipelineState, edit: Edit) -> list[str]:
    names = touched_parameters(state, edit)
    if fingerprint(state, names) != edit.fingerprint:
        raise EditMismatchError(f"the edit was made for another base model ({edit.model_id!r}); this pipeline "
                                f"({state.model_id!r}) has different weights in the layers it replaces")
    return names


def write_edit(pipe, edit: Edit | None) -> UndoRecord:
    """Write `edit` into the pipeline (None: the base weights of everything currently edited) and return
    what `restore` needs to put back exactly what was there. Call it with the pipeline's lock held when
    the weights must not change between this and `restore` (between denoising steps, say)."""
    state = pipeline_state(pipe)
    with state.lock:
        if edit is None:
            writes = dict(state.originals)
        else:
            _check_applicable(state, edit)
            writes = effective_parameters(state, edit)
        record = UndoRecord({}, {}, [])
        try:
            with torch.no_grad():
                for name, value in writes.items():
                    parameter = state.parameters[name]
                    record.saved[name] = parameter.detach().clone()
                    record.versions[name] = (parameter.data_ptr(), parameter._version)
                    if name not in state.originals:
                        state.originals[name] = record.saved[name]
                        record.added.append(name)
                    parameter.copy_(value)
        except BaseException:
            restore(pipe, record)
            raise
        return record


def restore(pipe, record: UndoRecord) -> None:
    """Put back bitwise what `write_edit` replaced."""
    state = pipeline_state(pipe)
    with state.lock, torch.no_grad():
        for name, saved in reversed(record.saved.items()):
            parameter = state.parameters[name]
            valid = state.digests.get(name, (None,))[0] == record.versions[name]
            parameter.copy_(saved)
            if valid:  # the bytes are back bitwise: the digest still holds for the new version
                state.digests[name] = ((parameter.data_ptr(), parameter._version), state.digests[name][1])
        for name in record.added:
            del state.originals[name]


@contextmanager
def applied(pipe, edit: Edit | None) -> Iterator[Any]:
    """Hold the pipeline's lock with `edit` written into its parameters; restore them bitwise on exit.

    `applied(pipe, None)` holds the lock with the base weights in place (for original images).
    Nested blocks compose: the inner edit wins on the parameters it writes, and each exit restores
    exactly what was there before it. Other threads wait for the lock.
    """
    state = pipeline_state(pipe)
    with state.lock:
        record = write_edit(pipe, edit)
        try:
            yield pipe
        finally:
            restore(pipe, record)
