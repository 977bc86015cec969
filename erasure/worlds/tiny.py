"""Offline building blocks: the real CLIP tokenizer from open_clip's BPE file, and pipelines of every
supported family with random weights built from configs (the diffusers fast-test pattern).

"tiny" (SD-1.x) is for tests and the offline demo; "tiny-sd2", "tiny-sdxl" and "tiny-flux" are the same
idea in the other families' shapes (SD-2: OpenCLIP's gelu and "!" padding, linear projections,
v-prediction; SDXL: two text encoders and the text-time additional embedding; FLUX: a CLIP pooled
encoder, a T5 encoder and a joint-attention transformer). "sd14-random" has the full SD-1.4 architecture
with random weights: timings do not depend on weight values, so it is what `python -m erasure bench` measures.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch

from erasure.engine.pipeline import attach_profile
from erasure.engine.profiles import ModelProfile, register_source

# The tiny text encoder is wider (256) than two 77-token contexts (prompt + CFG's empty prompt), as
# SD-1's (768) is: their token rows then span a proper subspace, so null-space guarantees are testable
# exactly as they hold on the real model.
TINY_TEXT = dict(vocab_size=49408, hidden_size=256, intermediate_size=296, projection_dim=256,
                 num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5,
                 hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=256, norm_num_groups=2)
TINY_VAE = dict(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)

SD14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                 num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
                 freq_shift=0, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1,
                 mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
                 cross_attention_dim=768, attention_head_dim=8)
SD14_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", norm_num_groups=32,
                scaling_factor=0.18215)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)

# SD-2.x: OpenCLIP's activation, per-block head counts and linear projections in the transformers, v-prediction
# (2.x-768's objective); the tokenizer pads with "!".
TINY_SD2_TEXT = {**TINY_TEXT, "hidden_act": "gelu"}
TINY_SD2_UNET = {**TINY_UNET, "attention_head_dim": (2, 4), "use_linear_projection": True}
SD2_SCHEDULER = {**SD_SCHEDULER, "prediction_type": "v_prediction"}
# SDXL (diffusers' fast-test shape): CLIP-L-like and OpenCLIP-bigG-like encoders of 128 each, so the context is
# 256 wide, as tiny's, for the same null-space reasons; the pooled 32-d projection and 6 time ids of 8 dims
# each enter through the text-time embedding (6 * 8 + 32 = 80).
TINY_SDXL_TEXT = {**TINY_TEXT, "hidden_size": 128, "intermediate_size": 148, "projection_dim": 32}
TINY_SDXL_TEXT_2 = {**TINY_SDXL_TEXT, "hidden_act": "gelu"}
TINY_SDXL_UNET = {**TINY_SD2_UNET, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                  "projection_class_embeddings_input_dim": 80, "transformer_layers_per_block": (1, 2)}
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                      timestep_spacing="leading")
# FLUX: T5 rows of 128 (wider than the 32 + 32 rows of a prompt and the empty prompt at the tiny sequence
# length), a 4-channel VAE packed 2x2 into the transformer's 16 input channels, FLUX-dev's guidance embedding
# and dynamically shifted flow-matching schedule.
TINY_FLUX_SEQUENCE = 32
TINY_FLUX_CLIP = {**TINY_TEXT, "hidden_size": 32, "intermediate_size": 37, "projection_dim": 32}
TINY_FLUX_T5 = dict(vocab_size=49408, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                    is_encoder_decoder=False, use_cache=False)
TINY_FLUX_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=32,
                             guidance_embeds=True, axes_dims_rope=(4, 4, 8))
TINY_FLUX_VAE = {**TINY_VAE, "use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.1159,
                 "scaling_factor": 0.3611}
FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                      use_dynamic_shifting=True)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level BPE alphabet: printable bytes map to themselves, the rest to 256+n.
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, n = printable[:], 0
    byte_values = printable[:]
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(byte_values, [chr(c) for c in codes]))


def clip_tokenizer_dir() -> Path:
    """Write vocab.json/merges.txt of the CLIP tokenizer (49,408 tokens) from open_clip's BPE file, once."""
    cache = Path(os.environ.get("ERASURE_CACHE", Path(tempfile.gettempdir()) / "erasure-studio")) / "clip-tokenizer"
    if (cache / "merges.txt").exists():
        return cache
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the offline CLIP tokenizer needs the open_clip_torch package (pip install open_clip_torch)")
    bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent))
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    for name in ("vocab.json", "merges.txt"):  # rename last, so a concurrent reader never sees half a file
        os.replace(tmp / name, cache / name)
    tmp.rmdir()
    return cache


