"""SPEED on the tiny pipeline's real token rows (d = 256): null-space guarantees, IEC, determinism,
and equality with a dense float64 transcription of the paper's closed form."""

import pytest
import torch

import erasure
from erasure.engine.apply import edited_weights
from erasure.engine.lru import LRU
from erasure.engine.pipeline import pipeline_state
from erasure.engine.registry import ConceptRows, concept_rows
from erasure.engine.text import encode_texts, validate_concepts
from erasure.methods.speed import SpeedParams, invariant_rows, speed

TARGETS = ["Snoopy", "Mickey", "SpongeBob"]


def rows_and_weights(pipe, retain, targets=TARGETS):
    concepts = validate_concepts(targets, [""], retain, pipe.tokenizer, 1000)
    rows = concept_rows(concepts, lambda texts, full: encode_texts(pipe, texts, full))
    weights = {n: m.weight.detach().double() for n, m in pipeline_state(pipe).modules.items() if n.endswith("to_v")}
    return rows, weights


def relative_change(old, new, x):
    return ((x @ (new - old).T).norm(dim=1) / (x @ old.T).norm(dim=1)).max()


def dense_speed_without_priors(w, rows: ConceptRows, p: SpeedParams):
    """The paper's formula as written (aug_num = 0: no IPF/DPA), with dense P and explicit inverses."""
    d = w.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    c_tt = torch.stack([t.T @ t for t in rows.targets]).mean(0)
    c_at = torch.stack([a.T @ t for a, t in zip(rows.anchors, rows.targets)]).mean(0)
    cov = rows.retain.T @ rows.retain / len(rows.retain)
    values, vectors = torch.linalg.eigh(cov)
    null = vectors[:, values < p.threshold]
    projector = null @ null.T
    k2 = invariant_rows(rows.null, p.seed).T
    m = torch.linalg.inv(c_tt @ projector + p.retain_scale * eye)
    gram = k2.T @ projector @ m @ k2 + p.lamb * torch.eye(k2.shape[1], dtype=torch.float64)
    return w + w @ (c_at - c_tt) @ projector @ (eye - m @ k2 @ torch.linalg.inv(gram) @ k2.T @ projector) @ m


@pytest.fixture(scope="module")
def instance_pool():
    return list(erasure.load_preset("instance").retain)


def test_speed_matches_dense_formula(pipe, instance_pool):
    # Full-rank retain set (642 rows in 256 dims): the fast low-rank path must equal the dense formula.
    # The threshold sits in the widest eigenvalue gap, so round-off cannot move an eigenvalue across it.
    rows, weights = rows_and_weights(pipe, instance_pool)
    eigenvalues = torch.linalg.eigvalsh(rows.retain.T @ rows.retain / len(rows.retain))
    middle = eigenvalues[20:-20]
    gap = int((middle[1:] / middle[:-1]).argmax())
    threshold = float((middle[gap] * middle[gap + 1]).sqrt())
    assert middle[gap + 1] / middle[gap] > 1.01
    p = SpeedParams(aug_num=0, threshold=threshold, lamb=0.0)
    new = speed(weights, rows, p)
    for name, w in weights.items():
        reference = dense_speed_without_priors(w, rows, p)
        assert (new[name] - reference).norm() / (reference - w).norm() <= 1e-8


@pytest.mark.parametrize("aug_num", [0, 10])
def test_speed_preserves_retain_outputs_exactly_in_low_rank_case(pipe, instance_pool, aug_num):
    # 60 retain rows (+ DPA's one direction) span < 256 dims: with a threshold below every non-zero
    # eigenvalue, P annihilates each retain row, so ΔW r = 0 up to float64 round-off (<= 1e-5 relative).
    rows, weights = rows_and_weights(pipe, instance_pool[:60])
    p = SpeedParams(aug_num=aug_num, disable_filter=True, threshold=1e-8)
    new = speed(weights, rows, p)
    for name, w in weights.items():
        assert relative_change(w, new[name], rows.retain) <= 1e-5
        assert relative_change(w, new[name], torch.cat(rows.targets)) > 1e-2  # the edit is not empty


