"""The closed forms' weight changes are low-rank: UCE's and SPEED's ΔW = W′ − W has rank equal to the number of
target rows (one last-subject-token row per target), which is what lets an edit be stored as factors U Vᵀ.

UCE ("replace"): W′ = W M with M − I = e (A − T)ᵀ T R⁻¹, so ΔW = e W (A − T)ᵀ · T R⁻¹: rank ≤ n targets.
SPEED: ΔW = (W Eᵀ) · U with E the targets' error rows [n, d]: rank ≤ n. ScaPre rewrites every direction of
the layer (measured: full rank), so it stays dense."""

import pytest
import torch

import erasure
from erasure.pipeline import original_parameter, pipeline_state


def numerical_rank(delta: torch.Tensor) -> int:
    values = torch.linalg.svdvals(delta.double())
    return int((values > values[0] * 1e-5).sum())


@pytest.mark.parametrize("method", ["uce", "speed"])
@pytest.mark.parametrize("targets, anchors", [(["cat"], [""]), (["cat", "golden retriever"], ["", "dog"])])
def test_closed_form_changes_have_the_rank_of_their_target_rows(pipe, method, targets, anchors):
    edit = erasure.erase(pipe, method, targets, anchors, ["dog", "car", "tree"])
    state = pipeline_state(pipe)
    for key, patch in edit.patches.items():
        delta = patch.value.double() - original_parameter(state, key).double()
        assert numerical_rank(delta) == len(targets), key
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        rank = len(targets)
        factored = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert (factored - delta).norm() <= 1e-6 * delta.norm()  # the factors reproduce the change


def test_scapre_changes_are_full_rank(pipe):
    edit = erasure.erase(pipe, "scapre", ["cat"], [""], [])
    state = pipeline_state(pipe)
    key, patch = next(iter(edit.patches.items()))
    delta = patch.value.double() - original_parameter(state, key).double()
    assert numerical_rank(delta) == min(delta.shape)
