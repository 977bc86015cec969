"""UCE's closed form on the tiny pipeline's real token rows: the properties eq. 7 guarantees."""

import pytest
import torch

import erasure
from erasure.engine.apply import edited_weights
from erasure.engine.pipeline import pipeline_state
from erasure.engine.registry import concept_rows, get_method
from erasure.engine.text import encode_texts, validate_concepts
from erasure.methods.uce import UCEParams, uce

TARGETS = ["Snoopy", "Mickey", "SpongeBob"]
RETAIN = ["Pikachu", "Garfield", "Popeye", "Hello Kitty", "teddy bear", "Winnie the Pooh", "Mario", "Batman"]


def rows_and_weights(pipe, anchors=("",), retain=RETAIN):
    concepts = validate_concepts(TARGETS, list(anchors), retain, pipe.tokenizer, 100)
    rows = concept_rows(concepts, lambda texts, full: encode_texts(pipe, texts, full))
    weights = {n: m.weight.detach().double() for n, m in pipeline_state(pipe).modules.items()}
    return rows, weights


@pytest.mark.parametrize("technique", ["replace", "tensor"])
def test_uce_satisfies_normal_equations(pipe, technique):
    # W'(λI + e TᵀT + p PᵀP) = λW + e Σ v* tᵀ + p W PᵀP, solved in float64: relative residual <= 1e-6.
    p = UCEParams(erase_scale=1.0, preserve_scale=1.0, lamb=0.5, technique=technique)
    rows, weights = rows_and_weights(pipe)
    new = uce(weights, rows, p)
    t, a, r = torch.cat(rows.targets), torch.cat(rows.anchors), rows.retain
    normal = p.lamb * torch.eye(t.shape[1], dtype=torch.float64) + t.T @ t + r.T @ r
    for name, w in weights.items():
        values = a @ w.T
        if technique == "tensor":
            u = t @ w.T
            u = u / u.norm(dim=1, keepdim=True)
            values = values - (values * u).sum(1, keepdim=True) * u
        rhs = p.lamb * w + values.T @ t + (w @ r.T) @ r
        assert (new[name] @ normal - rhs).norm() / rhs.norm() <= 1e-6


def test_uce_shared_map_equals_per_layer_solve(pipe):
    # The W' = W·M shortcut must equal the paper's per-layer (mat1)(mat2)⁻¹ to float64 precision.
    p = UCEParams()
    rows, weights = rows_and_weights(pipe)
    new = uce(weights, rows, p)
    t, a, r = torch.cat(rows.targets), torch.cat(rows.anchors), rows.retain
    mat2 = p.lamb * torch.eye(t.shape[1], dtype=torch.float64) + t.T @ t + r.T @ r
    for name, w in weights.items():
        mat1 = p.lamb * w + (w @ a.T) @ t + (w @ r.T) @ r
        reference = mat1 @ torch.linalg.inv(mat2)
        assert (new[name] - reference).norm() / (reference - w).norm() <= 1e-8


@pytest.mark.parametrize("lamb", [0.5, 0.05])
def test_uce_maps_targets_to_anchor_and_keeps_retain_within_ridge_bound(pipe, lamb):
    # W' minimises J = λ‖W'−W‖² + Σ‖W't − Wa‖² + Σ‖W'p − Wp‖². An exact interpolant W* (W*t = Wa, W*p = Wp)
    # exists because the rows are independent, so J(W') <= J(W*) = λ‖W*−W‖²: the summed squared target and
    # retain residuals of W' are at most λ‖W*−W‖², a bound that shrinks with λ.
    rows, weights = rows_and_weights(pipe, anchors=("a dog",))
    new = uce(weights, rows, UCEParams(lamb=lamb))
    t, a, r = torch.cat(rows.targets), torch.cat(rows.anchors), rows.retain
    x = torch.cat([t, r])
    for name, w in weights.items():
        goal = torch.cat([a @ w.T, r @ w.T])  # [n, d_out]
        # minimum-norm Δ* with (W+Δ*) x = goal: Δ* = E (x xᵀ)⁻¹ x, E = goal − W x
        error = goal - x @ w.T
        interpolant_change = torch.linalg.solve(x @ x.T, error).T @ x
        bound = lamb * interpolant_change.norm() ** 2
        target_res = ((t @ new[name].T - a @ w.T) ** 2).sum()
        retain_res = ((r @ new[name].T - r @ w.T) ** 2).sum()
        assert target_res + retain_res <= bound * (1 + 1e-9)
        before = ((t @ w.T - a @ w.T) ** 2).sum()
        assert target_res < 0.5 * before  # and the targets really moved towards the anchor


def test_uce_erase_end_to_end_changes_only_kv(pipe, untouched):
    edit = erasure.erase(pipe, "uce", targets=TARGETS, anchors=[""], retain=RETAIN)
    assert set(edited_weights(pipe, edit)) == set(pipeline_state(pipe).modules)  # every attn2.to_k / to_v
    assert edit.method == "uce" and edit.params == {"erase_scale": 1.0, "preserve_scale": 1.0, "lamb": 0.5,
                                                      "technique": "replace"}
    layer = next(iter(edit.stats["layers"].values()))
    assert layer["target_residual"] < 1 and layer["retain_drift"] < layer["target_residual"]


def test_uce_schema_has_reference_defaults():
    schema = get_method("uce").schema()
    assert {k: v["default"] for k, v in schema.items()} == {"erase_scale": 1.0, "preserve_scale": 1.0,
                                                           "lamb": 0.5, "technique": "replace"}
