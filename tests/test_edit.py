"""Edit lifecycle: applied() writes and restores bitwise, nests, serialises threads; safetensors
round trip; fingerprints refuse edits made for another model."""

import threading

import pytest
import torch
from conftest import render, snapshot

import erasure
from erasure.engine.apply import edited_weights, touched_parameters
from erasure.engine.pipeline import pipeline_state


@pytest.fixture(scope="module")
def edits(pipe):
    return {
        "snoopy": erasure.erase(pipe, "speed", ["Snoopy"], [""], ["Pikachu", "Garfield"]),
        "mickey": erasure.erase(pipe, "uce", ["Mickey"], ["a mouse"], ["Minnie Mouse"]),
    }


def test_applied_writes_edit_then_restores_bitwise(pipe, edits, untouched):
    edit = edits["snoopy"]
    modules = pipeline_state(pipe).modules
    with erasure.applied(pipe, edit):
        for name, tensor in edited_weights(pipe, edit).items():
            assert torch.equal(modules[name].weight, tensor)
    # `untouched` asserts bitwise restore at teardown


def test_applied_restores_when_body_raises(pipe, edits, untouched):
    with pytest.raises(RuntimeError, match="boom"):
        with erasure.applied(pipe, edits["snoopy"]):
            raise RuntimeError("boom")


def test_applied_keeps_modules_so_hooks_stay_valid(pipe, edits, untouched):
    modules = pipeline_state(pipe).modules
    identities = {name: (id(m), m.weight.data_ptr()) for name, m in modules.items()}
    with erasure.applied(pipe, edits["snoopy"]):
        assert {name: (id(m), m.weight.data_ptr()) for name, m in modules.items()} == identities


def test_nested_applied_composes_and_unwinds(pipe, edits, untouched):
    outer, inner = edits["snoopy"], edits["mickey"]  # V-only SPEED, then K+V UCE
    modules = pipeline_state(pipe).modules
    with erasure.applied(pipe, outer):
        with erasure.applied(pipe, inner):
            for name, tensor in edited_weights(pipe, inner).items():
                assert torch.equal(modules[name].weight, tensor)  # inner wins where both edit
            with erasure.applied(pipe, None):  # base weights on demand, even inside edits
                assert_base(pipe, untouched)
        for name, tensor in edited_weights(pipe, outer).items():
            assert torch.equal(modules[name].weight, tensor)
        assert set(pipeline_state(pipe).originals) == {f"{name}.weight" for name in outer.modules()}


def assert_base(pipe, base):
    for name, parameter in pipeline_state(pipe).parameters.items():
        assert torch.equal(parameter, base[name])


def test_concurrent_threads_each_see_only_their_own_edit(pipe, edits, untouched):
    # Reference images, one at a time; then 6 threads at once must reproduce them exactly.
    jobs = [None, edits["snoopy"], edits["mickey"]] * 2
    expected = []
    for edit in jobs[:3]:
        with erasure.applied(pipe, edit):
            expected.append(render(pipe, "a photo of Snoopy"))
    results, errors = [None] * len(jobs), []

    def work(i, edit):
        try:
            with erasure.applied(pipe, edit):
                results[i] = render(pipe, "a photo of Snoopy")
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i, e)) for i, e in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, image in enumerate(results):
        assert (image == expected[i % 3]).all()
    assert not (expected[0] == expected[1]).all()  # the edits do change this image


def test_save_load_round_trip_is_bitwise(tmp_path, edits):
    for edit in edits.values():
        path = edit.save(tmp_path / f"{edit.method}.safetensors")
        loaded = erasure.Edit.load(path)
        assert loaded.patches.keys() == edit.patches.keys()
        assert all(torch.equal(loaded.patches[k].value, p.value) for k, p in edit.patches.items())
        assert (loaded.method, loaded.params, loaded.targets, loaded.anchors, loaded.retain, loaded.model_id,
                loaded.fingerprint) == (edit.method, edit.params, edit.targets, edit.anchors, edit.retain,
                                         edit.model_id, edit.fingerprint)
        assert loaded.stats["layers"] == edit.stats["layers"]


def test_edit_for_another_model_is_refused(pipe, edits, untouched):
    other = erasure.load_pipeline("tiny", device="cpu")
    with torch.no_grad():
        name = next(iter(edited_weights(pipe, edits["snoopy"])))
        pipeline_state(other).modules[name].weight.add_(1e-3)  # a different base model in a replaced layer
    with pytest.raises(erasure.EditMismatchError, match="another base model"):
        with erasure.applied(other, edits["snoopy"]):
            pass
    with erasure.applied(other, erasure.erase(other, "speed", ["Snoopy"], [""], [])):
        pass  # its own edits still apply


def test_fingerprint_agrees_between_fp32_and_fp16_loads(pipe, edits):
    half = erasure.load_pipeline("tiny", device="cpu", dtype=torch.float16)
    with erasure.applied(half, edits["snoopy"]):  # an fp32-made edit applies to the fp16 pipeline
        modules = pipeline_state(half).modules
        name = next(iter(edited_weights(pipe, edits["snoopy"])))
        assert modules[name].weight.dtype == torch.float16
    base = erasure.load_pipeline("tiny", device="cpu", dtype=torch.float16)
    assert all(torch.equal(m.weight, pipeline_state(base).modules[n].weight)
               for n, m in pipeline_state(half).modules.items())  # fp16 restore is bitwise too


def test_restored_weights_keep_their_digest_so_the_next_apply_does_not_rehash(pipe, edits, untouched):
    state = pipeline_state(pipe)
    edit = edits["snoopy"]
    with erasure.applied(pipe, edit):
        pass
    for name in touched_parameters(state, edit):
        weight = state.parameters[name]
        assert state.digests[name][0] == (weight.data_ptr(), weight._version)  # cache entry is current
