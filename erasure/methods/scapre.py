"""ScaPre: Forget Many, Forget Right (Deng et al., ICLR 2026, arXiv 2601.06162), both released variants.

Token pairs (UCE-style): X_i = rows of target i from its last content token on (EOS and padding
included), N_i = rows of its guide from the guide's last content token on, both trimmed to one length;
the empty anchor is the reference's guide " " (same tokens as ""), whose slice starts at BOS. The
concept vector is c_i = X_i[0], the negative e = row 1 (EOS) of the empty prompt. With "replace" a
guide row's value is v = W n; with "tensor" V_i = N_i Wᵀ minus its component along the Frobenius-
normalised X_i Wᵀ (one scalar per concept). Retain concepts are not used by ScaPre: the reference
computes a retain list and never reads it.

Informax decoupler (MI soft mask), per row j and concept i: five samples c_i + σε and five e + σε,
a = W x, z = [a > lower median of the row's ten], MI_j = plug-in mutual information of (z, label)
with 1e-8 added to each count, then r_j = sigmoid(zscore_j(MI) / 0.7)^p (unbiased std over rows).
Entropy factor: a = W(c_i + σε) for `entropy_samples` draws per concept, min-max normalised per row,
a `bins`-bin histogram on [0, 1] as torch.histc bins it (bin ⌊x·bins⌋, x = 1 in the last bin),
e_j = 1 − H_j / log(bins).

`scapre` (edit/erase.py), per matrix:
    W_new = [λW + s Σ_i diag(r_i) Σ_t v_t x_tᵀ − s_res W P C Cᵀ P] (λI + C Cᵀ + s Σ_t x_t x_tᵀ)⁻¹
    W' = diag(α) W_new + diag(1 − α) W,  α = α_min + (1 − α_min) e
with C = [c_1..c_m]; the SSA-SVD term only with `svd`: C = U S Vᵀ, P = I − U diag(w) Uᵀ,
w = sigmoid((S − median S) / T_σ)^p_σ.

`scapre_scale` (edit/erase_scale.py), per matrix: H = clamp(1 − e, 0, 1), μ = mean H, then per row j
    w_j = M_j⁻¹ b_j,  M_j = (λ+μ)I + R + C Cᵀ + S + α_j Π_C,  b_j = (λ+μ) w0_j + V_j
with S = s Σ x xᵀ, V = s Σ_i diag(r_i) Σ_t v xᵀ (r_i = 1 without `use_mi_softmask`), α_j = s max_i r'_ij
from a second, independent draw of the masks (1 without the mask), Π_C = C (CᵀC + 1e-8 I)⁻¹ Cᵀ and the
ASED regulariser R = μ U diag(1 − sigmoid((S − median S) / T_σ)^p_σ) Uᵀ (zero without `enable_ased`).
Then the "Bures prox" blends each row's norm and direction back towards w0_j, and EGBR optionally
interpolates direction and log squared norm with weight 1 − exp(−H_j / max H).

Oddities of the reference kept on purpose (the edit should be the reference's edit):
- the normal matrix has a C Cᵀ term with no numerator partner: an extra weight-1 pull of every concept
  token's output to zero, on top of the guided pairs;
- the MI mask scales only the guided values, not the matching x xᵀ terms, so rows are pulled towards
  r ⊙ W n rather than W n; with r ≈ 0.3 (p = 2, most rows saturated) that mostly shrinks the targets'
  keys and values, and ‖W'X − WN‖ can grow while ‖W'X − r ⊙ WN‖ falls;
- the "Bures prox" computes no Bures distance: it is a fixed-point heuristic on norm and direction,
  `bures_iters` rounds (at least one, as in the reference);
- medians are torch.median's lower median; MI counts carry eps = 1e-8 while the sample count stays 10;
  the z-score uses the unbiased std plus 1e-8; the MI temperature is fixed at 0.7;
- histograms follow torch.histc (the top value of a row, x = 1, falls in the last bin).
Ours differs only where the reference has no defined value or cannot be repeated: noise comes from
`torch.Generator().manual_seed(seed)` as float32 standard normals (the reference's is unseeded; see
`layer_noise`), all algebra is float64 from the original weights (the reference uses fp32 and
`torch.inverse`), each matrix is edited from the pipeline's original weights, never from a previous
edit, and one prompt per concept is used (the reference's `--add_prompts` templates are off by default).

Vectorised: MI statistics as [m, d_out, 10] tensors, histograms by index counting; `scapre` shares one
inverse across matrices, `scapre_scale` one eigendecomposition (only μ differs between matrices) plus a
Woodbury correction for the per-row rank-r term α_j Π_C. Guide rows shared by many concepts (the empty
anchor) are multiplied by W once, and the masked value sum splits into the mask's most common value per
concept (computed at the cost of one guide) plus the few rows where the mask differs (MI takes few
values; with small σ nearly all rows separate perfectly: about 3.5% differ on SD-1.4's layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from erasure.engine.registry import ConceptRows, Method, param, register

EPS = 1e-8  # the reference's eps: MI counts, z-score, min-max normalisation, norms, Π_C, spectral gates
MI_SAMPLES = 5  # positives (and as many negatives) per concept and row
MI_TEMPERATURE = 0.7  # T of the MI soft mask, fixed in the reference
SCALE_MU_FALLBACK = 0.1  # μ when it is not taken from the entropy (the reference function's fallback)


@dataclass(frozen=True)
class ScaPreParams:
    erase_scale: float = param(1.0, "s, weight of the target → guide pairs (reference CLI 1; function default 0.1)",
                               min=0.0)
    lamb: float = param(0.5, "λ, ridge keeping W' close to W (hard-coded 0.5 in the reference script; function "
                             "default 0.1)", min=0.0)
    p: float = param(2.0, "exponent p of the MI soft mask sigmoid(z/0.7)^p: higher = smaller guided values, "
                          "sharper contrast between rows (0 turns the mask off)", min=0.0)
    alpha_min: float = param(0.1, "entropy rollback: row weight of the edit is α_min + (1 − α_min)·e_j "
                                  "(1 = no rollback)", min=0.0, max=1.0)
    entropy_samples: int = param(20, "noisy samples per concept for the row entropy (reference CLI 20; function "
                                      "default 50)", min=1, max=200)
    entropy_bins: int = param(20, "histogram bins of the row entropy", min=2, max=1000)
    noise_sigma: float = param(0.01, "σ of the Gaussian noise on concept vectors (MI and entropy samples; the MI "
                                     "helper's own default 0.05 is never used)", min=0.0)
    svd: bool = param(False, "SSA-SVD: also subtract s_res·W P C Cᵀ P, the concepts' weakly-gated spectral residual")
    res_scale: float = param(-1.0, "s_res of the SSA-SVD step; < 0 means erase_scale (the reference's None)")
    T_sigma: float = param(1.0, "SSA-SVD spectral temperature (larger = smoother gate)", min=0.0)
    p_sigma: float = param(1.0, "SSA-SVD spectral exponent (larger = harder decay)", min=0.0)
    technique: str = param("replace", "replace: v = W n; tensor: v = W n minus its component along W X (one "
                                      "projection per concept; reference CLI replace, function default tensor)",
                           choices=["replace", "tensor"])
    seed: int = param(0, "seeds the MI and entropy noise (unseeded in the reference): same seed, bitwise same edit",
                      min=0)


@dataclass(frozen=True)
class ScaPreScaleParams:
    erase_scale: float = param(1.0, "s, weight of the target → guide pairs and of the Π_C penalty (reference CLI 1; "
                                    "function default 0.1)", min=0.0)
    lamb: float = param(0.5, "λ, ridge keeping W' close to W (hard-coded 0.5 in the reference script; function "
                             "default 0.1)", min=0.0)
    p: float = param(2.0, "exponent p of the MI soft mask sigmoid(z/0.7)^p (only with use_mi_softmask)", min=0.0)
    entropy_samples: int = param(20, "noisy samples per concept for the row entropy and μ (reference CLI 20; "
                                      "function default 50)", min=1, max=200)
    entropy_bins: int = param(20, "histogram bins of the row entropy", min=2, max=1000)
    noise_sigma: float = param(0.01, "σ of the Gaussian noise on concept vectors (MI and entropy samples)", min=0.0)
    T_sigma: float = param(1.0, "ASED spectral temperature (only with enable_ased)", min=0.0)
    p_sigma: float = param(1.0, "ASED spectral exponent (only with enable_ased)", min=0.0)
    enable_ased: bool = param(False, "ASED: extra ridge μ(1 − gate) on the concepts' weak spectral directions")
    enable_egbr: bool = param(False, "EGBR: entropy-gated blend of each row's direction and norm back to W's")
    use_mi_softmask: bool = param(False, "MI soft masks on the values and on the per-row Π_C penalty (reference CLI "
                                         "off; function default on)")
    bures_mu_from_entropy: bool = param(True, "μ = mean row entropy; false: μ = 0.1 (the reference CLI cannot "
                                              "turn this off: store_true with default True)")
    bures_iters: int = param(2, "rounds of the norm/direction prox per row", min=1, max=100)
    technique: str = param("replace", "replace: v = W n; tensor: v = W n minus its component along W X (one "
                                      "projection per concept; reference CLI replace, function default tensor)",
                           choices=["replace", "tensor"])
    seed: int = param(0, "seeds the MI and entropy noise (unseeded in the reference): same seed, bitwise same edit",
                      min=0)


# -- noise -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerNoise:
    """Standard normals for one matrix (σ is applied later). Per concept, `mi` holds the 5 positive then
    the 5 negative samples; `mi_second` is scapre-scale's independent redraw for the value masks."""
    entropy: torch.Tensor  # [m, entropy_samples, d]
    mi: torch.Tensor | None  # [m, 10, d]
    mi_second: torch.Tensor | None  # [m, 10, d]


