"""SPEED: scalable, precise and efficient concept erasure (Li et al. 2025, arXiv 2503.07392).

The edit is restricted to the (approximate) null space of the retain rows, Δ = Z P, so retain keys
and values are preserved by construction, then solved in closed form with Invariant Equality
Constraints Δ K2 = 0 on the empty prompt's rows:

    M = (C_tt P + α I)⁻¹
    Δ = W (C_at − C_tt) P [I − M K2 (K2ᵀ P M K2 + λ I)⁻¹ K2ᵀ P] M

C_tt = mean_i T_iᵀT_i and C_at = mean_i A_iᵀT_i over target concepts (rows: last subject token, or
rows 1..76 for the target "nudity"). P projects onto the eigenvectors of the retain covariance with
eigenvalue < `threshold`. The retain rows are first filtered by Influence-based Prior Filtering (keep
rows the unconstrained edit D0 moves more than average) and augmented by Directed Prior Augmentation
(rows shifted along W's least-gain direction v, kept when D0 moves them more than their chunk's mean).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from . import ConceptRows, Method, concept_rows, param, register

CHUNK = 128  # the reference's chunk: DPA's filter mean is taken per chunk of the shuffled retain rows
KMEANS_CLUSTERS = 3


@dataclass(frozen=True)
class SpeedParams:
    params: str = param("V", "which projections to edit: values, keys or both", choices=["V", "K", "KV"])
    aug_num: int = param(10, "DPA: augmented copies per retain row (0 also turns IPF off)", min=0, max=1000)
    threshold: float = param(0.1, "eigenvalues of the retain covariance below this span the null space", min=0.0)
    retain_scale: float = param(1.0, "α, the ridge on the null-space edit", min=0.0)
    lamb: float = param(0.0, "λ, softens the invariant equality constraints (0 = exact)", min=0.0)
    disable_filter: bool = param(False, "turn off the initial IPF filter (augmented rows are still filtered)")
    seed: int = param(0, "seeds the retain shuffle, DPA noise and k-means: same seed, bitwise same edit", min=0)


def target_covariances(rows: ConceptRows) -> tuple[torch.Tensor, torch.Tensor]:
    """C_tt = mean_i T_iᵀT_i and C_at = mean_i A_iᵀT_i (SPEED averages over concepts; UCE sums)."""
    c_tt = torch.stack([t.T @ t for t in rows.targets]).mean(0)
    c_at = torch.stack([a.T @ t for a, t in zip(rows.anchors, rows.targets)]).mean(0)
    return c_tt, c_at


def invariant_rows(null: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """K2ᵀ: [BOS row of ''; 3 k-means centres of its rows 1..76], shape [4, d]."""
    return torch.cat([null[:1], kmeans_centres(null[1:], KMEANS_CLUSTERS, generator)])


def kmeans_centres(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 100) -> torch.Tensor:
    """Lloyd's k-means, seeded init from k distinct rows; stops when (Σ‖Δcentre‖)² < 1e-4 like the reference.
    An empty cluster keeps its previous centre instead of becoming NaN."""
    centres = x[torch.randperm(len(x), generator=generator)[:k].to(x.device)].clone()
    for _ in range(iters):
        labels = torch.cdist(x, centres).argmin(1)
        new = centres.clone()
        for j in range(k):
            members = x[labels == j]
            if len(members):
                new[j] = members.mean(0)
        shift = (new - centres).norm(dim=1).sum() ** 2
        centres = new
        if shift < 1e-4:
            break
    return centres


def prior_covariance(retain: torch.Tensor, d0: torch.Tensor, least_gain: torch.Tensor, p: SpeedParams,
                     generator: torch.Generator) -> torch.Tensor:
    """Mean-normalised covariance of the retain rows after IPF and DPA for one layer.

    DPA's augmented row is c' = c + (εᵀv) v with ε ~ N(0, I): only the scalar s = εᵀv ~ N(0, 1) matters,
    so it is drawn directly, and norms and covariance of the c' follow in closed form from c and s.
    """
    d = retain.shape[1]
    if p.aug_num > 0 and not p.disable_filter and len(retain):
        moved = (retain @ d0.T).norm(dim=1)
        retain = retain[moved > moved.mean()]
    cov = retain.new_zeros(d, d)
    count = 0
    d0_v = d0 @ least_gain
    for chunk in retain.split(CHUNK):
        n = len(chunk)
        if p.aug_num == 0:
            cov += chunk.T @ chunk
            count += n
            continue
        s = torch.randn(n, p.aug_num, generator=generator, dtype=torch.float64).to(chunk.device)
        x = chunk @ d0.T
        norms = ((x * x).sum(1, keepdim=True) + 2 * s * (x @ d0_v)[:, None] + s * s * (d0_v @ d0_v)).clamp_min(0).sqrt()
        kept = (norms > norms.mean()).double()
        copies = 1 + kept.sum(1)  # each original row plus its kept augmentations
        shift = (s * kept).sum(1)
        u = chunk.T @ shift
        cov += (chunk.T * copies) @ chunk + torch.outer(u, least_gain) + torch.outer(least_gain, u)
        cov += (s * s * kept).sum() * torch.outer(least_gain, least_gain)
        count += int(copies.sum())
    return cov / max(count, 1)


def null_space_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P onto the eigenvectors of the (symmetric) covariance with eigenvalue < threshold."""
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    basis = eigenvectors[:, eigenvalues < threshold]
    return basis @ basis.T


