"""An edit and its file format: patches on the denoiser's parameters, saved as safetensors + JSON metadata.

A patch is keyed like the UNet's state dict:

- `<module>.weight` / `<module>.bias`, kind "tensor": the parameter's new value.
- `<module>.delta`, kind "low_rank": the change of the module's weight as factors, W′ = W + up @ down,
  stored as one tensor [r, d_out + d_in] = [upᵀ | down] (what the closed forms produce: their change has the
  rank of the target rows, so a 3-concept SD-1.4 edit is 0.6 MB instead of 73 MB). Applying computes
  W + up @ down in float64 from the base weight and casts once.
- `<module>.output_mask`, kind "output_mask": one factor per output unit of that module, applied as a
  row scaling of its weight and bias (y = m ⊙ (Wx + b) = (diag(m) W) x + m ⊙ b), so a neuron mask *is*
  a weight edit.
- `<module>.input_mask`, kind "input_mask": one factor per block of input columns (per input feature,
  or per attention head before `to_out`), applied as a column scaling of the weight.

Tensor patches use state-dict keys, so `unet.load_state_dict(load_file(path), strict=False)` also works
for them outside this library. Writing and restoring edits lives in `apply.py`, computing them in
`compute.py`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from erasure.engine.families import FAMILIES
from erasure.engine.limits import MAX_METADATA_BYTES, MAX_RETAIN, MAX_TARGETS
from erasure.engine.registry import get_method

FORMAT = "erasure-studio-edit"
FORMAT_VERSION = "3"  # 3 added low_rank patches; edits without any are still written as 2
READABLE_VERSIONS = ("1", "2", "3")
PATCH_SUFFIXES = {"weight": "tensor", "bias": "tensor", "delta": "low_rank", "output_mask": "output_mask",
                  "input_mask": "input_mask"}
_KEY = re.compile(r"^(?P<module>[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*)\.(?P<what>weight|bias|delta|output_mask|input_mask)$")
_VERSION_1_KEY = re.compile(r"^[A-Za-z0-9_.]+\.attn2\.to_[kv]\.weight$")


class EditFileError(ValueError):
    """An edit file that is not a valid Erasure Studio edit."""


class EditMismatchError(ValueError):
    """An edit made for another base model (its fingerprint does not match this pipeline)."""


@dataclass(frozen=True)
class Patch:
    kind: str  # "tensor" | "low_rank" | "output_mask" | "input_mask"
    value: torch.Tensor

    @classmethod
    def low_rank(cls, up: torch.Tensor, down: torch.Tensor) -> "Patch":
        """A weight change up @ down (up [d_out, r], down [r, d_in]), stored in float32."""
        return cls("low_rank", torch.cat([up.T, down], dim=1).float())

    def factors(self, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) of a low_rank patch on a weight with `d_out` rows."""
        return self.value[:, :d_out].T, self.value[:, d_out:]


def module_of(key: str) -> str:
    """'down_blocks.0.attentions.0...attn2.to_v.weight' -> 'down_blocks.0...attn2.to_v'."""
    return key.rsplit(".", 1)[0]