def standard_normals(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """N(0, 1) draws as float64 values of float32 samples: drawing float32 is ~6x faster on a CPU, and the
    draws only need to be Gaussian and repeatable, not 53-bit."""
    return torch.randn(*shape, generator=generator, dtype=torch.float32).double()


def layer_noise(generator: torch.Generator, m: int, d: int, entropy_samples: int, variant: str,
                mi_masks: bool = True) -> LayerNoise:
    """All draws of one matrix, in the reference's order: `scapre` draws the MI samples, then the entropy
    samples; `scapre-scale` the entropy samples, then (with MI masks) the masks for α_j, then those for
    the values. Matrices draw one after another from one generator, in the order `solve` is given them."""
    mi_shape = (m, 2 * MI_SAMPLES, d)
    if variant == "scapre":
        mi = standard_normals(generator, *mi_shape)
        return LayerNoise(standard_normals(generator, m, entropy_samples, d), mi, None)
    entropy = standard_normals(generator, m, entropy_samples, d)
    if not mi_masks:
        return LayerNoise(entropy, None, None)
    mi = standard_normals(generator, *mi_shape)
    return LayerNoise(entropy, mi, standard_normals(generator, *mi_shape))


# -- Informax decoupler and entropy factor ----------------------------------------------------------------

def mutual_information_table() -> torch.Tensor:
    """MI[n11, n10] for 5 positives (n11 above the median) and 5 negatives (n10 above): the plug-in mutual
    information with eps added to each count and probabilities count / 10. MI is symmetric under
    flipping z, MI[a, b] = MI[5 − a, 5 − b]; averaging the two makes that bitwise, so every perfectly
    separating row gets one and the same value."""
    n11, n10 = torch.meshgrid(torch.arange(MI_SAMPLES + 1, dtype=torch.float64),
                              torch.arange(MI_SAMPLES + 1, dtype=torch.float64), indexing="ij")
    total = 2 * MI_SAMPLES
    p11, p10 = (n11 + EPS) / total, (n10 + EPS) / total
    p01, p00 = (MI_SAMPLES - n11 + EPS) / total, (MI_SAMPLES - n10 + EPS) / total
    z1, z0, pos, neg = p11 + p10, p01 + p00, p11 + p01, p10 + p00
    mi = (p11 * torch.log(p11 / (z1 * pos)) + p10 * torch.log(p10 / (z1 * neg))
          + p01 * torch.log(p01 / (z0 * pos)) + p00 * torch.log(p00 / (z0 * neg)))
    return (mi + mi.flip(0, 1)) / 2


MI_TABLE = mutual_information_table()


def mi_soft_mask(w: torch.Tensor, concept_out: torch.Tensor, empty_out: torch.Tensor, noise: torch.Tensor,
                 sigma: float, power: float) -> torch.Tensor:
    """r [m, d_out]: the Informax decoupler's row weights, every concept at once.
    concept_out = C Wᵀ [m, d_out], empty_out = W e [d_out], noise [m, 10, d] (positives first)."""
    m = len(concept_out)
    acts = (noise.reshape(-1, noise.shape[-1]) @ w.T).view(m, 2 * MI_SAMPLES, -1).mul_(sigma)
    acts[:, :MI_SAMPLES] += concept_out[:, None]  # W(c + σε): positives
    acts[:, MI_SAMPLES:] += empty_out  # W(e + σε): negatives
    above = acts > acts.median(dim=1, keepdim=True).values  # lower median of ten, as torch.median
    n11 = above[:, :MI_SAMPLES].sum(1)
    n10 = above[:, MI_SAMPLES:].sum(1)
    mi = MI_TABLE.to(w.device)[n11, n10]  # [m, d_out]
    zscore = (mi - mi.mean(1, keepdim=True)) / (mi.std(1, keepdim=True) + EPS)
    return torch.sigmoid(zscore / MI_TEMPERATURE) ** power


def histc_counts(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Per column of x [n, rows] with values in [0, 1]: counts [rows, bins] exactly as torch.histc(min=0,
    max=1) bins them (bin ⌊x·bins⌋, the right edge x = 1 in the last bin)."""
    index = (x * bins).long().clamp_(max=bins - 1)  # histc: (x − 0)·bins / (1 − 0), truncated
    index += bins * torch.arange(x.shape[1], device=x.device)
    return torch.bincount(index.flatten(), minlength=x.shape[1] * bins).view(x.shape[1], bins).double()


def entropy_factor(w: torch.Tensor, concept_out: torch.Tensor, noise: torch.Tensor, sigma: float,
                   bins: int) -> torch.Tensor:
    """e [d_out] = 1 − H_j / log(bins), H_j the entropy of row j's min-max normalised responses W(c_i + σε)."""
    m, samples, d = noise.shape
    acts = (noise.reshape(-1, d) @ w.T).view(m, samples, -1).mul_(sigma).add_(concept_out[:, None])
    acts = acts.view(m * samples, -1)  # [m·samples, d_out]
    low, high = torch.aminmax(acts, dim=0)
    counts = histc_counts(acts.sub_(low).div_(high - low + EPS), bins)
    prob = counts / (counts.sum(1, keepdim=True) + EPS)
    return 1 - (-(prob * torch.log(prob + EPS)).sum(1)) / math.log(bins)


def spectral_gate(concepts: torch.Tensor, t_sigma: float, p_sigma: float):
    """U [d, r], S and gate = sigmoid((S − median S) / (T_σ + eps))^p_σ from the thin SVD C = U S Vᵀ
    (C with the concepts as columns); shared by SSA-SVD and ASED."""
    u, s, _ = torch.linalg.svd(concepts.T, full_matrices=False)
    gate = torch.sigmoid((s - s.median()) / (t_sigma + EPS)) ** p_sigma
    return u, s, gate


# -- guided values Σ_i diag(r_i) W N_iᵀ Z_i ----------------------------------------------------------------

@dataclass(frozen=True)
class TokenPairs:
    """The (X_i, N_i) slices grouped by guide: a group's guide slices are prefixes of one block of rows
    (every concept with the same anchor), so W Nᵀ is computed once per group."""
    blocks: list[torch.Tensor]  # per group [L_g, d]
    members: list[torch.Tensor]  # per group [n_g]: concept indices
    padded: list[torch.Tensor]  # per group [n_g, L_g, d]: each member's Z_i, zero rows past its length
    rows: list[torch.Tensor]  # per group: which of the K token rows belong to it ...
    positions: list[torch.Tensor]  # ... and each one's row t in the group's block
    concept_of: torch.Tensor  # [K]: the concept of each token row
    targets: torch.Tensor  # [K, d]: every X_i, concept after concept
    z: torch.Tensor  # [K, d]: every Z_i (X_i, or X_i times the shared inverse)


def token_pairs(rows: ConceptRows, z: torch.Tensor) -> TokenPairs:
    """Group the guides by exact equality with a prefix of the longest one sharing their first row."""
    lengths = [len(x) for x in rows.targets]
    by_first_row: dict[bytes, list[int]] = {}  # candidates: equal first guide row
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # longest first: it defines the block
        by_first_row.setdefault(rows.anchors[i][0].cpu().numpy().tobytes(), []).append(i)
    groups = []
    for pending in by_first_row.values():
        while pending:
            block = rows.anchors[pending[0]]
            same = [i for i in pending if torch.equal(block[:lengths[i]], rows.anchors[i])]
            groups.append((block, same))
            pending = [i for i in pending if i not in same]
    device = z.device
    starts = torch.tensor([0, *lengths]).cumsum(0).tolist()
    concept_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    blocks, members, padded, token_rows, positions = [], [], [], [], []
    for block, group in groups:
        mine = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in group]).to(device)
        t = torch.cat([torch.arange(lengths[i]) for i in group]).to(device)
        slot = torch.repeat_interleave(torch.arange(len(group)), torch.tensor([lengths[i] for i in group])).to(device)
        stack = z.new_zeros(len(group) * len(block), z.shape[1])
        stack.index_copy_(0, slot * len(block) + t, z[mine])
        blocks.append(block)
        members.append(torch.tensor(group, device=device))
        padded.append(stack.view(len(group), len(block), z.shape[1]))
        token_rows.append(mine)
        positions.append(t)
    return TokenPairs(blocks, members, padded, token_rows, positions, concept_of, torch.cat(rows.targets), z)


