"""Edits: computing one (`erase`), saving/loading it (safetensors + metadata), applying it (`applied`).

An `Edit` holds only the new tensors of the modules it changes. `applied` writes them into the
resident pipeline in place (no module replacement, so hooks, processors and compiled graphs stay
valid) under the pipeline's lock, and restores the exact original tensors on exit, also on error.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .methods import get_method
from .pipeline import fingerprint, original_weight, pipeline_state
from .text import encode_texts, validate_concepts

FORMAT = "erasure-studio-edit"
FORMAT_VERSION = "1"
MAX_CONCEPTS = 1000
_KEY = re.compile(r"^[A-Za-z0-9_.]+\.attn2\.to_[kv]\.weight$")


class EditFileError(ValueError):
    """An edit file that is not a valid Erasure Studio edit."""


class EditMismatchError(ValueError):
    """An edit made for another base model (its fingerprint does not match this pipeline)."""


@dataclass
class Edit:
    weights: dict[str, torch.Tensor]  # UNet module name -> new weight
    method: str
    params: dict[str, Any]
    targets: list[str]
    anchors: list[str]
    retain: list[str]
    model_id: str
    fingerprint: str  # sha256 of the base tensors it replaces (see pipeline.fingerprint)
    stats: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "method": self.method,
                "params": json.dumps(self.params), "targets": json.dumps(self.targets),
                "anchors": json.dumps(self.anchors), "retain": json.dumps(self.retain),
                "model_id": self.model_id, "fingerprint": self.fingerprint, "stats": json.dumps(self.stats)}

    def save(self, path: str | Path) -> Path:
        """Save as safetensors: keys are UNet state-dict keys (`...attn2.to_v.weight`), so
        `unet.load_state_dict(load_file(path), strict=False)` also works outside this library."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"edit files are saved as .safetensors, got {path.name!r}")
        tensors = {f"{name}.weight": w.detach().to("cpu").contiguous() for name, w in self.weights.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=self.metadata())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Edit":
        """Load and validate an edit file. Only safetensors are read: pickle files are refused."""
        from safetensors import safe_open

        path = Path(path)
        if path.suffix != ".safetensors":
            raise EditFileError(f"{path.name!r} is not a .safetensors file; edits are only read from safetensors "
                                f"(pickle files such as .pt/.ckpt can run code and are refused)")
        if not path.is_file():
            raise EditFileError(f"edit file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as error:
            raise EditFileError(f"{path.name!r} is not a readable safetensors file ({error})") from None
        return cls.from_parts(tensors, meta, path.name)

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str], source: str) -> "Edit":
        if meta.get("format") != FORMAT:
            raise EditFileError(f"{source!r} is a safetensors file but not an Erasure Studio edit "
                                f"(metadata 'format' is {meta.get('format')!r})")
        if meta.get("version") != FORMAT_VERSION:
            raise EditFileError(f"{source!r} has edit format version {meta.get('version')!r}; this version reads "
                                f"{FORMAT_VERSION!r}")
        try:
            fields = {k: json.loads(meta[k]) for k in ("params", "targets", "anchors", "retain", "stats")}
            method, model_id, digest = meta["method"], meta["model_id"], meta["fingerprint"]
        except (KeyError, json.JSONDecodeError) as error:
            raise EditFileError(f"{source!r} has missing or corrupt edit metadata ({error})") from None
        concept_lists = [fields[k] for k in ("targets", "anchors", "retain")]
        if not all(isinstance(x, list) and all(isinstance(c, str) for c in x) for x in concept_lists):
            raise EditFileError(f"{source!r}: metadata targets, anchors and retain must be lists of strings")
        if not fields["targets"] or len(fields["anchors"]) != len(fields["targets"]):
            raise EditFileError(f"{source!r}: metadata needs one anchor per target")
        if not isinstance(fields["params"], dict) or not isinstance(fields["stats"], dict):
            raise EditFileError(f"{source!r}: metadata params and stats must be JSON objects")
        if not tensors:
            raise EditFileError(f"{source!r} holds no tensors")
        weights = {}
        for key, tensor in tensors.items():
            if not _KEY.match(key):
                raise EditFileError(f"{source!r} has tensor {key!r}; an edit may only hold attn2.to_k/to_v weights")
            if tensor.ndim != 2 or not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise EditFileError(f"{source!r}: tensor {key!r} is not a finite 2-D float matrix")
            weights[key[: -len(".weight")]] = tensor
        get_method(method)
        return cls(weights, method, fields["params"], fields["targets"], fields["anchors"], fields["retain"],
                   model_id, digest, fields["stats"])


