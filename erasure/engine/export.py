"""An edit in the forms other tools load: a LoRA, a baked pipeline folder, or the edited weights alone.

- **LoRA** (`lora_factors` + `save_lora`): every changed weight's ΔW = W′ − W as B·A. Closed-form edits store
  exact factors, so the LoRA is exact at their rank; any other change (a trained dense edit, a mask baked into its
  weight) is factored by SVD. A lower rank truncates the SVD and the relative error ‖ΔW − B A‖ / ‖ΔW‖ is reported
  per layer and overall. Key names: PEFT's, as diffusers' `save_lora_weights` writes them and `load_lora_weights`
  reads them (`unet.<module>.lora_A.weight`), or kohya's (`lora_unet_<module_with_underscores>.lora_down.weight`
  with an `.alpha` equal to the rank, so the scale is 1).
- **Baked** (`save_baked`): the whole pipeline with the edit written in, saved by diffusers' `save_pretrained`, so
  `from_pretrained` loads an edited model with no library.
- **State dict** (`save_edited_weights`): only the weights the edit writes, by the denoiser's state-dict names, for
  `denoiser.load_state_dict(load_file(path), strict=False)`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erasure.engine.apply import applied, check_applicable, effective_parameters, touched_parameters
from erasure.engine.edit import Edit, module_of
from erasure.engine.pipeline import original_parameter, pipeline_state

LORA_FORMATS = ("peft", "kohya")
EXPORT_FORMATS = ("lora", "lora-kohya", "diffusers", "state-dict", "safetensors-delta")
RANK_TOLERANCE = 1e-6  # singular values below this fraction of a layer's largest count as zero (exact rank)


@dataclass
class LoraFactors:
    """Per module: up (B, [d_out, r]) and down (A, [r, d_in]), float32, with ΔW ≈ B A."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    errors: dict[str, float]  # module -> ‖ΔW − B A‖ / ‖ΔW‖ of the factors as computed (float64)
    exact_ranks: dict[str, int]
    change_norms: dict[str, float] = field(default_factory=dict)  # module -> ‖ΔW‖

    @property
    def rank(self) -> int:
        return max((down.shape[0] for _, down in self.factors.values()), default=0)

    @property
    def relative_error(self) -> float:
        """‖ΔW − B A‖ / ‖ΔW‖ over all layers together."""
        total = math.sqrt(sum(n ** 2 for n in self.change_norms.values()))
        missed = math.sqrt(sum((self.errors[m] * n) ** 2 for m, n in self.change_norms.items()))
        return missed / total if total else 0.0

    def report(self) -> dict:
        return {"rank": self.rank, "exact_rank": max(self.exact_ranks.values(), default=0),
                "relative_error": self.relative_error, "layers": len(self.factors),
                "per_layer": {m: {"rank": self.factors[m][1].shape[0], "exact_rank": self.exact_ranks[m],
                                  "relative_error": self.errors[m]} for m in self.factors}}


def lora_factors(pipe, edit: Edit, rank: int | None = None) -> LoraFactors:
    """ΔW of every weight `edit` changes as LoRA factors, at each layer's exact rank (`rank` None) or truncated
    to at most `rank`. Raises ValueError for an edit that changes biases (a LoRA holds weight changes only)."""
    if rank is not None and (isinstance(rank, bool) or rank != int(rank) or rank < 1):
        raise ValueError(f"a LoRA needs a whole-number rank >= 1, got {rank!r}")
    state = pipeline_state(pipe)
    with state.lock:  # base weights read consistently, also while another thread has an edit applied
        check_applicable(pipe, edit)  # made for these base weights (the lock is re-entrant)
        names = touched_parameters(state, edit)
        biases = [n for n in names if not n.endswith(".weight")]
        if biases:
            raise ValueError(f"this {edit.method} edit changes {len(biases)} bias vector(s) (e.g. {biases[0]!r}), "
                             f"which a LoRA cannot hold; export it baked ('diffusers') or as a state dict instead")
        # Stored factors are the change itself, unless a mask also scales that weight; the rest is taken whole.
        masked = {module_of(k) for k, p in edit.patches.items() if p.kind in ("output_mask", "input_mask")}
        factored = {module_of(k) for k, p in edit.patches.items() if p.kind == "low_rank"} - masked
        rows = {n: original_parameter(state, n).shape[0] for n in names}
        highest = max((min(original_parameter(state, n).shape) for n in names), default=0)
        if rank is not None and rank > highest:
            raise ValueError(f"rank {rank} is above the highest rank these layers can have ({highest}); use 0 "
                             f"(each layer's exact rank) or a rank up to {highest}")
        whole = [n for n in names if n.removesuffix(".weight") not in factored]
        values = effective_parameters(state, edit) if whole else {}
        dense = {n: values[n].double().cpu() - original_parameter(state, n).double().cpu() for n in whole}
    out = LoraFactors({}, {}, {})
    for name in names:
        module = name.removesuffix(".weight")
        if name not in dense:  # exact factors
            up, down = (f.double().cpu() for f in edit.patches[f"{module}.delta"].factors(rows[name]))
            u, s, vh = _svd_of_product(up, down)
        else:
            change = dense[name]
            if change.ndim != 2:
                raise ValueError(f"{module!r} has a {change.ndim}-D weight; a LoRA holds changes of linear layers")
            u, s, vh = torch.linalg.svd(change, full_matrices=False)
        exact = int((s > s[0] * RANK_TOLERANCE).sum()) if len(s) and s[0] > 0 else 0
        keep = max(1, min(exact, rank) if rank else exact)
        root = s[:keep].sqrt()
        out.factors[module] = ((u[:, :keep] * root).float(), (root[:, None] * vh[:keep]).float())
        out.change_norms[module] = float(s.norm())
        out.errors[module] = float(s[keep:].norm() / s.norm()) if s.norm() > 0 else 0.0
        out.exact_ranks[module] = exact
    return out