def guided_values(w: torch.Tensor, pairs: TokenPairs, mask: torch.Tensor | None, technique: str) -> torch.Tensor:
    """Σ_i diag(r_i) Σ_t v_{i,t} z_{i,t}ᵀ, [d_out, d]; r_i = mask[i] ([m, d_out]) or 1.

    Per concept the mask is split into its most common value ρ_i and the rows where it differs:
    Σ_i ρ_i W N_iᵀ Z_i collapses onto the shared guide block (W Bᵀ)(Σ_i ρ_i Z̃_i), and only the
    differing rows pay a per-concept product (one batched product over the group, padded to the
    largest number of differing rows; padding points at rows where the mask does not differ)."""
    out = w.new_zeros(w.shape[0], pairs.z.shape[1])
    guide_out = [block @ w.T for block in pairs.blocks]  # [L_g, d_out] per group
    for block_out, group, padded in zip(guide_out, pairs.members, pairs.padded):
        if mask is None:
            out += block_out.T @ padded.sum(0)
            continue
        group_mask = mask[group]  # [n_g, d_out]
        common = group_mask.mode(dim=1).values
        out += block_out.T @ torch.einsum("i,itd->td", common, padded)
        delta = group_mask - common[:, None]
        differing = int((delta != 0).sum(1).max())
        if differing == 0:
            continue
        step = max(1, CORRECTION_ELEMENTS // (differing * padded.shape[2]))
        for start in range(0, len(group), step):
            part = delta[start:start + step]
            rows = torch.argsort((part == 0).byte(), dim=1, stable=True)[:, :differing]  # differing rows first
            products = torch.bmm(block_out.T[rows], padded[start:start + step])  # rows of W N_iᵀ Z_i
            out.index_add_(0, rows.flatten(), (torch.gather(part, 1, rows)[..., None] * products).flatten(0, 1))
    if technique == "tensor":
        out -= _tensor_correction(w, pairs, guide_out, mask)
    return out


CORRECTION_ELEMENTS = 1 << 23  # at most 64 MiB of float64 per batched correction product


def _tensor_correction(w, pairs: TokenPairs, guide_out, mask) -> torch.Tensor:
    """"tensor" values are V_i − β_i P_i with P_i = X_i Wᵀ, V_i = N_i Wᵀ, β_i = <P_i, V_i> / ‖P_i‖²_F:
    this returns Σ_i diag(r_i) β_i P_iᵀ Z_i (dense: every target row times W)."""
    m = sum(len(group) for group in pairs.members)
    responses = pairs.targets @ w.T  # [K, d_out]
    guides = torch.empty_like(responses)
    for block_out, rows, positions in zip(guide_out, pairs.rows, pairs.positions):
        guides[rows] = block_out[positions]
    inner = responses.new_zeros(m).index_add_(0, pairs.concept_of, (responses * guides).sum(1))
    norm2 = responses.new_zeros(m).index_add_(0, pairs.concept_of, (responses * responses).sum(1))
    beta = (inner / norm2.clamp_min(1e-300))[pairs.concept_of, None]
    scale = beta if mask is None else beta * mask[pairs.concept_of]
    return (responses * scale).T @ pairs.z


# -- the two solves ---------------------------------------------------------------------------------------

def _concepts(rows: ConceptRows) -> tuple[torch.Tensor, torch.Tensor]:
    """C as rows [m, d] (each concept's last content token, X_i[0]) and e, the empty prompt's EOS row."""
    return torch.stack([x[0] for x in rows.targets]), rows.null[rows.start]


def _cholesky(matrix: torch.Tensor, what: str) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix)
    if info.item() != 0:
        raise ValueError(f"ScaPre's {what} is singular: with lamb = 0 the token rows must span the embedding "
                         f"space; use lamb > 0")
    return factor