def test_speed_retain_drift_within_threshold_bound(pipe, instance_pool):
    # Full-rank retain set: Δ r = Δ P r exactly (Δ vanishes on the kept eigenspace), and for a row of the
    # covariance set ‖P r‖² <= Σ_c cᵀPc = N Σ_{λ_i < threshold} λ_i. Hence ‖Δr‖ <= ‖Δ‖₂ sqrt(N Σ_{λ<thr} λ).
    rows, weights = rows_and_weights(pipe, instance_pool)
    threshold = 0.1
    p = SpeedParams(aug_num=0, threshold=threshold)
    new = speed(weights, rows, p)
    eigenvalues = torch.linalg.eigvalsh(rows.retain.T @ rows.retain / len(rows.retain))
    small = eigenvalues[eigenvalues < threshold]
    assert len(small) > 0 and eigenvalues.max() > threshold  # a proper, approximate null space
    bound_factor = (len(rows.retain) * small.sum()).sqrt()
    drifted = False
    for name, w in weights.items():
        delta = new[name] - w
        drift = (rows.retain @ delta.T).norm(dim=1)
        assert (drift <= torch.linalg.matrix_norm(delta, ord=2) * bound_factor * (1 + 1e-9)).all()
        drifted |= bool(drift.max() > 0)
    assert drifted  # approximate, not exact, preservation: the bound is what is being tested


@pytest.mark.parametrize("lamb,tolerance", [(0.0, 1e-8), (0.5, 2e-2)])
def test_speed_preserves_invariant_rows(pipe, instance_pool, lamb, tolerance):
    # IEC: Δ K2 = 0 exactly at λ = 0 (a hard constraint); λ > 0 softens it, so only a loose bound holds.
    rows, weights = rows_and_weights(pipe, instance_pool[:200])
    p = SpeedParams(lamb=lamb)
    new = speed(weights, rows, p)
    k2 = invariant_rows(rows.null, p.seed)
    for name, w in weights.items():
        assert relative_change(w, new[name], k2) <= tolerance


def test_speed_moves_targets_towards_anchor(pipe, instance_pool):
    rows, weights = rows_and_weights(pipe, instance_pool)
    new = speed(weights, rows, SpeedParams())
    t, a = torch.cat(rows.targets), torch.cat(rows.anchors)
    for name, w in weights.items():
        before = (t @ w.T - a @ w.T).norm()
        after = (t @ new[name].T - a @ w.T).norm()
        assert after < 0.8 * before


def test_speed_edit_is_bitwise_repeatable_under_one_seed(pipe, instance_pool, untouched):
    first = erasure.erase(pipe, "speed", TARGETS, [""], instance_pool, seed=3)
    second = erasure.erase(pipe, "speed", TARGETS, [""], instance_pool, seed=3)
    other = erasure.erase(pipe, "speed", TARGETS, [""], instance_pool, seed=4)
    assert all(torch.equal(first.patches[k].value, second.patches[k].value) for k in first.patches)
    assert any(not torch.equal(first.patches[k].value, other.patches[k].value) for k in first.patches)  # DPA noise seeded


def test_speed_edits_only_selected_projections(pipe):
    modules = pipeline_state(pipe).modules
    for params, suffixes in [("V", ("to_v",)), ("K", ("to_k",)), ("KV", ("to_k", "to_v"))]:
        edit = erasure.erase(pipe, "speed", ["Snoopy"], [""], ["Pikachu"], params=params)
        assert set(edited_weights(pipe, edit)) == {n for n in modules if n.endswith(suffixes)}


def test_speed_nudity_uses_all_tokens_and_null_retain(pipe):
    concepts = validate_concepts(["nudity"], [""], [""], pipe.tokenizer, 10)
    from erasure.engine.registry import get_method
    rows = get_method("speed").prepare(concepts, SpeedParams(), lambda t, f: encode_texts(pipe, t, f))
    assert rows.targets[0].shape[0] == 76 and rows.retain.shape[0] == 76
    assert torch.equal(rows.retain, rows.null[1:])


def test_speed_drops_retain_texts_naming_a_target(pipe):
    edit = erasure.erase(pipe, "speed", ["Mickey"], [""], ["Mickey Haller", "Minnie Mouse", "Goofy"])
    assert edit.retain == ["Mickey Haller", "Minnie Mouse", "Goofy"]  # kept as given; dropped from the rows
    from erasure.methods.speed import retain_texts_without_targets
    assert retain_texts_without_targets(edit.retain, ["Mickey"]) == ["Minnie Mouse", "Goofy"]


