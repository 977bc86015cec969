"""Model families: what differs between SD-1.x, SD-2.x, SDXL and FLUX for erasure, in one small object each.

A `Family` says which diffusers pipeline class it is, where the denoiser lives, which linear layers carry the
text condition (what the closed forms rewrite), and how a batch of texts becomes the token rows the denoiser
sees. `model_family(pipe)` detects it from the loaded pipeline's class, so nothing else branches on model names.

- **sd1**: CLIP ViT-L text encoder (quick_gelu), last hidden state; closed forms on every `attn2.to_k/to_v`.
- **sd2**: the same pipeline class and the same rule, with OpenCLIP's encoder (gelu, pad token "!"); 2.x-768 is
  v-prediction, which only the scheduler's config knows. Told apart from sd1 by the encoder's activation.
- **sdxl**: rows are what `StableDiffusionXLPipeline.encode_prompt` builds: hidden_states[-2] of each text encoder
  (CLIPTextModel, CLIPTextModelWithProjection), concatenated on the feature axis; the pooled embedding (which
  enters through `add_embedding`, not attention) is left alone. With `force_zeros_for_empty_prompt` (SDXL base's
  default) CFG's unconditional branch is all zeros, which any bias-free key/value edit maps to zero as before, so
  that branch is preserved by every closed form; the empty prompt's encoded rows (the methods' null block) are
  still what a literal "" prompt feeds.
- **flux**: the T5 rows enter the transformer through one linear layer, `context_embedder` (T5 width -> inner
  width), and everything downstream (the double-stream blocks' `add_k_proj/add_v_proj`) sees the modulated,
  attention-mixed context stream, not T5 rows: a closed form solved on T5 rows is exact only on
  `context_embedder`, which is also what UCE's own FLUX script edits. It stands for both keys and values, so a
  method asking for only one of them cannot be honoured there. Its bias is not solved for: W t + b -> W a + b
  holds with the bias unchanged. Rows are the T5 encoder's last hidden state at the pipeline's sequence length,
  as `FluxPipeline._get_t5_prompt_embeds` computes them (no attention mask: pads are attended to, so a row
  depends on the padding and every text is encoded at full length).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

SD_KEY_VALUE = ("attn2.to_k", "attn2.to_v")
SD_SCHEDULERS = ("pndm", "ddim", "dpm++", "euler", "euler-a")
FLOW_SCHEDULERS = ("flow-euler",)
FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline refuses longer


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str  # diffusers class name (subclasses count too)
    denoiser_attr: str  # "unet" | "transformer"
    text_projections: tuple[str, ...]  # module-name suffixes of the layers the closed forms rewrite
    # (pipe, texts, length) -> (hidden [B, length, d], real tokens per text [B]): every text padded to `length`.
    encode: Callable = field(repr=False)
    tokenizer: Callable = field(repr=False)  # pipe -> the tokenizer whose token positions the rows follow
    # True when a text's rows up to its EOS do not depend on padding (causal CLIP): short texts then encode
    # unpadded. False (T5): every text is encoded at the pipeline's full sequence length.
    causal: bool = True
    # SD-1.x's method suffix each projection stands for, where the family has no attn2.to_k/to_v of its own.
    stands_for: dict[str, tuple[str, ...]] = field(default_factory=dict)
    schedulers: tuple[str, ...] = SD_SCHEDULERS
    settings: dict = field(default_factory=dict)  # the family's own generation defaults
    unet_methods: bool = True  # trained methods and probes drive an SD UNet directly
    # method -> parameter values that replace the paper's defaults on this family (where those cannot apply)
    param_defaults: dict[str, dict] = field(default_factory=dict)

    def denoiser(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_attr)

    def sequence_length(self, pipe) -> int:
        """Tokens per prompt the pipeline feeds the denoiser: CLIP's 77, or FLUX's T5 length."""
        return int(self.tokenizer(pipe).model_max_length)

    def generation_kwargs(self, pipe) -> dict:
        """Arguments the pipeline call needs so generation encodes prompts the way `sequence_length` says."""
        if self.name == "flux":
            return {"max_sequence_length": self.sequence_length(pipe)}
        return {}

    def native_side(self, pipe) -> int:
        if self.denoiser_attr == "unet":
            return int(self.denoiser(pipe).config.sample_size * pipe.vae_scale_factor)
        return int(pipe.default_sample_size * pipe.vae_scale_factor)

    def modules_for(self, available, suffixes: tuple[str, ...]) -> list[str]:
        """The text projections (names in `available`) that a method declaring `suffixes` rewrites."""
        suffixes = tuple(suffixes)
        if not self.stands_for:
            return [name for name in available if name.endswith(suffixes)]
        chosen = []
        for name in available:
            meant = self.stands_for[next(key for key in self.stands_for if name.endswith(key))]
            asked = [suffix for suffix in meant if suffix.endswith(suffixes)]
            if asked and len(asked) < len(meant):
                raise ValueError(f"on {self.name.upper()} the text enters through {name}, which feeds both keys and "
                                 f"values; a method editing only {', '.join(suffixes)} cannot be applied there. "
                                 f"Edit keys and values together (e.g. SPEED params='KV')")
            if asked:
                chosen.append(name)
        return chosen

    def check_unet_method(self, what: str) -> None:
        """Trained methods and probes run an SD UNet themselves; other families are refused by name here."""
        if not self.unet_methods:
            raise ValueError(f"{what}: SD-1.x/2.x UNet pipelines only; this model is {self.name.upper()} "
                             f"(closed forms such as UCE and SPEED work on it)")


def _clip_last_hidden(pipe, texts, length):
    tokens = pipe.tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    hidden = pipe.text_encoder(tokens.input_ids.to(pipe.text_encoder.device))[0]
    return hidden, tokens.attention_mask.sum(1)


def _sdxl_encoders(pipe):
    # The refiner has only the second encoder; encode_prompt skips a missing first one the same way.
    pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]


def _sdxl_penultimate(pipe, texts, length):
    # Each encoder with its own tokenizer: their pads differ (EOS vs "!"), their tokens before EOS do not.
    parts, mask = [], None
    for tokenizer, encoder in _sdxl_encoders(pipe):
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        parts.append(encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True).hidden_states[-2])
        mask = tokens.attention_mask if mask is None else mask
    return torch.cat(parts, dim=-1), mask.sum(1)


def _sdxl_tokenizer(pipe):
    return _sdxl_encoders(pipe)[0][0]


def _t5_last_hidden(pipe, texts, length):
    tokens = pipe.tokenizer_2(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    hidden = pipe.text_encoder_2(tokens.input_ids.to(pipe.text_encoder_2.device), output_hidden_states=False)[0]
    return hidden, tokens.attention_mask.sum(1)


SD1 = Family("sd1", "StableDiffusionPipeline", "unet", SD_KEY_VALUE, _clip_last_hidden, lambda pipe: pipe.tokenizer)
SD2 = Family("sd2", "StableDiffusionPipeline", "unet", SD_KEY_VALUE, _clip_last_hidden, lambda pipe: pipe.tokenizer)
SDXL = Family("sdxl", "StableDiffusionXLPipeline", "unet", SD_KEY_VALUE, _sdxl_penultimate, _sdxl_tokenizer,
              settings={"guidance": 5.0, "scheduler": "euler"}, unet_methods=False)
FLUX = Family("flux", "FluxPipeline", "transformer", ("context_embedder",), _t5_last_hidden,
              lambda pipe: pipe.tokenizer_2, causal=False, stands_for={"context_embedder": SD_KEY_VALUE},
              schedulers=FLOW_SCHEDULERS, settings={"guidance": 3.5, "scheduler": "flow-euler"}, unet_methods=False,
              param_defaults={"speed": {"params": "KV"}})  # context_embedder feeds keys and values alike
FAMILIES = {family.name: family for family in (SD1, SD2, SDXL, FLUX)}


def model_family(pipe) -> Family:
    """The family of a loaded pipeline, by its class (FLUX and SDXL first: neither subclasses the SD pipeline)."""
    import diffusers

    for family in (FLUX, SDXL):
        if isinstance(pipe, getattr(diffusers, family.pipeline_class)):
            return family
    if isinstance(pipe, diffusers.StableDiffusionPipeline):
        # OpenCLIP (SD-2.x) uses gelu; OpenAI's CLIP (SD-1.x) quick_gelu.
        return SD2 if pipe.text_encoder.config.hidden_act == "gelu" else SD1
    raise ValueError(f"unsupported pipeline {type(pipe).__name__}; supported: StableDiffusionPipeline (SD-1.x/2.x), "
                     f"StableDiffusionXLPipeline and FluxPipeline")