def _svd_of_product(up: torch.Tensor, down: torch.Tensor):
    """SVD of up @ down from two thin QRs and an r×r SVD: exact, and cheap for a thin product."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return q_up @ u, s, vh @ q_down.T


def lora_state_dict(factors: LoraFactors, prefix: str = "unet", style: str = "peft") -> dict[str, torch.Tensor]:
    """Key names by `style`: "peft" (diffusers' own LoRA files) or "kohya" (what most SD UIs write)."""
    if style not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA style {style!r}; choose from {list(LORA_FORMATS)}")
    tensors = {}
    for module, (up, down) in factors.factors.items():
        if style == "peft":
            tensors[f"{prefix}.{module}.lora_A.weight"] = down.contiguous()
            tensors[f"{prefix}.{module}.lora_B.weight"] = up.contiguous()
        else:
            key = f"lora_{prefix}_{module.replace('.', '_')}"
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.lora_up.weight"] = up.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha / rank = 1: B A as it is
    return tensors


def save_lora(pipe, edit: Edit, path: str | Path, rank: int | None = None, style: str = "peft") -> dict:
    """Write the edit as a LoRA .safetensors; returns the report (rank, exact rank, relative error)."""
    from safetensors.torch import save_file

    path = _checked_path(path, ".safetensors")
    factors = lora_factors(pipe, edit, rank)
    report = {**factors.report(), "style": style, "method": edit.method, "targets": edit.targets}
    metadata = {"format": "pt", "erasure_studio": json.dumps({k: v for k, v in report.items() if k != "per_layer"})}
    # LoRA keys start with the denoiser's component name: "unet", or "transformer" on FLUX
    prefix = pipeline_state(pipe).family.denoiser_attr
    save_file(lora_state_dict(factors, prefix, style), str(path), metadata=metadata)
    return report


def save_baked(pipe, edit: Edit, folder: str | Path) -> Path:
    """The whole pipeline with `edit` written in, as a diffusers folder (`from_pretrained` loads it)."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{str(folder)!r} is not empty; baked pipelines are written into a new or empty folder")
    with applied(pipe, edit):
        pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def save_edited_weights(pipe, edit: Edit, path: str | Path) -> Path:
    """The parameters `edit` writes, as they are written, keyed by the denoiser's state-dict names (the UNet's, or
    FLUX's transformer's)."""
    from safetensors.torch import save_file

    path = _checked_path(path, ".safetensors")
    state = pipeline_state(pipe)
    with state.lock:
        check_applicable(pipe, edit)  # an edit of another model is refused, not written onto this one's weights
        values = effective_parameters(state, edit)
    save_file({n: v.detach().cpu().contiguous() for n, v in values.items()}, str(path))
    return path


def export(pipe, edit: Edit, out: str | Path, format: str, rank: int | None = None) -> dict:
    """Write `edit` in `format` (one of EXPORT_FORMATS) to `out`; returns what was written (and the LoRA's
    rank and error)."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose from {list(EXPORT_FORMATS)}")
    if rank is not None and not format.startswith("lora"):
        raise ValueError(f"a rank applies to LoRA exports only, not {format!r}")
    if format.startswith("lora"):
        return {"path": str(out), **save_lora(pipe, edit, out, rank, "kohya" if format == "lora-kohya" else "peft")}
    if format == "diffusers":
        return {"path": str(save_baked(pipe, edit, out))}
    if format == "state-dict":
        return {"path": str(save_edited_weights(pipe, edit, out))}
    check_applicable(pipe, edit)
    return {"path": str(edit.save(out))}


def _checked_path(path: str | Path, suffix: str) -> Path:
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"{path.name!r} must end in {suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
