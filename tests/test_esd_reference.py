"""ESD as the authors' reference script (rohitgandikota/erasing, esd_sd.py) trains it: its defaults, trajectories of
the pipeline's own scheduler, `erase_from`, and the esd-u variant (every Linear/Conv2d outside cross-attention).

Runs are cut for the CPU (32-px samples, a few iterations of a few sampler steps); the defaults are asserted
from the schema.
"""

import copy

import pytest
import torch

import erasure
from erasure.engine.registry import get_method
from erasure.engine.training import TrainingJob
from erasure.methods.esd import UNCONDITIONAL, ESDParams, esd_goal, reference_batch, scheduler_class

TINY = dict(iterations=2, sample_steps=4, train_size=32, lr=1e-3)


def test_esd_defaults_are_the_reference_scripts():
    for method in ("esd-x", "esd-x-strict", "esd-u"):
        schema = get_method(method).schema()
        defaults = {name: spec["default"] for name, spec in schema.items()}
        assert defaults["iterations"] == 200 and defaults["lr"] == 5e-5
        assert defaults["batch"] == 1  # the script's batchsize
        assert defaults["sampling"] == "reference" and schema["sampling"]["choices"] == ["reference", "cached"]
        # --num_inference_steps and --guidance_scale of the trajectories
        assert defaults["sample_steps"] == 50 and defaults["sample_guidance"] == 3.0
        assert defaults["eta"] + 1 == 2  # --negative_guidance 2 is the paper form's η = 1
        assert "negative_guidance 2" in schema["eta"]["help"]
        assert defaults["erase_from"] == ""  # none: the concept itself
        assert defaults["train_size"] == 0  # the model's native size (the script's 1024 px on SD-1.x is a slip)
        assert get_method(method).params is ESDParams
    assert get_method("esd-u").edits(ESDParams()) == UNCONDITIONAL


def test_the_erase_from_target_is_the_reference_scripts():
    generator = torch.Generator().manual_seed(0)
    eps_from, eps_concept, eps_empty = torch.randn(3, 2, 4, 8, 8, generator=generator)
    eta = 1.0
    negative_guidance = eta + 1
    # esd_sd.py: ε_from − negative_guidance · (ε_concept − ε_∅)
    assert torch.allclose(esd_goal(eps_from, eps_concept, eps_empty, eta),
                          eps_from - negative_guidance * (eps_concept - eps_empty), atol=1e-6)
    # without erase_from (from = the concept): the paper's ε_∅ − η (ε_c − ε_∅)
    assert torch.allclose(esd_goal(eps_concept, eps_concept, eps_empty, eta),
                          eps_empty - eta * (eps_concept - eps_empty), atol=1e-6)


def test_reference_trajectories_are_the_pipelines_own_scheduler_stopped_at_a_step(pipe, untouched):
    """x_t after k steps of the pipeline's own PNDM with CFG 3, the scheduler's k-th timestep and the target there
    equal a loop written here with a copy of the pipeline's scheduler and the shared UNet's base weights."""
    job = TrainingJob.for_pipeline(pipe)
    assert scheduler_class(job.scheduler_config) is type(pipe.scheduler) is not None
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    params = ESDParams(sample_steps=6, train_size=32, erase_from="a dog")
    prototype = copy.deepcopy(pipe.scheduler)
    prototype.set_timesteps(6)
    texts = ["", "a dog", "cat"]
    rows = dict(zip(texts, job.encode(texts)))
    stop, seeds = 3, [20_000, 20_001]
    x, t, conditioning, goal = reference_batch(job, prototype, rows, [("cat", "")] * 2, seeds, stop, params)

    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(6)
    assert len(scheduler.timesteps) == 7 and scheduler.timesteps[1] == scheduler.timesteps[2]  # PNDM's repeat
    latents = job.noise(seeds, 32) * scheduler.init_noise_sigma

    def eps(x, t, text):
        with torch.no_grad():
            return pipe.unet(x, t, encoder_hidden_states=rows[text].expand(len(x), -1, -1)).sample

    for step_t in scheduler.timesteps[:stop]:
        empty, dog = eps(latents, step_t, ""), eps(latents, step_t, "a dog")
        latents = scheduler.step(empty + 3.0 * (dog - empty), step_t, latents).prev_sample
    assert int(t) == int(scheduler.timesteps[stop])
    assert torch.allclose(x, latents, atol=1e-5, rtol=1e-4)
    assert torch.equal(conditioning, rows["a dog"].expand(2, -1, -1))
    expected = eps(latents, t, "a dog") - 2.0 * (eps(latents, t, "cat") - eps(latents, t, ""))
    assert torch.allclose(goal, expected, atol=1e-5, rtol=1e-4)


