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
from dataclasses import dataclass

import torch

from erasure.engine.lru import LRU
from erasure.engine.registry import ConceptRows, LowRankDelta, Method, concept_rows, param, register

LEAST_GAIN_CACHE: LRU[torch.Tensor] = LRU(max_items=512)  # a few KiB each: 16-32 per loaded model
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
    """K2ᵀ: [BOS row of ''; 3 k-means centres of its rows 1..76], shape [4, d]. (On T5, which has no BOS, row 0
    is the empty prompt's EOS: kept exactly as well, the rest clustered.)"""
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
    the smallest non-zero one), from the smallest eigenpair of the smaller Gram matrix G (W Wᵀ or Wᵀ W).

    Its sign is canonical: the component of largest magnitude is positive (eigensolvers return ±v at
    will). The sign matters for a fixed seed: DPA's kept draws depend on ‖D0 (c + s v)‖, whose cross term
    2 s (D0 c)·(D0 v) flips with v, so ±v give the same distribution of edits but different ones per seed.

    It depends on W alone, and the base weights do not change between edits, so it is memoised by the
    tensor's bytes: a second edit of the same pipeline skips these eigenproblems.
    """
    data = w.detach().cpu().contiguous().numpy()
    key = (tuple(w.shape), hashlib.sha256(memoryview(data).cast("B")).digest())
    cached = LEAST_GAIN_CACHE.get(key)
    if cached is not None:
        return cached.to(w.device)
    if w.shape[0] < w.shape[1]:
        v = w.T @ smallest_eigenvector(gram_matrix(w.T))
        v = v / v.norm()
    else:
        v = smallest_eigenvector(gram_matrix(w))
    v = v * v[v.abs().argmax()].sign()
    LEAST_GAIN_CACHE[key] = v
    return v


def gram_matrix(a: torch.Tensor) -> torch.Tensor:
    """aᵀa for a [m, d], exactly symmetric, from 3 of the 4 blocks of a 2×2 split: matmul does not exploit
    symmetry, so this is a quarter fewer flops (about a third less time for a 1280×768 W on 2 cores)."""
    h = a.shape[1] // 2
    left, right = a[:, :h], a[:, h:]
    out = a.new_empty(a.shape[1], a.shape[1])
    out[:h, :h] = left.T @ left
    out[h:, :h] = right.T @ left
    out[:h, h:] = out[h:, :h].T
    out[h:, h:] = right.T @ right
    return out


LANCZOS_MIN_SIZE = 256  # below this a full eigh is about as fast as the iteration
LANCZOS_MAX_STEPS = 200  # the bench's SD-1.4 to_v Grams need 30-60; past ~200 a full eigh is cheaper
LANCZOS_CHECK_EVERY = 5


def smallest_eigenvector(gram: torch.Tensor) -> torch.Tensor:
    """Unit eigenvector of the smallest eigenvalue of a symmetric positive (semi)definite matrix G.

    Lanczos on G⁻¹ (two triangular solves with G's Cholesky factor per step, full reorthogonalisation,
    fixed start): a weight's smallest eigenvalues are clustered (λ₁/λ₂ from 0.8 to 0.997 for the bench's
    random-weight SD-1.4 to_v), which G⁻¹ turns into a dominant, separated one, so 30-60 steps replace
    a full d×d eigendecomposition (3-4× faster for d = 640, 768). The result is verified before use:
    its residual ‖Gy − λy‖ must be at a dense eigensolver's level, and G − (λ − δ)I must be positive
    definite, δ a small multiple of the round-off in G, so that no eigenvalue lies below the one found
    (Lanczos from a start nearly orthogonal to the wanted vector can converge to the next one first).
    Small or singular G, no convergence or a failed check: torch.linalg.eigh.
    """
    if len(gram) >= LANCZOS_MIN_SIZE:
        factor, info = torch.linalg.cholesky_ex(gram)
        if info.item() == 0:
            found = lanczos_smallest(gram, factor)
            if found is not None:
                return found
    return torch.linalg.eigh(gram).eigenvectors[:, 0]


def lanczos_smallest(gram: torch.Tensor, factor: torch.Tensor,
                     start: torch.Tensor | None = None) -> torch.Tensor | None:
    """The verified smallest eigenvector of G = factor factorᵀ (see smallest_eigenvector), or None.
    `start` defaults to a fixed pseudo-random vector, so the result is deterministic."""
    d, dtype, device = len(gram), gram.dtype, gram.device
    eps = torch.finfo(dtype).eps
    steps = min(LANCZOS_MAX_STEPS, d)
    if start is None:
        start = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    basis = gram.new_empty(steps, d)
    basis[0] = start / start.norm()
    alphas, betas = [], []
    for j in range(steps):
        # G⁻¹ q_j as L⁻ᵀ (L⁻¹ q_j) (cholesky_solve would copy L on every call)
        z = torch.linalg.solve_triangular(factor, basis[j, :, None], upper=False)
        z = torch.linalg.solve_triangular(factor.mT, z, upper=True)[:, 0]
        alphas.append(float(basis[j] @ z))
        done = basis[: j + 1]
        z = z - done.T @ (done @ z)  # classical Gram-Schmidt twice: orthogonal to working precision
        z = z - done.T @ (done @ z)
        betas.append(float(z.norm()))
        exhausted = betas[-1] <= eps * abs(alphas[-1]) or j + 1 == steps  # invariant subspace, or the last step
        if not exhausted:
            basis[j + 1] = z / betas[-1]
            if j + 1 < 10 or (j + 1) % LANCZOS_CHECK_EVERY:
                continue
        off = torch.tensor(betas[:-1], dtype=dtype)
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=dtype)) + torch.diag(off, 1) + torch.diag(off, -1)
        thetas, vectors = torch.linalg.eigh(tridiagonal)  # Ritz values of G⁻¹, ascending
        # the Ritz pair (θ, y = Q s) of G⁻¹ has ‖G⁻¹y − θy‖ = |β_j s_j|, so ‖Gy − y/θ‖ <= ‖G‖ |β_j s_j| / θ
        converged = abs(betas[-1] * float(vectors[-1, -1])) <= eps * float(thetas[-1])
        if not converged and not exhausted:
            continue
        y = done.T @ vectors[:, -1].to(device)
        y = y / y.norm()
        gy = gram @ y
        value = y @ gy
        scale = torch.linalg.matrix_norm(gram)  # >= ‖G‖₂
        if (gy - value * y).norm() > 64 * eps * scale:
            return None  # not converged, or orthogonality lost: not to working precision
        shifted = gram.clone()
        shifted.diagonal().sub_(value - 1000 * d * eps * scale)
        if torch.linalg.cholesky_ex(shifted).info.item() != 0:
            return None  # an eigenvalue below the one found
        return y
    return None


@dataclass(frozen=True)
class PriorRows:
    """The retain covariance of one layer as cov = Yᵀ Y / count with Y = diag(scale) X + border ⊗ X[-1]:
    X = the kept retain rows, plus v as the last row when DPA augments them. Row i of Y is
    √copies_i c_i + (shifts_i / √copies_i) v, and its last row √(Σs² − Σ shifts²/copies) v, so that YᵀY
    is the sum over every kept row and augmented copy c + s v (a factor of DPA's weights, no r×r matrix)."""
    rows: torch.Tensor  # X [r, d]
    scale: torch.Tensor  # [r]
    border: torch.Tensor | None  # [r]: each row's multiple of X[-1] (v); None when rows are not augmented
    count: float
    gram: torch.Tensor | None = None  # X Xᵀ [r, r] when already known

    def factor_rows(self) -> torch.Tensor:
        y = self.scale[:, None] * self.rows
        return y if self.border is None else y + self.border[:, None] * self.rows[-1]


def prior_rows(retain: torch.Tensor, coefficients: torch.Tensor, v_coefficients: torch.Tensor, w_errors: torch.Tensor,
               least_gain: torch.Tensor, p: SpeedParams, generator: torch.Generator,
               retain_gram: torch.Tensor | None = None) -> PriorRows:
    """Retain rows after IPF and DPA for one layer. D0 c = coefficients_c @ w_errors ([m, n_t] @ [n_t, d_out])
    and D0 v = v_coefficients @ w_errors; only their norms and inner products are used, so with fewer
    targets than outputs they come from the n_t×n_t metric w_errors w_errorsᵀ without forming D0 c.
    `retain_gram` (retain retainᵀ), when given, yields the kept rows' Gram without another product.

    DPA's augmented row is c' = c + (εᵀv) v with ε ~ N(0, I): only the scalar s = εᵀv ~ N(0, 1) matters,
    so it is drawn directly, and the norms ‖D0 c'‖ and covariance of the kept c' follow in closed form.
    """
    if coefficients.shape[1] < w_errors.shape[1]:
        metric = w_errors @ w_errors.T
        weighted = coefficients @ metric
        squares = (weighted * coefficients).sum(1).clamp_min(0)  # ‖D0 c‖²
        cross = weighted @ v_coefficients  # (D0 c)·(D0 v)
        v_square = v_coefficients @ metric @ v_coefficients
    else:
        moved, moved_v = coefficients @ w_errors, v_coefficients @ w_errors
        squares, cross, v_square = (moved * moved).sum(1), moved @ moved_v, moved_v @ moved_v
    keep = None
    if p.aug_num > 0 and not p.disable_filter and len(retain):
        norms = squares.sqrt()
        keep = (norms > norms.mean()).nonzero().squeeze(1)
        retain, squares, cross = retain[keep], squares[keep], cross[keep]
    gram = None
    if retain_gram is not None:
        gram = retain_gram if keep is None else retain_gram.index_select(0, keep).index_select(1, keep)
    if p.aug_num == 0:
        return PriorRows(retain, retain.new_ones(len(retain)), None, len(retain), gram)
    copies, shifts, shift_squares = [], [], retain.new_zeros(())
    for chunk_squares, chunk_cross in zip(squares.split(CHUNK), cross.split(CHUNK)):
        s = torch.randn(len(chunk_squares), p.aug_num, generator=generator, dtype=torch.float64).to(retain.device)
        norms = (chunk_squares[:, None] + 2 * s * chunk_cross[:, None] + s * s * v_square).clamp_min(0).sqrt()
        kept = (norms > norms.mean()).double()  # the chunk's mean over all its augmented rows
        copies.append(1 + kept.sum(1))  # each original row plus its kept augmentations
        shifts.append((s * kept).sum(1))
        shift_squares = shift_squares + (s * s * kept).sum()
    copies = torch.cat(copies) if copies else retain.new_zeros(0)
    shifts = torch.cat(shifts) if shifts else retain.new_zeros(0)
    roots = copies.sqrt()
    # Σs² >= Σ shifts²/copies by Cauchy-Schwarz (copies = 1 + kept draws): clamp only round-off
    rest = (shift_squares - (shifts * shifts / copies).sum()).clamp_min(0).sqrt()
    rows = torch.cat([retain, least_gain[None]])
    if gram is not None:
        cross = retain @ least_gain
        gram = torch.cat([torch.cat([gram, cross[:, None]], 1),
                          torch.cat([cross, (least_gain @ least_gain)[None]])[None]])
    return PriorRows(rows, torch.cat([roots, rest[None]]), torch.cat([shifts / roots, shifts.new_zeros(1)]),
                     float(copies.sum()), gram)


def kept_basis(prior: PriorRows, threshold: float) -> torch.Tensor:
    """Orthonormal basis [d, k] of the covariance's eigenvectors with eigenvalue >= threshold: the
    complement of SPEED's null space, so P = I − B Bᵀ.

    With fewer rows than d (every direction outside their span has eigenvalue 0) through the r×r matrix
    S = Y Yᵀ / count, which has cov's non-zero eigenvalues: cov (Yᵀu) = μ Yᵀu for S u = μ u. The kept
    vectors Yᵀu/√(μ count) are orthonormal up to round-off scaled by √(‖cov‖/μ); one Cholesky QR pass
    makes them so to working precision without changing their span. Else a full d×d eigendecomposition.
    """
    rows = prior.rows
    d = rows.shape[1]
    eye = torch.eye(d, dtype=rows.dtype, device=rows.device)
    if threshold <= 0:
        return eye  # no eigenvalue is < 0: the null space is empty and nothing may change
    if len(rows) == 0:
        return eye[:, :0]
    if len(rows) >= d:
        y = prior.factor_rows()
        values, vectors = torch.linalg.eigh(gram_matrix(y) / prior.count)
        return vectors[:, values >= threshold]
    gram = gram_matrix(rows.T) if prior.gram is None else prior.gram
    # S = M K Mᵀ for Y = M X, M = diag(a) + b e_lastᵀ: (a aᵀ)∘K + (a∘K_l) bᵀ + b (a∘K_l)ᵀ + K_ll b bᵀ
    a, b = prior.scale, prior.border
    s = a[:, None] * gram * a[None, :]
    if b is not None:
        side = a * gram[:, -1]
        s += side[:, None] * b[None, :] + b[:, None] * side[None, :] + gram[-1, -1] * b[:, None] * b[None, :]
    values, vectors = torch.linalg.eigh(s / prior.count)
    chosen = values >= threshold
    values, vectors = values[chosen], vectors[:, chosen]
    mixed = a[:, None] * vectors  # Mᵀ U, so that Yᵀ U = Xᵀ (Mᵀ U)
    if b is not None:
        mixed[-1] += b @ vectors
    basis = rows.T @ (mixed / (values * prior.count).sqrt())
    return orthonormalise(basis)


def orthonormalise(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of span(x) for nearly orthonormal columns: one Cholesky QR pass (x L⁻ᵀ with
    L Lᵀ = xᵀx), or Householder QR when xᵀx is too ill-conditioned for it."""
    if x.shape[1] == 0:
        return x
    gram = gram_matrix(x)
    # one pass leaves QᵀQ − I of order ε κ(x)²: working precision while xᵀx is within 1e-6 of I
    if (gram - torch.eye(len(gram), dtype=gram.dtype, device=gram.device)).abs().max() <= 1e-6:
        factor, info = torch.linalg.cholesky_ex(gram)
        if info.item() == 0:
            return torch.linalg.solve_triangular(factor, x.T, upper=False).T
    return torch.linalg.qr(x).Q


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
    return {name: weights[name] + change.dense() for name, change in speed_changes(weights, rows, p).items()}


def speed_changes(weights: dict[str, torch.Tensor], rows: ConceptRows, p: SpeedParams) -> dict[str, LowRankDelta]:
    """Δ = (W Eᵀ / N) · Y for every given projection, each from the original W: factors of rank n_t (the
    number of target rows)."""
    if p.retain_scale <= 0:
        raise ValueError("SPEED parameter 'retain_scale' must be > 0: M = (C_tt P + αI)⁻¹ is singular at α = 0")
    generator = torch.Generator().manual_seed(p.seed)
    retain = rows.retain[torch.randperm(len(rows.retain), generator=generator).to(rows.retain.device)]
    k2 = invariant_rows(rows.null, p.seed)
    n = len(rows.targets)
    targets, errors = torch.cat(rows.targets), torch.cat(rows.anchors) - torch.cat(rows.targets)
    # D0 = W (C_at − C_tt)(I + C_tt)⁻¹ = W Eᵀ T (I + TᵀT/N)⁻¹ / N: rows of D0 inputs live in span(E).
    # T (I + TᵀT/N)⁻¹ / N = (N I + T Tᵀ)⁻¹ T (push-through): an n_t × n_t solve instead of a d × d inverse
    eye = torch.eye(len(targets), dtype=targets.dtype, device=targets.device)
    prior_coefficients = torch.linalg.solve(n * eye + targets @ targets.T, targets)  # [n_t, d]
    retain_coefficients = retain @ prior_coefficients.T  # [m, n_t]: D0 c = (W Eᵀ) coefficients
    uses_priors = p.aug_num > 0
    shared = retain_gram = None
    if not uses_priors:  # without IPF/DPA, P does not depend on W: one update for every layer
        prior = PriorRows(retain, retain.new_ones(len(retain)), None, len(retain))
        shared = speed_update_rows(targets, n, kept_basis(prior, p.threshold), k2, p)
    elif len(retain) < retain.shape[1] and len(weights) > 1:
        retain_gram = gram_matrix(retain.T)  # every layer's kept rows are a subset: their Gram is indexed from it
    new = {}
    for name, w in weights.items():
        w_errors = errors @ w.T  # [n_t, d_out]: W Eᵀ, transposed
        if shared is None:
            v = least_gain_direction(w)
            prior = prior_rows(retain, retain_coefficients, prior_coefficients @ v, w_errors, v, p, generator,
                               retain_gram)
            update = speed_update_rows(targets, n, kept_basis(prior, p.threshold), k2, p)
        else:
            update = shared
        new[name] = LowRankDelta(w_errors.T / n, update)
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
        rows = ConceptRows(rows.targets, rows.anchors, rows.null[rows.start:], rows.null, rows.start)
    return rows


register(Method(
    name="speed",
    summary="SPEED: null-space constrained closed-form edit with prior filtering (IPF), directed prior "
            "augmentation (DPA) and invariant equality constraints (IEC); retain outputs kept by construction.",
    paper="Li et al., SPEED: Scalable, Precise, and Efficient Concept Erasure for Diffusion Models, 2025",
    params=SpeedParams,
    prepare=_prepare,
    solve=speed_changes,
    edits=lambda p: {"V": ("attn2.to_v",), "K": ("attn2.to_k",), "KV": ("attn2.to_k", "attn2.to_v")}[p.params],
))
