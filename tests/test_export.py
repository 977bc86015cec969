"""Exports other tools load: a LoRA through diffusers' own `load_lora_weights` + `fuse_lora`, a baked pipeline
folder through `from_pretrained`, and the edited weights through `load_state_dict`."""

import pytest
import torch

import erasure
from erasure.engine.apply import edited_weights
from erasure.engine.compute import edit_from_patches
from erasure.engine.edit import Patch
from erasure.engine.export import export, lora_factors, save_baked, save_edited_weights, save_lora
from erasure.engine.pipeline import original_weight, pipeline_state
from erasure.engine.text import Concepts
from erasure.evaluation.generate import Settings, generate_images

BLOCK = "down_blocks.1.attentions.0.transformer_blocks.0"


@pytest.fixture(scope="module")
def edits(pipe):
    return {"uce": erasure.erase(pipe, "uce", ["cat", "golden retriever"], ["", "dog"], ["car", "tree"]),
            "speed": erasure.erase(pipe, "speed", ["Snoopy", "Mickey"], [""], ["Pikachu"])}


def fused(path) -> dict[str, torch.Tensor]:
    """Weights of a fresh tiny pipeline after diffusers loads and fuses the LoRA at `path`."""
    fresh = erasure.load_pipeline("tiny", device="cpu")
    fresh.load_lora_weights(str(path))
    fresh.fuse_lora()
    return {name: module.weight.detach() for name, module in fresh.unet.named_modules() if hasattr(module, "weight")}


def relative_change_error(pipe, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """‖(W_got − W) − (W_want − W)‖ / ‖W_want − W‖ over all layers: the error relative to the change itself."""
    state = pipeline_state(pipe)
    missed = total = 0.0
    for name, weight in want.items():
        base = original_weight(state, name).double()
        missed += float(((got[name].double() - base) - (weight.double() - base)).pow(2).sum())
        total += float((weight.double() - base).pow(2).sum())
    return (missed / total) ** 0.5


@pytest.mark.parametrize("method", ["uce", "speed"])
@pytest.mark.parametrize("style", ["peft", "kohya"])
def test_lora_at_exact_rank_fuses_into_the_applied_edit(tmp_path, pipe, edits, untouched, method, style):
    edit = edits[method]
    report = save_lora(pipe, edit, tmp_path / "lora.safetensors", style=style)
    assert report["rank"] == report["exact_rank"] == 2 and report["relative_error"] == 0.0
    want = edited_weights(pipe, edit)
    got = fused(tmp_path / "lora.safetensors")
    assert relative_change_error(pipe, got, want) <= 1e-5
    unedited = {n for n in got if n.endswith(("attn2.to_k", "attn2.to_v")) and n not in want}
    state = pipeline_state(pipe)
    assert all(torch.equal(got[n], original_weight(state, n)) for n in unedited)  # SPEED's V-only: keys untouched


def test_lora_at_a_lower_rank_reports_the_error_it_makes(tmp_path, pipe, edits, untouched):
    edit = edits["uce"]
    report = save_lora(pipe, edit, tmp_path / "lora.safetensors", rank=1)
    assert report["rank"] == 1 and report["exact_rank"] == 2
    measured = relative_change_error(pipe, fused(tmp_path / "lora.safetensors"), edited_weights(pipe, edit))
    assert 0.05 < report["relative_error"] < 1
    assert measured == pytest.approx(report["relative_error"], rel=1e-4)


def test_dense_and_mask_edits_export_by_svd(pipe, untouched):
    concepts = Concepts(("x",), ("",), ())
    w = original_weight(pipeline_state(pipe), f"{BLOCK}.attn2.to_v").double()
    generator = torch.Generator().manual_seed(0)
    change = torch.randn(w.shape[0], 3, generator=generator, dtype=torch.float64) @ torch.randn(
        3, w.shape[1], generator=generator, dtype=torch.float64) * 1e-2
    dense = edit_from_patches(pipe, "speed", {}, {f"{BLOCK}.attn2.to_v.weight": Patch("tensor", (w + change).float())},
                              concepts)
    factors = lora_factors(pipe, dense)
    assert factors.exact_ranks == {f"{BLOCK}.attn2.to_v": 3} and factors.relative_error < 1e-6
    mask = torch.ones(64)
    mask[:5] = 0  # five output units off: a change of rank 5
    masked = edit_from_patches(pipe, "speed", {}, {f"{BLOCK}.attn2.to_v.output_mask": Patch("output_mask", mask)},
                               concepts)
    assert lora_factors(pipe, masked).exact_ranks == {f"{BLOCK}.attn2.to_v": 5}
    removed = torch.linalg.svdvals(w[:5])  # ΔW = −(the five rows): its best rank-2 error is the other three values
    expected = float(removed[2:].norm() / removed.norm())
    assert lora_factors(pipe, masked, rank=2).relative_error == pytest.approx(expected, rel=1e-6)


def test_bias_changes_cannot_become_a_lora(tmp_path, pipe):
    concepts = Concepts(("x",), ("",), ())
    mask = torch.ones(64)
    mask[0] = 0
    edit = edit_from_patches(pipe, "minimalist", {}, {f"{BLOCK}.ff.net.2.output_mask": Patch("output_mask", mask)},
                             concepts)
    with pytest.raises(ValueError, match="bias vector.*cannot hold; export it baked"):
        save_lora(pipe, edit, tmp_path / "lora.safetensors")


def test_baked_pipeline_folder_renders_the_applied_edit_pixel_exactly(tmp_path, pipe, edits, untouched):
    edit = edits["uce"]
    save_baked(pipe, edit, tmp_path / "baked")
    baked = erasure.load_pipeline(str(tmp_path / "baked"), device="cpu")
    assert type(baked) is type(pipe)
    settings = Settings(steps=2, height=64, width=64)
    want = generate_images(pipe, ["a photo of a cat"], [0, 1], settings, edit)
    got = generate_images(baked, ["a photo of a cat"], [0, 1], settings)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(want, got))
    assert want[0].tobytes() != generate_images(pipe, ["a photo of a cat"], [0], settings)[0].tobytes()
    with pytest.raises(ValueError, match="not empty"):
        save_baked(pipe, edit, tmp_path / "baked")


