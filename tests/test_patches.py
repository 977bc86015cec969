"""The general edit: tensor patches on any weight or bias, neuron masks as row scalings, head masks as
column scalings; write/restore primitives; "edit from step k" generation; format 2 files and the
strict checks on them (format-1 files still load)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import erasure
from erasure.engine.apply import edited_weights, restore, touched_parameters, write_edit
from erasure.engine.compute import edit_from_patches
from erasure.engine.edit import Edit, Patch
from erasure.engine.pipeline import fingerprint, pipeline_state
from erasure.engine.text import Concepts
from erasure.evaluation.generate import Settings, generate_images

BLOCK = "down_blocks.1.attentions.0.transformer_blocks.0"
FF_IN, FF_OUT = f"{BLOCK}.ff.net.0.proj", f"{BLOCK}.ff.net.2"  # 64 -> 512 (GEGLU), 256 -> 64; both with bias
SELF_OUT = f"{BLOCK}.attn1.to_out.0"  # 64 -> 64 with bias; its input is 8 heads x 8 features
HEADS = 8


def make_edit(pipe, patches: dict[str, Patch], method: str = "speed") -> Edit:
    """An edit of hand-made patches, fingerprinted over what it writes (no method declaration involved)."""
    state = pipeline_state(pipe)
    edit = Edit(patches, method, {}, ["x"], [""], [], state.model_id, "")
    with state.lock:
        edit.fingerprint = fingerprint(state, touched_parameters(state, edit))
    return edit


def masks(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"neurons": torch.rand(512, generator=generator), "binary": (torch.rand(64, generator=generator) > 0.5).float(),
            "heads": torch.rand(HEADS, generator=generator)}


def unet_output(pipe, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 32, 32, generator=generator)
    context = torch.randn(2, 77, 256, generator=generator)
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([500, 20]), encoder_hidden_states=context).sample


def relative(a, b):
    return float((a - b).norm() / b.norm())


def test_mask_patches_equal_the_same_masks_applied_by_forward_hooks(pipe, untouched):
    m = masks()
    modules = dict(pipe.unet.named_modules())
    hooks = [
        modules[FF_IN].register_forward_hook(lambda mod, args, out: out * m["neurons"]),
        modules[FF_OUT].register_forward_hook(lambda mod, args, out: out * m["binary"]),
        modules[SELF_OUT].register_forward_pre_hook(
            lambda mod, args: (args[0] * m["heads"].repeat_interleave(64 // HEADS),)),
    ]
    try:
        hooked = unet_output(pipe)
    finally:
        for hook in hooks:
            hook.remove()
    base = unet_output(pipe)
    edit = make_edit(pipe, {f"{FF_IN}.output_mask": Patch("output_mask", m["neurons"]),
                            f"{FF_OUT}.output_mask": Patch("output_mask", m["binary"]),
                            f"{SELF_OUT}.input_mask": Patch("input_mask", m["heads"])})
    with erasure.applied(pipe, edit):
        patched = unet_output(pipe)
    # y = m ⊙ (Wx + b) and (diag(m) W) x + m ⊙ b differ only by float32 rounding of the products
    assert relative(patched, hooked) <= 1e-6
    assert relative(patched, base) > 1e-3  # the masks do change the output


def weight_and_bias_edit(pipe):
    state = pipeline_state(pipe)
    generator = torch.Generator().manual_seed(1)
    weight, bias = state.parameters[f"{SELF_OUT}.weight"], state.parameters[f"{SELF_OUT}.bias"]
    return make_edit(pipe, {
        f"{SELF_OUT}.weight": Patch("tensor", torch.randn(weight.shape, generator=generator)),
        f"{SELF_OUT}.bias": Patch("tensor", torch.randn(bias.shape, generator=generator)),
        f"{FF_OUT}.output_mask": Patch("output_mask", masks()["binary"]),
    })


def test_weight_and_bias_patches_write_then_restore_bitwise(pipe, untouched):
    edit = weight_and_bias_edit(pipe)
    parameters = pipeline_state(pipe).parameters
    with erasure.applied(pipe, edit):
        assert torch.equal(parameters[f"{SELF_OUT}.bias"], edit.patches[f"{SELF_OUT}.bias"].value)
        scaled = untouched[f"{FF_OUT}.bias"] * masks()["binary"]
        assert torch.equal(parameters[f"{FF_OUT}.bias"], scaled)  # an output mask scales the bias too
    # `untouched` asserts at teardown that every UNet parameter is bitwise back


def test_weight_and_bias_patches_restore_when_the_body_raises(pipe, untouched):
    with pytest.raises(RuntimeError, match="boom"):
        with erasure.applied(pipe, weight_and_bias_edit(pipe)):
            raise RuntimeError("boom")


def test_write_and_restore_primitives_swap_an_edit_in_and_out(pipe, untouched):
    edit = weight_and_bias_edit(pipe)
    state = pipeline_state(pipe)
    with erasure.applied(pipe, None):  # hold the lock, as generation does between steps
        for _ in range(3):
            record = write_edit(pipe, edit)
            assert torch.equal(state.parameters[f"{SELF_OUT}.weight"], edit.patches[f"{SELF_OUT}.weight"].value)
            restore(pipe, record)
            assert torch.equal(state.parameters[f"{SELF_OUT}.weight"], untouched[f"{SELF_OUT}.weight"])
            assert not state.originals


def pixels(images):
    return np.stack([np.asarray(image) for image in images])


def test_edit_from_step_zero_is_the_edited_generation_and_from_the_last_step_the_original(pipe, untouched):
    settings = Settings(steps=4, guidance=7.5, height=64, width=64)
    edit = erasure.erase(pipe, "uce", ["Snoopy"], [""], [], erase_scale=5.0)
    prompts, seeds = ["a photo of Snoopy"], [0, 1]
    original = pixels(generate_images(pipe, prompts, seeds, settings))
    edited = pixels(generate_images(pipe, prompts, seeds, settings, edit))
    from_zero = pixels(generate_images(pipe, prompts, seeds, settings, edit, edit_from_step=0))
    from_end = pixels(generate_images(pipe, prompts, seeds, settings, edit, edit_from_step=settings.steps))
    halfway = pixels(generate_images(pipe, prompts, seeds, settings, edit, edit_from_step=2))
    assert np.array_equal(from_zero, edited)
    assert np.array_equal(from_end, original)
    assert not np.array_equal(edited, original)
    assert not np.array_equal(halfway, edited) and not np.array_equal(halfway, original)
    with pytest.raises(ValueError, match="edit_from_step must be between 0 and the 4 steps"):
        generate_images(pipe, prompts, seeds, settings, edit, edit_from_step=5)


def test_mask_edits_save_as_masks_and_load_bitwise(tmp_path, pipe, untouched):
    concepts = Concepts(("x",), ("",), ())
    mask = masks()["binary"]
    edit = edit_from_patches(pipe, "speed", {"params": "V"},
                             {f"{BLOCK}.attn2.to_v.output_mask": Patch("output_mask", mask)}, concepts)
    loaded = Edit.load(edit.save(tmp_path / "mask.safetensors"))
    assert loaded.patches.keys() == edit.patches.keys()
    assert loaded.patches[f"{BLOCK}.attn2.to_v.output_mask"].kind == "output_mask"
    assert torch.equal(loaded.patches[f"{BLOCK}.attn2.to_v.output_mask"].value, mask)
    # per-layer statistics for a mask: the relative change of the effective weight
    weight = untouched[f"{BLOCK}.attn2.to_v.weight"]
    expected = float((weight * mask[:, None] - weight).norm() / weight.norm())
    assert loaded.stats["layers"][f"{BLOCK}.attn2.to_v"]["relative_change"] == pytest.approx(expected, rel=1e-6)
    erasure.check_applicable(pipe, loaded)


def test_trained_method_may_not_patch_undeclared_modules(pipe):
    with pytest.raises(ValueError, match=rf"speed may not change '{FF_OUT}'"):
        edit_from_patches(pipe, "speed", {}, {f"{FF_OUT}.output_mask": Patch("output_mask", torch.ones(64))},
                          Concepts(("x",), ("",), ()))


def test_version_1_files_still_load_and_apply(tmp_path, pipe, untouched):
    edit = erasure.erase(pipe, "speed", ["Snoopy"], [""], ["Pikachu"])
    path = tmp_path / "v1.safetensors"
    metadata = {k: v for k, v in edit.metadata().items() if k != "patches"} | {"version": "1"}
    save_file({f"{n}.weight": w for n, w in edited_weights(pipe, edit).items()}, str(path), metadata=metadata)
    loaded = Edit.load(path)
    assert all(patch.kind == "tensor" for patch in loaded.patches.values())
    with erasure.applied(pipe, loaded):  # its fingerprint (hashed by module name in format 1) still matches
        for name, weight in edited_weights(pipe, edit).items():
            assert torch.equal(pipeline_state(pipe).modules[name].weight, weight)


def edit_file(tmp_path, edit: Edit, extra: dict[str, tuple[str, torch.Tensor]]) -> str:
    """`edit` saved with extra (kind, tensor) entries, as a hand-made or corrupted file would hold them."""
    tensors = {key: patch.value for key, patch in edit.patches.items()}
    kinds = {key: patch.kind for key, patch in edit.patches.items()}
    for key, (kind, value) in extra.items():
        tensors[key], kinds[key] = value, kind
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=edit.metadata() | {"patches": json.dumps(kinds)})
    return path


V = f"{BLOCK}.attn2.to_v"


@pytest.mark.parametrize("extra,message", [
    ({f"{BLOCK}.attn2.to_nowhere.weight": ("tensor", torch.zeros(64, 256))},
     "changes 'down_blocks.1.*to_nowhere', which method 'speed' does not edit"),
    ({f"{BLOCK}.attn1.to_out.0.bias": ("tensor", torch.zeros(64))},
     r"changes '.*attn1.to_out.0', which method 'speed' does not edit \(it edits only modules ending in attn2.to_v\)"),
    ({f"{V}.output_mask": ("output_mask", torch.full((64,), 1.5))}, r"values outside \[0, 1\]"),
    ({f"{V}.output_mask": ("output_mask", torch.ones(64, 2))}, "must be 1-D"),
    ({f"{V}.output_mask": ("tensor", torch.ones(64))}, "marked 'tensor' but a .output_mask key"),
    ({f"{V}.bias": ("tensor", torch.tensor([float("nan")] * 64))}, "NaN or infinite"),
    ({"conv_in.weight; rm -rf": ("tensor", torch.zeros(2))}, "not a parameter key"),
    ({f"{V}.delta": ("low_rank", torch.zeros(320))}, r"low-rank patch .* must be 2-D \[rank, d_out \+ d_in\]"),
    ({f"{V}.delta": ("tensor", torch.zeros(1, 320))}, "marked 'tensor' but a .delta key holds a 'low_rank' patch"),
])
def test_bad_edit_files_are_refused_with_their_own_message(tmp_path, pipe, untouched, extra, message):
    edit = erasure.erase(pipe, "speed", ["Snoopy"], [""], ["Pikachu"])
    with pytest.raises(erasure.EditFileError, match=message):
        Edit.load(edit_file(tmp_path, edit, extra))


@pytest.mark.parametrize("patch,message", [
    ((f"{BLOCK}.attn2.to_v.weight", Patch("tensor", torch.zeros(64, 255))), r"has shape \(64, 255\) but this"),
    ((f"{BLOCK}.attn2.to_v.bias", Patch("tensor", torch.zeros(64))), "is not a parameter of this pipeline's denoiser"),
    (("down_blocks.9.attentions.0.transformer_blocks.0.attn2.to_v.weight", Patch("tensor", torch.zeros(64, 256))),
     "'down_blocks.9.*', which is not a parameter"),
    ((f"{BLOCK}.attn2.to_v.output_mask", Patch("output_mask", torch.ones(63))), "has 63 factors but"),
    ((f"{BLOCK}.attn2.to_v.input_mask", Patch("input_mask", torch.ones(7))), "do not divide the 256 input columns"),
])
def test_a_file_that_does_not_fit_this_model_is_refused_before_anything_is_written(tmp_path, pipe, untouched,
                                                                                     patch, message):
    base = erasure.erase(pipe, "speed", ["Snoopy"], [""], ["Pikachu"])
    key, value = patch
    loaded = Edit.load(edit_file(tmp_path, base, {key: (value.kind, value.value)}))  # well-formed on its own
    with pytest.raises(erasure.EditMismatchError, match=message):
        erasure.check_applicable(pipe, loaded)
    with pytest.raises(erasure.EditMismatchError, match=message):
        with erasure.applied(pipe, loaded):
            pass


def test_low_rank_patches_need_format_3_and_factors_as_wide_as_their_weight(tmp_path, pipe, untouched):
    edit = erasure.erase(pipe, "speed", ["Snoopy"], [""], ["Pikachu"])
    assert edit.metadata()["version"] == "3"
    path = tmp_path / "v2.safetensors"
    save_file({key: patch.value for key, patch in edit.patches.items()}, str(path),
              metadata=edit.metadata() | {"version": "2"})
    with pytest.raises(erasure.EditFileError, match="low-rank patch .* in an edit of format version 2"):
        Edit.load(path)
    with pytest.raises(erasure.EditMismatchError, match=r"factors of width 100, but .* has a 64x256 weight"):
        edit_from_patches(pipe, "speed", {}, {f"{V}.delta": Patch("low_rank", torch.ones(1, 100))},
                          Concepts(("x",), ("",), ()))
    dense = erasure.erase(pipe, "scapre", ["Snoopy"], [""], [])
    assert dense.metadata()["version"] == "2"  # nothing new in it: older readers still take it
