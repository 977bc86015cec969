"""Offline building blocks: the real CLIP tokenizer from open_clip's BPE file, and SD-1.x-shaped
pipelines with random weights built from configs (the diffusers fast-test pattern).

"tiny" is for tests and the offline demo. "sd14-random" has the full SD-1.4 architecture with random
weights: timings do not depend on weight values, so it is what `python -m erasure bench` measures.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch

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

RANDOM_MODELS = {"tiny": (TINY_TEXT, TINY_UNET, TINY_VAE), "sd14-random": (SD14_TEXT, SD14_UNET, SD14_VAE)}


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


def clip_tokenizer():
    from transformers import CLIPTokenizer

    folder = clip_tokenizer_dir()
    # transformers 5 takes vocab=/merges=; the old vocab_file=/merges_file= are silently ignored.
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)


def random_pipeline(name: str = "tiny", seed: int = 0):
    """An SD-1.x `StableDiffusionPipeline` with random weights, deterministic for a given seed (CPU, fp32)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {name!r}; choose from {sorted(RANDOM_MODELS)}")
    text_config, unet_config, vae_config = RANDOM_MODELS[name]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=PNDMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