def test_edited_weights_load_into_a_plain_unet_state_dict(tmp_path, pipe, edits, untouched):
    from safetensors.torch import load_file

    path = save_edited_weights(pipe, edits["speed"], tmp_path / "weights.safetensors")
    fresh = erasure.load_pipeline("tiny", device="cpu")
    result = fresh.unet.load_state_dict(load_file(str(path)), strict=False)
    assert not result.unexpected_keys
    modules = dict(fresh.unet.named_modules())
    assert all(torch.equal(modules[n].weight, w) for n, w in edited_weights(pipe, edits["speed"]).items())


def test_export_refuses_bad_requests(tmp_path, pipe, edits):
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        export(pipe, edits["uce"], tmp_path / "x", "onnx")
    with pytest.raises(ValueError, match="rank applies to LoRA exports only"):
        export(pipe, edits["uce"], tmp_path / "x", "diffusers", rank=2)
    with pytest.raises(ValueError, match="must end in .safetensors"):
        export(pipe, edits["uce"], tmp_path / "x.pt", "lora")
    with pytest.raises(ValueError, match="rank >= 1"):
        export(pipe, edits["uce"], tmp_path / "x.safetensors", "lora", rank=0)


@pytest.mark.parametrize("model", ["tiny-sd2", "tiny-sdxl", "tiny-flux"])
def test_every_family_round_trips_its_edit_file_lora_and_baked_folder(tmp_path, model):
    from erasure.evaluation.generate import default_settings

    pipe = erasure.load_pipeline(model, device="cpu")
    edit = erasure.erase(pipe, "uce", ["cat", "red car"], [""], ["dog"])
    loaded = erasure.Edit.load(edit.save(tmp_path / "edit.safetensors"))  # FLUX: context_embedder stands for K/V
    assert all(torch.equal(loaded.patches[k].value, p.value) for k, p in edit.patches.items())
    want = edited_weights(pipe, edit)

    for style in ("peft", "kohya"):  # kohya keys go through diffusers' own converter for each family
        report = save_lora(pipe, edit, tmp_path / f"{style}.safetensors", style=style)
        assert report["rank"] == report["exact_rank"] == 2
        fresh = erasure.load_pipeline(model, device="cpu")
        fresh.load_lora_weights(str(tmp_path / f"{style}.safetensors"))
        fresh.fuse_lora()
        got = {name: module.weight.detach() for name, module in pipeline_state(fresh).modules.items()}
        assert relative_change_error(pipe, got, want) <= 1e-5

    save_baked(pipe, edit, tmp_path / "baked")
    baked = erasure.load_pipeline(str(tmp_path / "baked"), device="cpu")
    settings = default_settings(pipe, steps=2)
    rendered = generate_images(baked, ["a photo of a cat"], [0], settings)[0]
    assert rendered.tobytes() == generate_images(pipe, ["a photo of a cat"], [0], settings, edit)[0].tobytes()


def test_exports_refuse_an_edit_made_for_other_base_weights(tmp_path, pipe, edits):
    other = erasure.load_pipeline("tiny", device="cpu")
    name = next(iter(edits["uce"].modules()))
    with torch.no_grad():
        pipeline_state(other).modules[name].weight.add_(1e-3)  # another model in a layer the edit changes
    for write in (lambda: save_lora(other, edits["uce"], tmp_path / "lora.safetensors"),
                  lambda: save_edited_weights(other, edits["uce"], tmp_path / "weights.safetensors")):
        with pytest.raises(erasure.EditMismatchError, match="made for another base model"):
            write()