def clip_tokenizer(pad_token: str | None = None, model_max_length: int = 77):
    """The CLIP tokenizer; SD-2.x's and SDXL's second pad with "!" instead of the end-of-text token."""
    from transformers import CLIPTokenizer

    folder = clip_tokenizer_dir()
    padding = {"pad_token": pad_token} if pad_token else {}
    # transformers 5 takes vocab=/merges=; the old vocab_file=/merges_file= are silently ignored.
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                         model_max_length=model_max_length, **padding)


def random_pipeline(name: str = "tiny", seed: int = 0):
    """A pipeline of `RANDOM_MODELS` with random weights, deterministic for a given seed (CPU, fp32)."""
    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {name!r}; choose from {sorted(RANDOM_MODELS)}")
    pipe = RANDOM_MODELS[name](seed)
    pipe.set_progress_bar_config(disable=True)
    return attach_profile(pipe, name, RANDOM_PROFILE)


def _seeded(seed: int, build):
    """Each component from the same seed, so adding or resizing one leaves the others' weights as they were."""
    torch.manual_seed(seed)
    return build()


def _sd_pipeline(text_config, unet_config, vae_config, scheduler_config=SD_SCHEDULER, pad_token=None):
    def build(seed: int):
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        unet = _seeded(seed, lambda: UNet2DConditionModel(**unet_config))
        vae = _seeded(seed, lambda: AutoencoderKL(**vae_config))
        text_encoder = _seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(**text_config)))
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(pad_token),
                                       unet=unet, scheduler=PNDMScheduler(**scheduler_config), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    return build


def _sdxl_pipeline(seed: int):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = _seeded(seed, lambda: UNet2DConditionModel(**TINY_SDXL_UNET))
    vae = _seeded(seed, lambda: AutoencoderKL(**TINY_VAE))
    text_encoder = _seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TEXT)))
    text_encoder_2 = _seeded(seed + 1, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_2)))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer("!"), unet=unet,
                                     scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def _flux_pipeline(seed: int):
    """No T5 sentencepiece vocabulary is available offline, so the T5 slot gets the CLIP tokenizer (49,408 tokens,
    the T5 encoder's vocabulary size here) with a 32-token maximum: the pipeline's sequence length. Real FLUX
    loads its own T5 tokenizer through `load_pipeline`'s ordinary path."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer = _seeded(seed, lambda: FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER))
    vae = _seeded(seed, lambda: AutoencoderKL(**TINY_FLUX_VAE))
    text_encoder = _seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(**TINY_FLUX_CLIP)))
    text_encoder_2 = _seeded(seed, lambda: T5EncoderModel(T5Config(**TINY_FLUX_T5)))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
                        text_encoder=text_encoder, tokenizer=clip_tokenizer(), text_encoder_2=text_encoder_2,
                        tokenizer_2=clip_tokenizer(model_max_length=TINY_FLUX_SEQUENCE), transformer=transformer)
    pipe.default_sample_size = 32  # x vae_scale_factor 2: 64-px images by default, as the other tiny models
    return pipe


RANDOM_MODELS = {
    "tiny": _sd_pipeline(TINY_TEXT, TINY_UNET, TINY_VAE),
    "sd14-random": _sd_pipeline(SD14_TEXT, SD14_UNET, SD14_VAE),
    "tiny-sd2": _sd_pipeline(TINY_SD2_TEXT, TINY_SD2_UNET, TINY_VAE, SD2_SCHEDULER, pad_token="!"),
    "tiny-sdxl": _sdxl_pipeline,
    "tiny-flux": _flux_pipeline,
}

RANDOM_MODEL_STEPS = 3  # random-weight models draw noise at any step count: keep their runs quick
RANDOM_PROFILE = ModelProfile(
    name="random weights", settings={"steps": RANDOM_MODEL_STEPS}, scorer="tiny", offline=True, real_images=False,
    banner="This is the offline **random-weight** model: images are noise-like and only show that edits, seeds and "
           "scores work. Start with `--model CompVis/stable-diffusion-v1-4` for real images.")
for _name in RANDOM_MODELS:
    register_source(_name, functools.partial(random_pipeline, _name), RANDOM_PROFILE)
