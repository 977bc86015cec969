"""The toy world's networks: configs, builders and loaders.

The text encoder is a random CLIP text model that is never trained. Its token-embedding table (49,408 ×
128, the bulk of its weights) is rebuilt from `TOKEN_SEED` by `seeded_token_table`; the weight files
store only the rows of the world's own words, and loading checks them against the rebuilt table, so a
torch whose generator drew differently is caught instead of silently changing every prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from erasure.worlds.tiny import clip_tokenizer
from erasure.worlds.toy.world import BACKGROUNDS, COLOURS, SHAPES, STYLES, vocabulary

WEIGHTS = Path(__file__).resolve().parent / "weights"
TOKEN_SEED = 20261124

TOY_TEXT = dict(vocab_size=49408, hidden_size=128, intermediate_size=256, projection_dim=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
# Self-attention only from the 8×8 level down: at 16×16 it would double the training cost.
TOY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=128, attention_head_dim=8, norm_num_groups=16)
TOY_VAE = dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
               norm_num_groups=16, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
# SD-1's noise schedule, so the methods meet the same timesteps as on the real model.
TOY_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     clip_sample=False, set_alpha_to_one=False, steps_offset=1)
TOY_CLIP = dict(embed_dim=64, vision_cfg=dict(image_size=32, layers=3, width=96, head_width=32, patch_size=4),
                text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2))

JUDGE_HEADS = {"shape": SHAPES, "colour": tuple(COLOURS), "style": STYLES, "background": tuple(BACKGROUNDS)}


def seeded_token_table(rows: int, width: int, seed: int = TOKEN_SEED) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=generator) * 0.02


def world_token_ids() -> list[int]:
    """Token ids of every word of the world (and BOS/EOS): the rows the weight files keep."""

    tokenizer = clip_tokenizer()
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    for word in vocabulary():
        ids.update(tokenizer(word, add_special_tokens=False).input_ids)
    return sorted(ids)


def build_text_encoder(seed: int = 0):
    """A random CLIP text encoder whose self-attention outputs are zero, so each token's row depends on that
    token and its position only. With SD's mixing encoder a concept also lives in the rows after it (the
    padding rows attend back to it), and the small UNet learned to read it there: UCE and SPEED, which edit
    a concept's own token row, left "circle" in half the images. The toy world keeps each concept in its
    own row; what leaks through the rows after a concept is a question for the real model."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**TOY_TEXT))
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(
            seeded_token_table(TOY_TEXT["vocab_size"], TOY_TEXT["hidden_size"]))
        for module in model.modules():
            if type(module).__name__ == "CLIPAttention":
                module.out_proj.weight.zero_()
                module.out_proj.bias.zero_()
    return model.eval().requires_grad_(False)


def token_table_name(text_encoder) -> str:
    table = text_encoder.get_input_embeddings().weight
    return next(name for name, p in text_encoder.named_parameters() if p is table)


def build_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**TOY_UNET)


def build_vae(scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**TOY_VAE, scaling_factor=scaling_factor)


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**TOY_SCHEDULER)


def build_clip():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**TOY_CLIP)
    with torch.no_grad():
        model.token_embedding.weight.copy_(seeded_token_table(TOY_CLIP["text_cfg"]["vocab_size"],
                                                              TOY_CLIP["text_cfg"]["width"], TOKEN_SEED + 1))
    return model


class Judge(nn.Module):
    """A small CNN that names what a 32×32 image shows: which shapes, colours and styles are present
    (independent sigmoids: a scene can hold two things) and the background (softmax)."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.MaxPool2d(2))

        # Flattened 4×4 features, not a global average: where parts sit relative to each other is the shape.
        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                                      nn.Flatten(), nn.Linear(16 * 4 * width, 256), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(labels)) for name, labels in JUDGE_HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: [n, 3, 32, 32] in [-1, 1] -> logits per head."""
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}


def save_weights(module: nn.Module, path: Path, keep_rows: dict[str, list[int]] | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
    """A module's state dict as safetensors; for each table named in keep_rows only those rows are kept
    (stored as `<name>.rows` / `<name>.ids`)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu()
        if keep_rows and name in keep_rows:
            ids = torch.tensor(keep_rows[name], dtype=torch.int64)
            tensors[f"{name}.ids"] = ids
            tensors[f"{name}.rows"] = tensor[ids].to(dtype).contiguous()
        else:
            tensors[name] = tensor.to(dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def load_weights(module: nn.Module, path: Path) -> nn.Module:
    """Inverse of save_weights: kept rows are written into the seeded tables and must match them where
    the table was never trained (checked by the caller through `check_rows`)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"toy-world weights {path} are missing; train them with "
                                f"`python -m erasure.worlds.toy.train`")
    stored = load_file(str(path))
    state = module.state_dict()
    for name in list(stored):
        if name.endswith(".rows"):
            table = name.removesuffix(".rows")
            ids = stored.pop(f"{table}.ids")
            full = state[table].clone()
            full[ids] = stored.pop(name).to(full.dtype)
            stored[table] = full
    missing = set(state) - set(stored)
    if missing:
        raise ValueError(f"{path.name} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    module.load_state_dict({k: v.to(state[k].dtype) for k, v in stored.items()})
    return module


def read_card(folder: Path = WEIGHTS) -> dict:
    path = folder / "toy.json"
    return json.loads(path.read_text("utf-8")) if path.is_file() else {}