def scapre(weights: dict[str, torch.Tensor], rows: ConceptRows, p: ScaPreParams) -> dict[str, torch.Tensor]:
    """edit/erase.py: per matrix W' = diag(α) [mat1 mat2⁻¹] + diag(1 − α) W, every matrix from its original.

    mat2 = λI + C Cᵀ + s Σ x xᵀ does not depend on W, so W_new = W·(λI − s_res P C Cᵀ P) mat2⁻¹ +
    (masked values)·mat2⁻¹ with one shared inverse (applied to the target rows up front)."""
    concepts, empty = _concepts(rows)
    targets = torch.cat(rows.targets)
    d = targets.shape[1]
    eye = torch.eye(d, dtype=targets.dtype, device=targets.device)
    normal = p.lamb * eye + concepts.T @ concepts + p.erase_scale * targets.T @ targets
    inverse = torch.cholesky_inverse(_cholesky(normal, "normal matrix λI + C Cᵀ + s Σ x xᵀ"))
    left = p.lamb * eye
    if p.svd:
        u, _, gate = spectral_gate(concepts, p.T_sigma, p.p_sigma)
        residual = concepts - (concepts @ u) * gate @ u.T  # rows of P C
        left = left - (p.erase_scale if p.res_scale < 0 else p.res_scale) * residual.T @ residual
    shared = left @ inverse
    pairs = token_pairs(rows, targets @ inverse)
    generator = torch.Generator().manual_seed(p.seed)
    new = {}
    for name, w in weights.items():
        noise = layer_noise(generator, len(concepts), d, p.entropy_samples, "scapre")
        concept_out = concepts @ w.T
        mask = mi_soft_mask(w, concept_out, w @ empty, noise.mi.to(w.device), p.noise_sigma, p.p)
        edited = w @ shared + p.erase_scale * guided_values(w, pairs, mask, p.technique)
        factor = entropy_factor(w, concept_out, noise.entropy.to(w.device), p.noise_sigma, p.entropy_bins)
        alpha = (p.alpha_min + (1 - p.alpha_min) * factor)[:, None]
        new[name] = alpha * edited + (1 - alpha) * w
    return new