def erase(pipe, method: str, targets: Sequence[str], anchors: Sequence[str] = ("",), retain: Sequence[str] = (),
          *, max_concepts: int = MAX_CONCEPTS, progress: bool = False, **params) -> Edit:
    """Compute an edit erasing `targets` (mapped onto `anchors`) while keeping `retain`.

    The pipeline is only read: its weights are untouched until the edit is `applied`. `progress`
    shows a bar while many concepts are encoded.
    """
    spec = get_method(method)
    parsed = spec.parse_params(params)
    state = pipeline_state(pipe)
    concepts = validate_concepts(targets, anchors, retain, pipe.tokenizer, max_concepts)

    start = time.perf_counter()
    rows = spec.prepare(concepts, parsed, lambda texts, full: encode_texts(pipe, texts, full, progress))
    encoded = time.perf_counter()
    names = [n for n in state.modules if n.endswith(spec.edits(parsed))]
    with state.lock:  # read the base tensors, also if another thread has an edit applied
        base = {n: original_weight(state, n) for n in names}
        digest = fingerprint(state, names)
        originals = {n: w.double() for n, w in base.items()}
    device = next(iter(originals.values())).device
    rows = type(rows)(*(_to(x, device) for x in (rows.targets, rows.anchors, rows.retain, rows.null)))
    new = spec.solve(originals, rows, parsed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    solved = time.perf_counter()
    for name, w in new.items():
        if not torch.isfinite(w).all():
            raise ValueError(f"{spec.name} produced non-finite weights for {name}; the parameters make the system "
                             f"singular (try a larger lamb / retain_scale)")
    stats = {"encode_seconds": encoded - start, "solve_seconds": solved - encoded,
             "layers": _layer_stats(originals, new, rows)}
    weights = {n: w.to(base[n].dtype) for n, w in new.items()}
    return Edit(weights, spec.name, {k: getattr(parsed, k) for k in spec.schema()}, list(concepts.targets),
                list(concepts.anchors), list(concepts.retain), state.model_id, digest, stats)


def _to(x, device):
    return [t.to(device) for t in x] if isinstance(x, list) else x.to(device)


STATS_ROWS = 128  # retain rows the per-layer drift is averaged over: a report, not a guarantee, so keep it cheap


def _layer_stats(old: dict, new: dict, rows) -> dict[str, dict[str, float]]:
    """Per layer: relative weight change, how far targets are from their anchors' outputs
    (‖W't − Wa‖/‖Wa‖), and retain drift (‖(W'−W)r‖/‖Wr‖) over up to STATS_ROWS evenly spaced retain rows."""
    targets, anchors = torch.cat(rows.targets), torch.cat(rows.anchors)
    retain = rows.retain
    if len(retain) > STATS_ROWS:
        retain = retain[torch.linspace(0, len(retain) - 1, STATS_ROWS).long().to(retain.device)]
    out = {}
    for name, w in old.items():
        delta = new[name] - w
        goal = anchors @ w.T
        stats = {"relative_change": float(delta.norm() / w.norm()),
                 "target_residual": float(((targets @ new[name].T - goal).norm(dim=1)
                                           / goal.norm(dim=1).clamp_min(1e-12)).mean())}
        if retain.numel():
            stats["retain_drift"] = float(((retain @ delta.T).norm(dim=1)
                                           / (retain @ w.T).norm(dim=1).clamp_min(1e-12)).mean())
        out[name] = stats
    return out


@contextmanager
def applied(pipe, edit: Edit | None) -> Iterator[Any]:
    """Hold the pipeline's lock with `edit` written into its weights; restore them bitwise on exit.

    `applied(pipe, None)` holds the lock with the base weights in place (for original images).
    Nested blocks compose: the inner edit wins on the modules it touches, and each exit restores
    exactly what was there before it. Other threads wait for the lock.
    """
    state = pipeline_state(pipe)
    with state.lock:
        if edit is None:
            writes = {name: state.originals[name] for name in state.originals}
        else:
            _check_applicable(state, edit)
            writes = edit.weights
        saved = {name: state.modules[name].weight.detach().clone() for name in writes}
        before_versions = {name: (state.modules[name].weight.data_ptr(), state.modules[name].weight._version)
                           for name in writes}
        added = [name for name in writes if name not in state.originals]
        for name in added:
            state.originals[name] = saved[name]
        written = []
        try:
            with torch.no_grad():
                for name, tensor in writes.items():
                    state.modules[name].weight.copy_(tensor)
                    written.append(name)
            yield pipe
        finally:
            with torch.no_grad():
                for name in written:
                    weight = state.modules[name].weight
                    valid = state.digests.get(name, (None,))[0] == before_versions[name]
                    weight.copy_(saved[name])
                    if valid:  # the bytes are back bitwise: the digest still holds for the new version
                        state.digests[name] = ((weight.data_ptr(), weight._version), state.digests[name][1])
            for name in added:
                del state.originals[name]


def check_applicable(pipe, edit: Edit) -> None:
    """Raise EditMismatchError unless `edit` was made for this pipeline's base weights (checked
    without applying it, e.g. when an edit file is uploaded)."""
    state = pipeline_state(pipe)
    with state.lock:  # another thread may be writing an edit in; under the lock the base tensors read consistently
        _check_applicable(state, edit)


def _check_applicable(state, edit: Edit) -> None:
    unknown = sorted(set(edit.weights) - set(state.modules))
    if unknown:
        raise EditMismatchError(f"the edit changes modules this pipeline does not have (e.g. {unknown[0]!r}); it "
                                f"was made for {edit.model_id!r}")
    for name, tensor in edit.weights.items():
        shape = tuple(state.modules[name].weight.shape)
        if tuple(tensor.shape) != shape:
            raise EditMismatchError(f"the edit's {name} has shape {tuple(tensor.shape)} but this pipeline's is {shape}; "
                                    f"it was made for {edit.model_id!r}, not {state.model_id!r}")
    if fingerprint(state, edit.weights) != edit.fingerprint:
        raise EditMismatchError(f"the edit was made for another base model ({edit.model_id!r}); this pipeline "
                                f"({state.model_id!r}) has different weights in the layers it replaces")
