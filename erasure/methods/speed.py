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

import hashlib
import re
import threading
from dataclasses import dataclass

import torch

from . import ConceptRows, Method, concept_rows, param, register

LEAST_GAIN_CACHE: dict[tuple, torch.Tensor] = {}
LEAST_GAIN_LOCK = threading.Lock()
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


def invariant_rows(null: torch.Tensor, seed: int) -> torch.Tensor:
    """K2ᵀ: [BOS row of ''; 3 k-means centres of its rows 1..76], shape [4, d]."""
    generator = torch.Generator().manual_seed(seed)
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


def least_gain_direction(w: torch.Tensor) -> torch.Tensor:
    """v: the right singular vector of W's smallest singular value in the *reduced* SVD (for a wide W,
    the smallest non-zero one), from an eigendecomposition of the smaller Gram matrix.

    It depends on W alone, and the base weights do not change between edits, so it is memoised by the
    tensor's bytes: a second edit of the same pipeline skips these eigendecompositions (half SPEED's time).
    """
    key = (tuple(w.shape), hashlib.blake2b(w.detach().cpu().numpy().tobytes(), digest_size=20).digest())
    with LEAST_GAIN_LOCK:
        cached = LEAST_GAIN_CACHE.get(key)
    if cached is not None:
        return cached.to(w.device)
    if w.shape[0] < w.shape[1]:
        u = torch.linalg.eigh(w @ w.T).eigenvectors[:, 0]
        v = w.T @ u
        v = v / v.norm()
    else:
        v = torch.linalg.eigh(w.T @ w).eigenvectors[:, 0]
    with LEAST_GAIN_LOCK:
        LEAST_GAIN_CACHE[key] = v
        while len(LEAST_GAIN_CACHE) > 512:
            LEAST_GAIN_CACHE.pop(next(iter(LEAST_GAIN_CACHE)))
    return v


@dataclass(frozen=True)
class PriorRows:
    """The retain covariance of one layer as cov = Xᵀ D X / count, X = kept retain rows (+ v)."""
    rows: torch.Tensor  # [r, d]
    weights: torch.Tensor  # [r, r] symmetric D
    count: float


def prior_rows(retain: torch.Tensor, moved: torch.Tensor, moved_v: torch.Tensor, least_gain: torch.Tensor,
               p: SpeedParams, generator: torch.Generator) -> PriorRows:
    """Retain rows after IPF and DPA for one layer, with D0 c given as `moved` ([m, d_out]) and D0 v as `moved_v`.

    DPA's augmented row is c' = c + (εᵀv) v with ε ~ N(0, I): only the scalar s = εᵀv ~ N(0, 1) matters,
    so it is drawn directly, and the norms ‖D0 c'‖ and covariance of the kept c' follow in closed form.
    """
    if p.aug_num > 0 and not p.disable_filter and len(retain):
        norms = moved.norm(dim=1)
        keep = norms > norms.mean()
        retain, moved = retain[keep], moved[keep]
    if p.aug_num == 0:
        return PriorRows(retain, torch.eye(len(retain), dtype=retain.dtype, device=retain.device), len(retain))
    copies, shifts, shift_squares = [], [], retain.new_zeros(())
    for chunk in moved.split(CHUNK):
        s = torch.randn(len(chunk), p.aug_num, generator=generator, dtype=torch.float64).to(chunk.device)
        norms = ((chunk * chunk).sum(1, keepdim=True) + 2 * s * (chunk @ moved_v)[:, None]
                 + s * s * (moved_v @ moved_v)).clamp_min(0).sqrt()
        kept = (norms > norms.mean()).double()  # the chunk's mean over all its augmented rows
        copies.append(1 + kept.sum(1))  # each original row plus its kept augmentations
        shifts.append((s * kept).sum(1))
        shift_squares = shift_squares + (s * s * kept).sum()
    copies = torch.cat(copies) if copies else retain.new_zeros(0)
    shifts = torch.cat(shifts) if shifts else retain.new_zeros(0)
    r = len(retain)
    weights = retain.new_zeros(r + 1, r + 1)
    weights[:r, :r] = torch.diag(copies)
    weights[:r, r] = weights[r, :r] = shifts
    weights[r, r] = shift_squares
    return PriorRows(torch.cat([retain, least_gain[None]]), weights, float(copies.sum()))


def kept_basis(prior: PriorRows, threshold: float) -> torch.Tensor:
    """Orthonormal basis [d, k] of the covariance's eigenvectors with eigenvalue >= threshold: the
    complement of SPEED's null space, so P = I − B Bᵀ. Through a QR of the rows when they are fewer than d
    (every direction outside their span has eigenvalue 0), else a full eigendecomposition."""
    d = prior.rows.shape[1]
    eye = torch.eye(d, dtype=prior.rows.dtype, device=prior.rows.device)
    if threshold <= 0:
        return eye  # no eigenvalue is < 0: the null space is empty and nothing may change
    if len(prior.rows) == 0:
        return eye[:, :0]
    if len(prior.rows) < d:
        q, r = thin_qr(prior.rows.T)  # rowsᵀ = Q R, so cov = Q (R D Rᵀ / count) Qᵀ
        values, vectors = torch.linalg.eigh(r @ prior.weights @ r.T / prior.count)
        return q @ vectors[:, values >= threshold]
    values, vectors = torch.linalg.eigh(prior.rows.T @ prior.weights @ prior.rows / prior.count)
    return vectors[:, values >= threshold]