def fresh_least_gain(monkeypatch, module, **settings):
    monkeypatch.setattr(module, "LEAST_GAIN_CACHE", LRU(max_items=8))
    for name, value in settings.items():
        monkeypatch.setattr(module, name, value)


@pytest.mark.parametrize("shape", [(300, 700), (700, 300), (40, 90), (90, 40)])
@pytest.mark.parametrize("lanczos", [True, False])
def test_least_gain_direction_is_the_smallest_right_singular_vector(monkeypatch, shape, lanczos):
    # Reference definition: the right singular vector of the smallest singular value of the reduced SVD
    # (for a wide W the smallest non-zero one), from torch.linalg.svd; equal up to sign. Tolerance: 100×
    # the first-order perturbation bound ε σ_max² / (σ₂² − σ₁²) of a backward-stable answer (<= 3e-11
    # for these matrices; observed errors are ~1e-14). Both paths: Lanczos (also forced on the small
    # matrices) and the dense eigh fallback.
    from erasure.methods import speed as module

    fresh_least_gain(monkeypatch, module, LANCZOS_MIN_SIZE=0 if lanczos else 10**9)
    for seed in range(3):
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        values = torch.linalg.svdvals(w)
        tolerance = 100 * torch.finfo(torch.float64).eps * values[0] ** 2 / (values[-2] ** 2 - values[-1] ** 2)
        assert tolerance < 1e-10
        reference = torch.linalg.svd(w, full_matrices=False).Vh[-1]
        v = module.least_gain_direction(w)
        assert min((v - reference).norm(), (v + reference).norm()) <= tolerance
        assert abs(v.norm() - 1) <= 1e-14
        assert v[v.abs().argmax()] > 0  # canonical sign
        if lanczos:  # the iteration itself was accepted, not the fallback
            gram = module.gram_matrix(w.T) if shape[0] < shape[1] else module.gram_matrix(w)
            assert module.lanczos_smallest(gram, torch.linalg.cholesky(gram)) is not None