def bures_prox(w0: torch.Tensor, edited: torch.Tensor, mu: float, lam_prox: float, iters: int) -> torch.Tensor:
    """The reference's "Bures prox" (no Bures distance is computed): per row, with the edit a·u_a and
    the original r0·u0, repeat κ = max(0, <u, u0>), r = (λ' a + μ r0 κ)/(λ' + μ),
    u = normalise(λ' a u_a + μ r0 κ u0) from u = u_a; return r·u."""
    a = edited.norm(dim=1, keepdim=True).clamp_min(EPS)
    r0 = w0.norm(dim=1, keepdim=True).clamp_min(EPS)
    u_a, u0 = edited / a, w0 / r0
    u = u_a
    for _ in range(max(1, iters)):
        kappa = (u * u0).sum(1, keepdim=True).clamp_min(0.0)
        r = (lam_prox * a + mu * r0 * kappa) / (lam_prox + mu)
        direction = lam_prox * a * u_a + mu * r0 * kappa * u0
        u = direction / direction.norm(dim=1, keepdim=True).clamp_min(EPS)
    return r * u


def egbr(w0: torch.Tensor, w: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """EGBR: α = 1 − exp(−H/max H), β = α max(0, cos(w0, w)); direction = normalise((1 − β)u0 + βu),
    squared norm = ‖w0‖^{2(1−α)} ‖w‖^{2α}."""
    alpha = (1 - torch.exp(-entropy / entropy.max().clamp_min(1e-6)))[:, None]
    n0 = w0.norm(dim=1, keepdim=True).clamp_min(EPS)
    n1 = w.norm(dim=1, keepdim=True).clamp_min(EPS)
    u0, u1 = w0 / n0, w / n1
    beta = alpha * (u0 * u1).sum(1, keepdim=True).clamp_min(0.0)
    direction = (1 - beta) * u0 + beta * u1
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(EPS)
    energy = torch.exp((1 - alpha) * torch.log(n0 ** 2) + alpha * torch.log(n1 ** 2))
    return energy.sqrt() * direction


def scapre_scale(weights: dict[str, torch.Tensor], rows: ConceptRows, p: ScaPreScaleParams
                 ) -> dict[str, torch.Tensor]:
    """edit/erase_scale.py: per row w_j = M_j⁻¹ b_j, then the prox (and EGBR), every matrix from its original.

    G(μ) = (λI + C Cᵀ + S) + μB with B = I, or I + R/μ with ASED: only μ changes between matrices, so one
    eigendecomposition B^{-1/2}(λI + C Cᵀ + S)B^{-1/2} = E Λ Eᵀ serves them all, G(μ)⁻¹ = F (Λ + μ)⁻¹ Fᵀ
    with F = B^{-1/2} E. M_j = G + α_j Q Qᵀ with Π_C = Q Qᵀ, Q = U diag(s/√(s² + 1e-8)) (the reference's
    1e-8 ridge, exactly); with K = Qᵀ G⁻¹ Q = E' L E'ᵀ, Woodbury gives
    w_j = G⁻¹b_j − (G⁻¹Q E') diag(α_j / (1 + α_j L)) (G⁻¹Q E')ᵀ b_j. Without MI masks every α_j = s, so
    s Π_C simply joins G."""
    concepts, empty = _concepts(rows)
    targets = torch.cat(rows.targets)
    d = targets.shape[1]
    eye = torch.eye(d, dtype=targets.dtype, device=targets.device)
    u, singular, gate = spectral_gate(concepts, p.T_sigma, p.p_sigma)
    q = u * (singular / (singular ** 2 + EPS).sqrt())
    fixed = p.lamb * eye + concepts.T @ concepts + p.erase_scale * targets.T @ targets  # λI + C Cᵀ + S
    if not p.use_mi_softmask:
        fixed = fixed + p.erase_scale * q @ q.T
    whiten = eye + (u * ((2 - gate) ** -0.5 - 1)) @ u.T if p.enable_ased else eye  # B^{-1/2}, B = I + U(1−gate)Uᵀ
    spectrum, vectors = torch.linalg.eigh(whiten @ fixed @ whiten)
    basis = whiten @ vectors  # F
    basis_q = basis.T @ q  # Fᵀ Q
    pairs = token_pairs(rows, targets)
    generator = torch.Generator().manual_seed(p.seed)
    new = {}
    for name, w in weights.items():
        noise = layer_noise(generator, len(concepts), d, p.entropy_samples, "scapre-scale", p.use_mi_softmask)
        concept_out = concepts @ w.T
        factor = entropy_factor(w, concept_out, noise.entropy.to(w.device), p.noise_sigma, p.entropy_bins)
        entropy = (1 - factor).clamp(0.0, 1.0)
        mu = float(entropy.mean()) if p.bures_mu_from_entropy else SCALE_MU_FALLBACK
        shifted = spectrum + mu  # eigenvalues of G(μ) in the F basis
        if not shifted.min() > 1e-13 * shifted.max().abs():
            raise ValueError("ScaPre's per-row system (λ+μ)I + R + C Cᵀ + S is singular: with lamb = 0 and μ = 0 "
                             "the token rows must span the embedding space; use lamb > 0")
        value_mask = None
        if p.use_mi_softmask:
            empty_out = w @ empty
            row_max = mi_soft_mask(w, concept_out, empty_out, noise.mi.to(w.device), p.noise_sigma, p.p).amax(0)
            value_mask = mi_soft_mask(w, concept_out, empty_out, noise.mi_second.to(w.device), p.noise_sigma, p.p)
        rhs = (p.lamb + mu) * w + p.erase_scale * guided_values(w, pairs, value_mask, p.technique)
        solved = (rhs @ basis) / shifted  # rows b_jᵀ G⁻¹, in the F basis
        if p.use_mi_softmask:
            alpha = (p.erase_scale * row_max)[:, None]
            solved_q = basis_q / shifted[:, None]  # G⁻¹Q = F solved_q
            values, vectors_k = torch.linalg.eigh(basis_q.T @ solved_q)  # K = Qᵀ G⁻¹ Q
            coefficients = solved @ (basis_q @ vectors_k)  # b_jᵀ G⁻¹ Q E'
            solved = solved - (coefficients * (alpha / (1 + alpha * values))) @ (solved_q @ vectors_k).T
        edited = bures_prox(w, solved @ basis.T, mu, p.lamb + mu, p.bures_iters)
        new[name] = egbr(w, edited, entropy) if p.enable_egbr else edited
    return new


# -- rows and registration ----------------------------------------------------------------------------------

def _prepare(concepts, p, encode) -> ConceptRows:
    """X_i, N_i at full length (77 rows): from each prompt's last content token (BOS for the empty anchor,
    like the reference's " ") to the end, both cut to 77 − max(f_target, f_guide) rows. Retain concepts
    are not used by ScaPre, so none are encoded: `retain` is empty."""
    n = len(concepts.targets)
    encoded = encode([*concepts.targets, *concepts.anchors, ""], True)
    targets, anchors = [], []
    for target, guide in zip(encoded[:n], encoded[n:2 * n]):
        length = len(target.rows) - max(target.subject, guide.subject)
        targets.append(target.rows[target.subject:target.subject + length].double())
        anchors.append(guide.rows[guide.subject:guide.subject + length].double())
    null = encoded[-1].rows.double()
    return ConceptRows(targets, anchors, null.new_zeros(0, null.shape[1]), null, encoded[-1].start)


PAPER = "Deng et al., Forget Many, Forget Right: Scalable and Precise Concept Unlearning in Diffusion Models, ICLR 2026"

register(Method(
    name="scapre",
    summary="ScaPre (edit/erase.py): UCE-style closed form per layer with Informax (MI) soft row masks, optional "
            "SSA-SVD, and an entropy-driven rollback towards the original rows. No retain term.",
    paper=PAPER,
    params=ScaPreParams,
    prepare=_prepare,
    solve=scapre,
    edits=lambda p: ("attn2.to_k", "attn2.to_v"),
    uses_retain=False,
))

register(Method(
    name="scapre-scale",
    summary="ScaPre large-scale (edit/erase_scale.py): per-row closed form with an entropy-derived ridge μ, "
            "concept-subspace penalty, optional ASED/MI masks/EGBR, and a norm/direction prox. No retain term.",
    paper=PAPER,
    params=ScaPreScaleParams,
    prepare=_prepare,
    solve=scapre_scale,
    edits=lambda p: ("attn2.to_k", "attn2.to_v"),
    uses_retain=False,
))