def linear_and_conv_parameters(unet) -> dict[str, str]:
    """Every Linear/Conv2d parameter of the UNet, by name -> its module's name."""
    return {f"{name}.{own}": name for name, module in unet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) for own, _ in module.named_parameters()}


def assert_trains_exactly(pipe, edit, expected: set[str]) -> None:
    """The edit holds a tensor for exactly `expected`; applied, exactly those parameters differ; restored, the
    UNet's state dict is bitwise what it was."""
    assert set(edit.patches) == expected and all(p.kind == "tensor" for p in edit.patches.values())
    before = {name: value.clone() for name, value in pipe.unet.state_dict().items()}
    with erasure.applied(pipe, edit):
        changed = {name for name, value in pipe.unet.state_dict().items() if not torch.equal(value, before[name])}
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert changed == expected


def test_esd_u_trains_every_linear_and_conv_outside_cross_attention_and_no_norm(pipe, untouched):
    edit = erasure.erase(pipe, "esd-u", ["cat"], [""], **TINY)
    everything = linear_and_conv_parameters(pipe.unet)
    expected = {name for name, module in everything.items() if "attn2" not in module}
    norms = {name for name, module in pipe.unet.named_modules()
             if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
    assert not any(name.rsplit(".", 1)[0] in norms for name in expected)
    for layer in ("conv_in.weight", "conv_out.bias", "time_embedding.linear_1.weight", "attn1.to_q.weight",
                  "ff.net.0.proj.weight", "ff.net.2.bias", "proj_in.weight", "time_emb_proj.weight",
                  "conv_shortcut.weight", "downsamplers.0.conv.weight", "upsamplers.0.conv.bias"):
        assert any(name.endswith(layer) for name in expected), layer
    assert_trains_exactly(pipe, edit, expected)
    assert edit.stats["trained_parameters"] == sum(p.value.numel() for p in edit.patches.values())
    assert edit.stats["sampler"] == "PNDMScheduler" and edit.method == "esd-u"


def test_erase_from_trains_cross_attention_on_the_other_prompt_and_restores_bitwise(pipe, untouched):
    plain = erasure.erase(pipe, "esd-x", ["cat"], [""], **TINY)
    same = erasure.erase(pipe, "esd-x", ["cat"], [""], **TINY, erase_from="cat")
    other = erasure.erase(pipe, "esd-x", ["cat"], [""], **TINY, erase_from="a dog")
    expected = {name for name, module in linear_and_conv_parameters(pipe.unet).items() if "attn2" in module}
    assert_trains_exactly(pipe, other, expected)
    assert other.params["erase_from"] == "a dog" and plain.params["erase_from"] == ""
    # erase_from = the concept is the plain method, bitwise; another prompt trains something else
    assert all(torch.equal(p.value, same.patches[k].value) for k, p in plain.patches.items())
    assert any(not torch.equal(p.value, other.patches[k].value) for k, p in plain.patches.items())


def test_cached_sampling_stays_available(pipe, untouched):
    edit = erasure.erase(pipe, "esd-x", ["cat"], [""], iterations=2, sampling="cached", trajectories=1,
                         sample_steps=3, batch=2, train_size=32)
    assert edit.stats["cached_pairs"] == 3 and "sampler" not in edit.stats
    with pytest.raises(ValueError, match="sampling"):
        erasure.erase(pipe, "esd-x", ["cat"], [""], sampling="ddim")