def test_least_gain_direction_falls_back_to_eigh(monkeypatch):
    from erasure.methods import speed as module

    fresh_least_gain(monkeypatch, module, LANCZOS_MIN_SIZE=0)
    # singular Gram (a zero input column): Cholesky fails, eigh gives the null direction, sign canonical
    w = torch.randn(90, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w[:, 7] = 0
    assert torch.allclose(module.least_gain_direction(w), torch.eye(40, dtype=torch.float64)[7], atol=1e-14)
    # a start vector without a component along the smallest eigenvector: Lanczos converges to the next
    # eigenvalue, and the positive-definiteness check on G − (λ − δ)I rejects it
    gram = torch.diag(torch.cat([torch.tensor([0.5, 1.0]), torch.linspace(2, 10, 98)]).double())
    start = torch.ones(100, dtype=torch.float64)
    start[0] = 0
    assert module.lanczos_smallest(gram, torch.linalg.cholesky(gram), start) is None
    assert torch.allclose(module.smallest_eigenvector(gram).abs(), torch.eye(100, dtype=torch.float64)[0])
    # no convergence within the step budget: eigh, same direction
    w = torch.randn(300, 700, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = module.least_gain_direction(w)
    fresh_least_gain(monkeypatch, module, LANCZOS_MAX_STEPS=5)
    gram = module.gram_matrix(w.T)
    assert module.lanczos_smallest(gram, torch.linalg.cholesky(gram)) is None
    assert (module.least_gain_direction(w) - expected).norm() <= 1e-12


def random_prior_inputs(rows: int, targets: int, outputs: int, d: int = 64):
    """Seeded stand-ins for prior_rows' inputs: retain rows, their D0 coefficients, W Eᵀ, v and its coefficients."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(rows, d), (rows, targets), (targets, outputs), (d,), (targets,)]
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def test_least_gain_sign_changes_the_seeded_dpa_draws():
    # Why the sign is canonicalised: ‖D0 (c + s v)‖ has the cross term 2 s (D0 c)·(D0 v), so −v with the
    # same draws s keeps other augmentations (the same distribution of edits as +v, not the same edit).
    from erasure.methods.speed import prior_rows

    retain, coefficients, w_errors, v, v_coefficients = random_prior_inputs(rows=200, targets=3, outputs=32)
    plus, minus = (prior_rows(retain, coefficients, sign * v_coefficients, w_errors, sign * v, SpeedParams(),
                              torch.Generator().manual_seed(1)) for sign in (1, -1))
    assert torch.equal(plus.rows[:-1], minus.rows[:-1])  # IPF does not involve v
    assert not torch.allclose(plus.scale, minus.scale)  # DPA's kept draws do


def test_prior_rows_from_the_target_metric_equal_the_direct_norms():
    # With fewer targets than outputs the norms ‖D0 c‖ and (D0 c)·(D0 v) come from the n_t×n_t metric;
    # with D0 c given directly (identity w_errors) they are computed from the rows: the same priors.
    from erasure.methods.speed import prior_rows

    retain, coefficients, w_errors, v, v_coefficients = random_prior_inputs(rows=300, targets=5, outputs=40)
    eye = torch.eye(40, dtype=torch.float64)
    for p in (SpeedParams(), SpeedParams(disable_filter=True)):
        by_metric = prior_rows(retain, coefficients, v_coefficients, w_errors, v, p, torch.Generator().manual_seed(1),
                               retain @ retain.T)
        direct = prior_rows(retain, coefficients @ w_errors, v_coefficients @ w_errors, eye, v, p,
                            torch.Generator().manual_seed(1))
        assert torch.equal(by_metric.rows, direct.rows) and by_metric.count == direct.count
        assert torch.allclose(by_metric.scale, direct.scale, rtol=1e-12)
        assert torch.allclose(by_metric.border, direct.border, rtol=1e-12, atol=1e-12)
        assert torch.allclose(by_metric.gram, direct.rows @ direct.rows.T, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("count", [40, 150])  # fewer rows than d (r×r path), and more (d×d path)
def test_kept_basis_is_the_dense_covariance_eigenspace(count):
    from erasure.methods.speed import PriorRows, kept_basis

    generator = torch.Generator().manual_seed(0)
    d = 100
    rows = torch.randn(count, d, generator=generator, dtype=torch.float64) * torch.logspace(0, -3, d).double()
    scale = 1 + torch.rand(count, generator=generator, dtype=torch.float64)
    border = torch.randn(count, generator=generator, dtype=torch.float64) * 0.3
    border[-1] = 0
    prior = PriorRows(rows, scale, border, float(count) * 2)
    y = scale[:, None] * rows + border[:, None] * rows[-1]
    values, vectors = torch.linalg.eigh(y.T @ y / prior.count)
    gaps = values[1:] / values[:-1].clamp_min(1e-300)
    middle = int(gaps[d - min(count, d) + 2: -2].argmax()) + d - min(count, d) + 2  # a wide gap among non-zero ones
    threshold = float((values[middle] * values[middle + 1]).sqrt())
    dense = vectors[:, values >= threshold]
    basis = kept_basis(prior, threshold)
    assert basis.shape == dense.shape
    assert (basis.T @ basis - torch.eye(basis.shape[1], dtype=torch.float64)).abs().max() <= 1e-13
    assert (basis @ basis.T - dense @ dense.T).norm() <= 1e-10


def test_speed_through_lanczos_is_repeatable_and_equals_eigh(pipe, instance_pool, monkeypatch):
    # The tiny pipeline's 64×256 weights normally take eigh; force the Lanczos path. With the cache
    # cleared between solves the edit is bitwise the same, and equal to the eigh path to round-off.
    from erasure.methods import speed as module

    rows, weights = rows_and_weights(pipe, instance_pool[:200])
    p = SpeedParams(seed=3)
    edits = []
    for size in (0, 0, 10**9):
        fresh_least_gain(monkeypatch, module, LANCZOS_MIN_SIZE=size)
        edits.append(speed(weights, rows, p))
    for name, w in weights.items():
        assert torch.equal(edits[0][name], edits[1][name])
        assert (edits[0][name] - edits[2][name]).norm() <= 1e-9 * (edits[2][name] - w).norm()
