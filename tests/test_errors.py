"""Bad input: every mistake gets a specific ValueError and leaves the shared pipeline untouched."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import erasure
from erasure.engine.apply import edited_weights


@pytest.mark.parametrize("kwargs,message", [
    (dict(targets=[]), "no target concept"),
    (dict(targets=["Snoopy", "  "]), "target concept #2 is empty"),
    (dict(targets=["Snoopy", "snoopy"]), "given twice"),
    (dict(targets=["a", "b", "c"], anchors=["x", "y"]), "got 2 anchors for 3 targets"),
    (dict(targets=["a", "b"], anchors=[]), "got 0 anchors for 2 targets"),
    (dict(targets="Snoopy"), "must be lists of strings"),
    (dict(method="esd-magic"), "unknown method 'esd-magic'; choose from"),
    (dict(bogus=1), r"unknown parameter\(s\) \['bogus'\]"),
    (dict(method="uce", lamb=float("nan")), "'lamb' must be a finite number"),
    (dict(method="uce", erase_scale=-1.0), "'erase_scale' must be >= 0.0"),
    (dict(threshold=math.inf), "'threshold' must be a finite number"),
    (dict(params="Q"), r"'params' must be one of \['V', 'K', 'KV'\]"),
    (dict(aug_num=2.5), "'aug_num' must be a whole number"),
    (dict(disable_filter="maybe"), "must be true or false"),
    (dict(retain_scale=0.0), "'retain_scale' must be > 0"),
    (dict(targets=["a", "b", "c"], max_concepts=2), "3 target concepts exceed the cap of 2"),
])
def test_bad_erase_input_is_refused_with_a_specific_message(pipe, untouched, kwargs, message):
    call = dict(method="speed", targets=["Snoopy"], anchors=[""], retain=["Pikachu"]) | kwargs
    with pytest.raises(ValueError, match=message):
        erasure.erase(pipe, call.pop("method"), **call)


def test_over_long_concept_is_truncated_with_a_warning(pipe, untouched):
    long_concept = " ".join(["snoopy"] * 100)
    with pytest.warns(UserWarning, match="truncated"):
        edit = erasure.erase(pipe, "uce", [long_concept], [""], [])
    assert all(torch.isfinite(w).all() for w in edited_weights(pipe, edit).values())


@pytest.fixture
def snoopy_edit(pipe):
    return erasure.erase(pipe, "speed", ["Snoopy"], [""], ["Pikachu"])


def stored(edit) -> dict[str, torch.Tensor]:
    """The tensors an edit file holds, by key."""
    return {key: patch.value for key, patch in edit.patches.items()}


def test_non_safetensors_edit_file_is_refused(tmp_path, snoopy_edit):
    pickle_file = tmp_path / "edit.pt"
    torch.save(stored(snoopy_edit), pickle_file)
    with pytest.raises(erasure.EditFileError, match="pickle files .* are refused"):
        erasure.Edit.load(pickle_file)


def test_corrupt_edit_file_is_refused(tmp_path, snoopy_edit):
    path = snoopy_edit.save(tmp_path / "edit.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(erasure.EditFileError, match="not a readable safetensors file"):
        erasure.Edit.load(path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(erasure.EditFileError, match="not a readable safetensors file"):
        erasure.Edit.load(garbage)


def test_safetensors_without_edit_metadata_is_refused(tmp_path, snoopy_edit):
    path = tmp_path / "plain.safetensors"
    save_file(stored(snoopy_edit), str(path))
    with pytest.raises(erasure.EditFileError, match="not an Erasure Studio edit"):
        erasure.Edit.load(path)


def test_edit_file_with_tensors_its_metadata_does_not_list_is_refused(tmp_path, snoopy_edit):
    path = tmp_path / "sneaky.safetensors"
    tensors = stored(snoopy_edit)
    tensors["conv_in.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(path), metadata=snoopy_edit.metadata())
    with pytest.raises(erasure.EditFileError, match="'patches' must name the kind of exactly the tensors stored"):
        erasure.Edit.load(path)


def test_edit_with_wrong_shapes_is_refused_and_pipeline_untouched(pipe, untouched, snoopy_edit):
    name = next(iter(edited_weights(pipe, snoopy_edit)))
    broken = erasure.Edit.from_weights({name: torch.zeros(3, 3)}, "speed", {}, ["x"], [""], [], "tiny",
                                       snoopy_edit.fingerprint)
    with pytest.raises(erasure.EditMismatchError, match="has shape"):
        with erasure.applied(pipe, broken):
            pass


def test_unknown_model_gives_one_clear_sentence():
    with pytest.raises(erasure.ModelLoadError, match="could not load model 'nobody/no-such-model'.*'tiny'"):
        erasure.load_pipeline("nobody/no-such-model", device="cpu")
    with pytest.raises(erasure.ModelLoadError, match="neither a local folder/file nor a hub id"):
        erasure.load_pipeline("no-such-folder", device="cpu")


@pytest.mark.parametrize("field,value,message", [
    ("retain", json.dumps(["x" * 200] * 50_000), "MiB of metadata; edit files may hold at most 8 MiB"),
    ("retain", json.dumps([f"c{i}" for i in range(20_001)]), "edits hold at most 1000 and 20000"),
    ("targets", '"Snoopy"', "must be lists of strings"),
    ("targets", "[1, 2]", "must be lists of strings"),
    ("anchors", '["", ""]', "one anchor per target"),
    ("stats", "[]", "must be JSON objects"),
])
def test_edit_file_with_malformed_metadata_is_refused(tmp_path, snoopy_edit, field, value, message):
    path = tmp_path / "odd.safetensors"
    save_file(stored(snoopy_edit), str(path), metadata=snoopy_edit.metadata() | {field: value})
    with pytest.raises(erasure.EditFileError, match=message):
        erasure.Edit.load(path)