def speed_delta_map(c_tt: torch.Tensor, c_at: torch.Tensor, projector: torch.Tensor, k2: torch.Tensor,
                    p: SpeedParams) -> torch.Tensor:
    """G with Δ = W G: G = (C_at − C_tt) P [I − M K2 (K2ᵀ P M K2 + λI)⁻¹ K2ᵀ P] M,  M = (C_tt P + αI)⁻¹."""
    d = c_tt.shape[0]
    eye = torch.eye(d, dtype=c_tt.dtype, device=c_tt.device)
    m = torch.linalg.inv(c_tt @ projector + p.retain_scale * eye)
    k2 = k2.T  # [d, 4]
    gram = k2.T @ projector @ m @ k2 + p.lamb * torch.eye(k2.shape[1], dtype=k2.dtype, device=k2.device)
    constraint = m @ k2 @ torch.linalg.pinv(gram, hermitian=False) @ k2.T @ projector
    return (c_at - c_tt) @ projector @ (eye - constraint) @ m


def speed(weights: dict[str, torch.Tensor], rows: ConceptRows, p: SpeedParams) -> dict[str, torch.Tensor]:
    """New weights W + Δ for every given projection, each from the original W."""
    generator = torch.Generator().manual_seed(p.seed)
    retain = rows.retain[torch.randperm(len(rows.retain), generator=generator).to(rows.retain.device)]
    k2 = invariant_rows(rows.null, generator)
    c_tt, c_at = target_covariances(rows)
    eye = torch.eye(c_tt.shape[0], dtype=c_tt.dtype, device=c_tt.device)
    prior_shift = (c_at - c_tt) @ torch.linalg.inv(eye + c_tt)  # D0 = W (C_at − C_tt)(I + C_tt)⁻¹
    uses_priors = p.aug_num > 0
    shared = None
    if not uses_priors:  # without IPF/DPA, P does not depend on W: one map for every layer
        shared = speed_delta_map(c_tt, c_at, null_space_projector(_plain_covariance(retain), p.threshold), k2, p)
    new = {}
    for name, w in weights.items():
        if shared is None:
            least_gain = torch.linalg.svd(w, full_matrices=False).Vh[-1]  # reduced SVD: smallest non-zero σ
            cov = prior_covariance(retain, w @ prior_shift, least_gain, p, generator)
            delta_map = speed_delta_map(c_tt, c_at, null_space_projector(cov, p.threshold), k2, p)
        else:
            delta_map = shared
        new[name] = w + w @ delta_map
    return new


def _plain_covariance(retain: torch.Tensor) -> torch.Tensor:
    return retain.T @ retain / max(len(retain), 1)


def retain_texts_without_targets(retain, targets) -> list[str]:
    """The reference drops retain texts containing any target as a whole word (case-insensitive)."""
    patterns = [re.compile(r"\b" + re.escape(t.lower()) + r"\b") for t in targets]
    return [r for r in retain if not any(pattern.search(r.lower()) for pattern in patterns)]


def _prepare(concepts, p: SpeedParams, encode) -> ConceptRows:
    all_tokens = [t.lower() for t in concepts.targets] == ["nudity"]
    retain = retain_texts_without_targets(concepts.retain, concepts.targets) or [""]
    rows = concept_rows(concepts, encode, all_tokens=all_tokens, retain_texts=[r for r in retain if r])
    if retain == [""]:  # the reference's default retain set: rows 1..76 of the empty prompt
        rows = ConceptRows(rows.targets, rows.anchors, rows.null[1:], rows.null)
    return rows


register(Method(
    name="speed",
    summary="SPEED: null-space constrained closed-form edit with prior filtering (IPF), directed prior "
            "augmentation (DPA) and invariant equality constraints (IEC); retain outputs kept by construction.",
    paper="Li et al., SPEED: Scalable, Precise, and Efficient Concept Erasure for Diffusion Models, 2025",
    params=SpeedParams,
    prepare=_prepare,
    solve=speed,
    edits=lambda p: {"V": ("attn2.to_v",), "K": ("attn2.to_k",), "KV": ("attn2.to_k", "attn2.to_v")}[p.params],
))