def thin_qr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q R of a tall matrix by CholeskyQR2 (two Cholesky passes: matrix products, several times faster
    than Householder QR on a CPU, and as accurate while x is well conditioned); Householder when the
    columns are too close to dependent for that (Q then fails the orthonormality check)."""
    q, r = x, None
    for _ in range(2):
        factor, info = torch.linalg.cholesky_ex(q.T @ q)
        if info.item() != 0:
            return torch.linalg.qr(x)
        q = torch.linalg.solve_triangular(factor, q.T, upper=False).T  # q L⁻ᵀ
        r = factor.T if r is None else factor.T @ r
    eye = torch.eye(q.shape[1], dtype=q.dtype, device=q.device)
    if (q.T @ q - eye).abs().max() > 1e-12:
        return torch.linalg.qr(x)
    return q, r


def speed_update_rows(targets: torch.Tensor, n_concepts: int, basis: torch.Tensor, k2: torch.Tensor,
                      p: SpeedParams) -> torch.Tensor:
    """Y = T P [I − M K2 (K2ᵀ P M K2 + λI)⁻¹ K2ᵀ P] M, so that Δ = W (C_at − C_tt) P [...] M = W Eᵀ Y / N
    with E = A − T. M = (C_tt P + αI)⁻¹ is applied by Woodbury: C_tt P = Tᵀ (T P) / N has rank <= rows of T."""
    def project(x):  # x P, with P = I − B Bᵀ
        return x - (x @ basis) @ basis.T

    tp = project(targets)
    inner = torch.linalg.inv(p.retain_scale * torch.eye(len(targets), dtype=targets.dtype, device=targets.device)
                             + tp @ targets.T / n_concepts)

    def times_m(x):  # x M = (x − (x Tᵀ/N) (αI + T P Tᵀ/N)⁻¹ T P) / α
        return (x - (x @ targets.T / n_concepts) @ inner @ tp) / p.retain_scale

    tpm, k2pm = times_m(tp), times_m(project(k2))
    gram = k2pm @ k2.T + p.lamb * torch.eye(len(k2), dtype=k2.dtype, device=k2.device)
    # pinv: with retain [""] the k-means centres lie in the retained span, so the Gram is singular at λ = 0
    return tpm - (tpm @ k2.T) @ torch.linalg.pinv(gram) @ k2pm


def speed(weights: dict[str, torch.Tensor], rows: ConceptRows, p: SpeedParams) -> dict[str, torch.Tensor]:
    """New weights W + Δ for every given projection, each from the original W."""
    if p.retain_scale <= 0:
        raise ValueError("SPEED parameter 'retain_scale' must be > 0: M = (C_tt P + αI)⁻¹ is singular at α = 0")
    generator = torch.Generator().manual_seed(p.seed)
    retain = rows.retain[torch.randperm(len(rows.retain), generator=generator).to(rows.retain.device)]
    k2 = invariant_rows(rows.null, p.seed)
    n = len(rows.targets)
    targets, errors = torch.cat(rows.targets), torch.cat(rows.anchors) - torch.cat(rows.targets)
    eye = torch.eye(targets.shape[1], dtype=targets.dtype, device=targets.device)
    # D0 = W (C_at − C_tt)(I + C_tt)⁻¹ = W Eᵀ T (I + TᵀT/N)⁻¹ / N: rows of D0 inputs live in span(E)
    prior_coefficients = targets @ torch.linalg.inv(eye + targets.T @ targets / n) / n  # [n_t, d]
    retain_coefficients = retain @ prior_coefficients.T  # [m, n_t]: D0 c = (W Eᵀ) coefficients
    uses_priors = p.aug_num > 0
    shared = None
    if not uses_priors:  # without IPF/DPA, P does not depend on W: one update for every layer
        prior = PriorRows(retain, torch.eye(len(retain), dtype=retain.dtype, device=retain.device), len(retain))
        shared = speed_update_rows(targets, n, kept_basis(prior, p.threshold), k2, p)
    new = {}
    for name, w in weights.items():
        w_errors = errors @ w.T  # [n_t, d_out]: W Eᵀ, transposed
        if shared is None:
            v = least_gain_direction(w)
            prior = prior_rows(retain, retain_coefficients @ w_errors, (prior_coefficients @ v) @ w_errors, v, p,
                               generator)
            update = speed_update_rows(targets, n, kept_basis(prior, p.threshold), k2, p)
        else:
            update = shared
        new[name] = w + w_errors.T @ update / n
    return new


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
