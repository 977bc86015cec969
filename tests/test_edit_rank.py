"""The closed forms' weight changes are low-rank, and edits store them as factors.

UCE: (W′ − W) R = e (V − W Tᵀ)ᵀ T from eq. 7, so ΔW = [e (Vᵀ − W Tᵀ)] · [T R⁻¹]: rank = n target rows.
SPEED: ΔW = (W Eᵀ / N) · Y with E the targets' error rows [n, d]: rank = n.
ScaPre and ScaPre-scale rewrite every direction of the layer (a ridge toward a new map, and a proximal step),
so their changes are full rank and they stay dense."""

import pytest
import torch

import erasure
from erasure.cli.bench import densified
from erasure.engine.apply import edited_weights
from erasure.engine.pipeline import original_weight, pipeline_state
from erasure.engine.registry import get_method
from erasure.engine.text import encode_texts, validate_concepts


def numerical_rank(delta: torch.Tensor) -> int:
    values = torch.linalg.svdvals(delta.double())
    return int((values > values[0] * 1e-5).sum())


def dense_reference(pipe, method, targets, anchors, retain) -> dict[str, torch.Tensor]:
    """ΔW in float64 by another route than the stored factors: UCE's W·M − W (its d × d shared map, a different
    solve of eq. 7); SPEED's dense form W + (W Eᵀ / N) Y, whose formula test_speed checks against the paper's."""
    from erasure.methods.speed import speed
    from erasure.methods.uce import uce_shared_map

    spec = get_method(method)
    params = spec.parse_params({})
    concepts = validate_concepts(targets, anchors, retain, pipe.tokenizer, 10)
    rows = spec.prepare(concepts, params, lambda texts, full: encode_texts(pipe, texts, full))
    state = pipeline_state(pipe)
    weights = {n: original_weight(state, n).double() for n in state.modules if n.endswith(spec.edits(params))}
    if method == "uce":
        shared = uce_shared_map(rows, params)
        return {n: w @ shared - w for n, w in weights.items()}
    new = speed(weights, rows, params)
    return {n: new[n] - weights[n] for n in weights}


@pytest.mark.parametrize("method", ["uce", "speed"])
@pytest.mark.parametrize("targets, anchors", [(["cat"], [""]), (["cat", "golden retriever", "red car"], ["", "dog", ""])])
def test_closed_form_edits_store_factors_of_the_target_rank_that_reproduce_the_change(pipe, method, targets,
                                                                                        anchors):
    retain = ["dog", "car", "tree"]
    edit = erasure.erase(pipe, method, targets, anchors, retain)
    reference = dense_reference(pipe, method, targets, anchors, retain)
    state = pipeline_state(pipe)
    assert {f"{n}.delta" for n in reference} == set(edit.patches)
    for key, patch in edit.patches.items():
        module = key.removesuffix(".delta")
        assert patch.kind == "low_rank" and patch.value.shape[0] == len(targets)
        up, down = (f.double() for f in patch.factors(reference[module].shape[0]))
        assert numerical_rank(reference[module]) == len(targets), key  # the rank is the change's, not a choice
        assert (up @ down - reference[module]).norm() <= 1e-6 * reference[module].norm()
        # applying computes W + up @ down in float64 and casts once
        base = original_weight(state, module).double()
        assert torch.equal(edited_weights(pipe, edit)[module], (base + up @ down).float())


@pytest.mark.parametrize("method", ["scapre", "scapre-scale"])
def test_scapre_changes_are_full_rank_and_stay_dense(pipe, method):
    edit = erasure.erase(pipe, method, ["cat"], [""], [])
    state = pipeline_state(pipe)
    assert all(patch.kind == "tensor" for patch in edit.patches.values())
    key, patch = next(iter(edit.patches.items()))
    delta = patch.value.double() - original_weight(state, key.removesuffix(".weight")).double()
    assert numerical_rank(delta) == min(delta.shape)


def test_a_factored_edit_file_is_a_fraction_of_the_dense_one(tmp_path, pipe):
    edit = erasure.erase(pipe, "uce", ["cat", "golden retriever", "red car"], ["", "dog", ""], ["tree"])
    dense = densified(pipe, edit)
    factored_size = edit.save(tmp_path / "factored.safetensors").stat().st_size
    dense_size = dense.save(tmp_path / "dense.safetensors").stat().st_size
    # tiny: d_in 256, d_out 64: 3 × (64 + 256) factors vs 64 × 256 per matrix, ~1/17 with metadata
    assert factored_size < dense_size / 8
