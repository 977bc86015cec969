"""Loading: a local diffusers folder loads through the normal from_pretrained path, and the engine
identifies the model by what was asked for."""

import torch

import erasure
from erasure.engine.pipeline import pipeline_state


def test_local_diffusers_folder_loads_and_accepts_edits_made_on_the_original(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "tiny-sd")
    loaded = erasure.load_pipeline(str(tmp_path / "tiny-sd"), device="cpu")
    assert pipeline_state(loaded).model_id == str(tmp_path / "tiny-sd")
    assert type(loaded).__name__ == "StableDiffusionPipeline" and loaded.unet.dtype == torch.float32
    edit = erasure.erase(pipe, "uce", ["Snoopy"], [""], [])
    with erasure.applied(loaded, edit):  # same weights, so the fingerprint matches
        pass


def test_tiny_is_deterministic_and_sd_shaped(pipe):
    again = erasure.load_pipeline("tiny", device="cpu")
    modules = pipeline_state(again).modules
    assert len(modules) == 8 and all(m.in_features == 256 for m in modules.values())
    assert all(torch.equal(m.weight, pipeline_state(pipe).modules[n].weight) for n, m in modules.items())
    assert again.tokenizer.model_max_length == 77 and len(again.tokenizer) == 49408
