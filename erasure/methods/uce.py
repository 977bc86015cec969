"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024, arXiv 2308.14761), erase mode.

    min_W'  λ‖W' − W‖² + e Σ_i ‖W' t_i − v*_i‖² + p Σ_j ‖W' p_j − W p_j‖²
    W' = (λW + e Σ_i v*_i t_iᵀ + p Σ_j W p_j p_jᵀ) (λI + e Σ_i t_i t_iᵀ + p Σ_j p_j p_jᵀ)⁻¹      (eq. 7)

Rows are last-subject-token embeddings (the current reference script, uce_sd_erase.py). With
"replace", v*_i = W a_i, so W' = W·M with one d×d map M shared by every edited matrix; either way
W' − W has rank n (the number of targets) and is returned as two thin factors (`uce_changes`).

Deliberate differences from the reference: retain concepts equal to a target (case-insensitive) are
dropped, where the reference keeps them and so asks the solve both to move and to keep the same row;
retain texts are stripped and de-duplicated; concepts are encoded padded to their batch's longest
rather than to 77 tokens (the encoder is causal, so the rows agree up to float round-off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erasure.engine.registry import ConceptRows, LowRankDelta, Method, concept_rows, param, register


@dataclass(frozen=True)
class UCEParams:
    erase_scale: float = param(1.0, "weight e of the target → anchor terms", min=0.0)
    preserve_scale: float = param(1.0, "weight p of the retain (preserve) terms", min=0.0)
    lamb: float = param(0.5, "ridge λ keeping W' close to W; must be > 0 unless rows span the space", min=0.0)
    technique: str = param("replace", "replace: v* = W a; tensor: v* = W a minus its component along W t",
                           choices=["replace", "tensor"])


def uce_normal_matrix(rows: ConceptRows, p: UCEParams) -> torch.Tensor:
    """R = λI + e TᵀT + p PᵀP, the right-hand factor of eq. 7 (shared by every layer)."""
    targets = torch.cat(rows.targets)
    d = targets.shape[1]
    normal = p.lamb * torch.eye(d, dtype=targets.dtype, device=targets.device)
    normal += p.erase_scale * targets.T @ targets
    if rows.retain.numel():
        normal += p.preserve_scale * rows.retain.T @ rows.retain
    return normal


def uce_shared_map(rows: ConceptRows, p: UCEParams) -> torch.Tensor:
    """M with W' = W·M for "replace": M = (λI + e AᵀT + p PᵀP) R⁻¹."""
    targets, anchors = torch.cat(rows.targets), torch.cat(rows.anchors)
    normal = uce_normal_matrix(rows, p)
    left = p.lamb * torch.eye(normal.shape[0], dtype=normal.dtype, device=normal.device)
    left += p.erase_scale * anchors.T @ targets
    if rows.retain.numel():
        left += p.preserve_scale * rows.retain.T @ rows.retain
    # M R = L  <=>  R Mᵀ = Lᵀ  (R is symmetric)
    return _solve(normal, left.T).T


def uce_changes(weights: dict[str, torch.Tensor], rows: ConceptRows, p: UCEParams) -> dict[str, LowRankDelta]:
    """W' − W for every given projection, as factors of rank n (the number of target rows).

    Eq. 7 minus W·R gives (W' − W) R = e (V − W Tᵀ)ᵀ T, with V the rows' values [n, d_out]; so
    W' − W = [e (Vᵀ − W Tᵀ)] · [T R⁻¹]. The right factor is shared by every layer; for "replace", V = A Wᵀ
    and the left factor is e W (A − T)ᵀ."""
    targets, anchors = torch.cat(rows.targets), torch.cat(rows.anchors)
    down = _solve(uce_normal_matrix(rows, p), targets.T).T  # T R⁻¹ (R is symmetric)
    changes = {}
    for name, w in weights.items():
        values = anchors @ w.T  # [n, d_out]: v = W a
        if p.technique == "tensor":  # drop each value's component along its target's own output
            directions = targets @ w.T
            directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
            values = values - (values * directions).sum(1, keepdim=True) * directions
        changes[name] = LowRankDelta(p.erase_scale * (values - targets @ w.T).T, down)
    return changes


def uce(weights: dict[str, torch.Tensor], rows: ConceptRows, p: UCEParams) -> dict[str, torch.Tensor]:
    """New weights for every given projection (all computed from the original W)."""
    return {name: weights[name] + change.dense() for name, change in uce_changes(weights, rows, p).items()}


def _solve(normal: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    try:
        return torch.linalg.solve(normal, rhs)
    except torch.linalg.LinAlgError:
        raise ValueError("UCE's system is singular: with lamb = 0 the target and retain rows must span the "
                         "embedding space; use lamb > 0") from None


def _prepare(concepts, p: UCEParams, encode) -> ConceptRows:
    return concept_rows(concepts, encode)


register(Method(
    name="uce",
    summary="Unified Concept Editing: one closed-form ridge regression mapping each target's key/value to "
            "its anchor's while keeping retain concepts' outputs.",
    paper="Gandikota et al., Unified Concept Editing in Diffusion Models, WACV 2024",
    params=UCEParams,
    prepare=_prepare,
    solve=uce_changes,
    edits=lambda p: ("attn2.to_k", "attn2.to_v"),
))