@dataclass
class Edit:
    patches: dict[str, Patch]  # state-dict style key (see the module docstring) -> patch
    method: str
    params: dict[str, Any]
    targets: list[str]
    anchors: list[str]
    retain: list[str]
    model_id: str
    fingerprint: str  # sha256 of the base parameters it writes (see pipeline.fingerprint)
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor], *args, **kwargs) -> "Edit":
        """An edit of new dense weight tensors by module name (e.g. weights computed outside this library)."""
        return cls({f"{name}.weight": Patch("tensor", w) for name, w in weights.items()}, *args, **kwargs)

    def modules(self) -> list[str]:
        """Modules this edit changes, in key order."""
        return list(dict.fromkeys(module_of(key) for key in self.patches))

    def metadata(self) -> dict[str, str]:
        has_factors = any(patch.kind == "low_rank" for patch in self.patches.values())
        return {"format": FORMAT, "version": FORMAT_VERSION if has_factors else "2", "method": self.method,
                "params": json.dumps(self.params), "targets": json.dumps(self.targets),
                "anchors": json.dumps(self.anchors), "retain": json.dumps(self.retain),
                "model_id": self.model_id, "fingerprint": self.fingerprint, "stats": json.dumps(self.stats),
                "patches": json.dumps({key: patch.kind for key, patch in self.patches.items()})}

    def save(self, path: str | Path) -> Path:
        """Save as safetensors (masks are stored as masks, not folded into weights)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"edit files are saved as .safetensors, got {path.name!r}")
        tensors = {key: patch.value.detach().to("cpu").contiguous() for key, patch in self.patches.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=self.metadata())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Edit":
        """Load and validate an edit file (format 3, 2 or 1). Only safetensors are read: pickle is refused.
        Whether it fits a pipeline is checked by `apply.check_applicable` (and on every apply)."""
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
        """Validate tensors + metadata read from a file; each way they can be wrong has its own message."""
        if meta.get("format") != FORMAT:
            raise EditFileError(f"{source!r} is a safetensors file but not an Erasure Studio edit "
                                f"(metadata 'format' is {meta.get('format')!r})")
        size = sum(len(key) + len(value) for key, value in meta.items())
        if size > MAX_METADATA_BYTES:
            raise EditFileError(f"{source!r} has {size / 2**20:.1f} MiB of metadata; edit files may hold at most "
                                f"{MAX_METADATA_BYTES / 2**20:.0f} MiB")
        version = meta.get("version")
        if version not in READABLE_VERSIONS:
            raise EditFileError(f"{source!r} has edit format version {version!r}; this version reads "
                                f"{' and '.join(READABLE_VERSIONS)}")
        try:
            fields = {k: json.loads(meta[k]) for k in ("params", "targets", "anchors", "retain", "stats")}
            method, model_id, digest = meta["method"], meta["model_id"], meta["fingerprint"]
            kinds = json.loads(meta["patches"]) if version != "1" else {key: "tensor" for key in tensors}
        except (KeyError, json.JSONDecodeError) as error:
            raise EditFileError(f"{source!r} has missing or corrupt edit metadata ({error})") from None
        concept_lists = [fields[k] for k in ("targets", "anchors", "retain")]
        if not all(isinstance(x, list) and all(isinstance(c, str) for c in x) for x in concept_lists):
            raise EditFileError(f"{source!r}: metadata targets, anchors and retain must be lists of strings")
        if not fields["targets"] or len(fields["anchors"]) != len(fields["targets"]):
            raise EditFileError(f"{source!r}: metadata needs one anchor per target")
        if len(fields["targets"]) > MAX_TARGETS or len(fields["retain"]) > MAX_RETAIN:
            raise EditFileError(f"{source!r} lists {len(fields['targets'])} targets and {len(fields['retain'])} "
                                f"retain concepts; edits hold at most {MAX_TARGETS} and {MAX_RETAIN}")
        if not isinstance(fields["params"], dict) or not isinstance(fields["stats"], dict):
            raise EditFileError(f"{source!r}: metadata params and stats must be JSON objects")
        if not isinstance(kinds, dict) or set(kinds) != set(tensors):
            raise EditFileError(f"{source!r}: metadata 'patches' must name the kind of exactly the tensors stored")
        if not tensors:
            raise EditFileError(f"{source!r} holds no tensors")
        try:
            spec = get_method(method)
            params = spec.parse_params(fields["params"])
        except ValueError as error:
            raise EditFileError(f"{source!r}: {error}") from None
        allowed = declared_modules(spec.edits(params))
        patches = {}
        for key in sorted(tensors):
            patch = Patch(kinds[key], tensors[key])
            check_patch(key, patch, source, version)
            if not module_of(key).endswith(allowed):
                raise EditFileError(f"{source!r} changes {module_of(key)!r}, which method {spec.name!r} does not "
                                    f"edit (it edits only modules ending in {', '.join(allowed)})")
            patches[key] = patch
        return cls(patches, method, fields["params"], fields["targets"], fields["anchors"], fields["retain"],
                   model_id, digest, fields["stats"])


def declared_modules(suffixes) -> tuple[str, ...]:
    """A method's declared module suffixes, plus each family's layer that stands for all of them (FLUX's
    `context_embedder` carries both keys and values, so an edit of attn2.to_k and to_v may change it)."""

    suffixes = tuple(suffixes)
    stand_ins = [layer for family in FAMILIES.values() for layer, meant in family.stands_for.items()
                 if all(suffix.endswith(suffixes) for suffix in meant)]
    return suffixes + tuple(dict.fromkeys(stand_ins))


def check_patch(key: str, patch: Patch, source: str, version: str = FORMAT_VERSION) -> None:
    """What a patch must be without knowing the model: a well-formed key of its kind, finite floats,
    masks 1-D and within [0, 1]."""
    match = _KEY.match(key)
    if version == "1" and not _VERSION_1_KEY.match(key):
        raise EditFileError(f"{source!r} has tensor {key!r}; a version-1 edit may only hold attn2.to_k/to_v weights")
    if not match:
        raise EditFileError(f"{source!r} has tensor {key!r}, which is not a parameter key (module path ending in "
                            f".weight, .bias, .delta, .output_mask or .input_mask)")
    expected = PATCH_SUFFIXES[match["what"]]
    if patch.kind != expected:
        raise EditFileError(f"{source!r}: tensor {key!r} is marked {patch.kind!r} but a .{match['what']} key holds "
                            f"a {expected!r} patch")
    value = patch.value
    if not value.is_floating_point() or value.numel() == 0:
        raise EditFileError(f"{source!r}: tensor {key!r} is not a non-empty float tensor")
    if not torch.isfinite(value).all():
        raise EditFileError(f"{source!r}: tensor {key!r} has NaN or infinite values")
    if patch.kind == "low_rank":
        if version in ("1", "2"):
            raise EditFileError(f"{source!r}: low-rank patch {key!r} in an edit of format version {version}, which "
                                f"has none (they came with version 3)")
        if value.ndim != 2:
            raise EditFileError(f"{source!r}: low-rank patch {key!r} must be 2-D [rank, d_out + d_in], got shape "
                                f"{tuple(value.shape)}")
    elif patch.kind != "tensor":
        if value.ndim != 1:
            raise EditFileError(f"{source!r}: mask {key!r} must be 1-D (one factor per unit), got shape "
                                f"{tuple(value.shape)}")
        if value.min() < 0 or value.max() > 1:
            raise EditFileError(f"{source!r}: mask {key!r} has values outside [0, 1] "
                                f"(min {float(value.min()):.4g}, max {float(value.max()):.4g})")
