"""Loading the resident pipeline, and the per-pipeline state the engine keeps beside it.

`load_pipeline` returns the diffusers pipeline object itself; everything diffusers offers still works
on it. The engine's own bookkeeping (model id, the lock, pristine copies of edited parameters, the text
embedding cache) lives in a `PipelineState` attached to the pipeline, so no global registry is needed.
"""

from __future__ import annotations

import hashlib
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erasure.engine.families import FAMILIES, SD_KEY_VALUE, Family, model_family
from erasure.engine.lru import LRU, tensor_bytes
from erasure.engine.profiles import PRETRAINED, SOURCES, ModelProfile
from erasure.engine.registry import get_method

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
CROSS_ATTENTION_KV = SD_KEY_VALUE  # what closed-form methods rewrite on SD-1.x/2.x/XL UNets
TEXT_CACHE_BYTES = 512 * 2**20  # encoded concept rows kept per pipeline


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what failed and how to fix it."""


@dataclass
class PipelineState:
    model_id: str
    profile: ModelProfile = PRETRAINED
    lock: threading.RLock = field(default_factory=threading.RLock)
    # Pristine copies of the parameters an edit has overwritten, by state-dict name.
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    # name -> ((data_ptr, version), digest): a tensor's digest stays valid until it is written to.
    digests: dict[str, tuple[tuple[int, int], str]] = field(default_factory=dict)
    text_cache: LRU = field(default_factory=lambda: LRU(max_bytes=TEXT_CACHE_BYTES,
                                                        size=lambda e: tensor_bytes(e.rows)))
    # Encoding needs no weights lock (edits never touch the text encoder), only a cache lock.
    text_lock: threading.Lock = field(default_factory=threading.Lock)
    # Every denoiser parameter by state-dict name (what an edit may patch), and the family's text
    # projections by module name (what closed forms solve for: attn2.to_k/to_v, or FLUX's context_embedder).
    parameters: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    modules: dict[str, torch.nn.Linear] = field(default_factory=dict)
    family: Family | None = None


def pipeline_state(pipe) -> PipelineState:
    state = pipe.__dict__.get("_erasure_state")
    if state is None:
        name = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", "") or "unknown"
        state = PipelineState(model_id=str(name))
        # object.__setattr__: diffusers' own __setattr__ would try to register it as a component.
        object.__setattr__(pipe, "_erasure_state", state)
    if not state.parameters:
        state.family = model_family(pipe)
        denoiser = state.family.denoiser(pipe)
        state.parameters = dict(denoiser.named_parameters())
        state.modules = cross_attention_projections(denoiser, state.family.text_projections)
    return state


def denoiser(pipe) -> torch.nn.Module:
    """The pipeline's UNet or transformer: what edits patch and what every denoising step runs."""
    return pipeline_state(pipe).family.denoiser(pipe)


def concept_tokenizer(pipe):
    """The tokenizer whose token positions concept rows follow (SDXL's first, FLUX's T5 one)."""
    return pipeline_state(pipe).family.tokenizer(pipe)


def method_defaults(pipe, method: str) -> dict:
    """A method's parameter defaults on this pipeline: the paper's, except where the model family cannot apply
    them (SPEED's value-only default on FLUX, whose one text projection feeds keys and values)."""

    spec = get_method(method)
    overrides = pipeline_state(pipe).family.param_defaults.get(spec.name, {})
    return {name: overrides.get(name, entry["default"]) for name, entry in spec.schema().items()}


def family_preset_params(pipe, method: str, preset_params: dict) -> dict:
    """A preset's parameters for `method` on this pipeline: presets hold the papers' SD settings, and where the
    family cannot take one (SPEED's value-only edit on FLUX) the family's default replaces it. Values a user gives
    explicitly are not passed through here: those that cannot apply are refused with a reason."""
    return {**preset_params, **pipeline_state(pipe).family.param_defaults.get(method, {})}


def edited_modules(state: PipelineState, suffixes) -> list[str]:
    """The text projections a method declaring module `suffixes` (e.g. ("attn2.to_k", "attn2.to_v")) rewrites on
    this family; a ValueError where the family cannot honour the request (FLUX: keys without values)."""
    return state.family.modules_for(state.modules, tuple(suffixes))


def cross_attention_projections(denoiser, suffixes=CROSS_ATTENTION_KV) -> dict[str, torch.nn.Linear]:
    """The text projections closed-form methods rewrite, by denoiser module name."""
    modules = {name: module for name, module in denoiser.named_modules()
               if name.endswith(tuple(suffixes)) and isinstance(module, torch.nn.Linear)}
    if not modules:
        raise ValueError(f"this denoiser has no {' / '.join(suffixes)} projections; supported are SD-1.x/2.x/XL "
                         f"UNets and FLUX transformers")
    return modules


def original_parameter(state: PipelineState, name: str) -> torch.Tensor:
    """The base model's tensor for parameter `name` (e.g. `...attn2.to_v.weight`), also while an edit is
    applied."""
    if name in state.originals:
        return state.originals[name]
    return state.parameters[name].detach()


def original_weight(state: PipelineState, module: str) -> torch.Tensor:
    """The base weight of a module, by module name."""
    return original_parameter(state, f"{module}.weight")


def parameter_digest(state: PipelineState, name: str) -> str:
    """sha256 of the base tensor rounded to fp16, so fp32 and fp16 loads of one model agree."""
    tensor = original_parameter(state, name)
    key = (tensor.data_ptr(), tensor._version)
    cached = state.digests.get(name)
    if cached and cached[0] == key:
        return cached[1]
    data = tensor.detach().to("cpu", torch.float16).contiguous().view(torch.int16).numpy().tobytes()
    digest = hashlib.sha256(data).hexdigest()
    state.digests[name] = (key, digest)
    return digest


def fingerprint(state: PipelineState, parameters) -> str:
    """One digest of the base parameters an edit writes: an edit applies only where this matches.

    A weight is hashed under its module's name (format 1 hashed modules' weights only), so fingerprints of
    version-1 edit files stay valid."""
    h = hashlib.sha256()
    for name in sorted(parameters, key=lambda n: n.removesuffix(".weight")):
        h.update(name.removesuffix(".weight").encode())
        h.update(parameter_digest(state, name).encode())
    return h.hexdigest()


def generation_batch(pipe) -> int:
    """How many images every pipeline call renders for this model (its profile's): fixed per model, so an image
    never depends on what was rendered beside it."""
    return pipeline_state(pipe).profile.generation_batch


def model_identity(pipe) -> str:
    """What an original image depends on besides its prompt and settings: the model id, its dtype and
    device type (fp16 on CUDA and fp32 on CPU draw different images), the editable base weights, and the
    number of images per pipeline call (batches of 4 and of 2 drew pixels 1/255 apart)."""
    state = pipeline_state(pipe)
    with state.lock:
        digest = fingerprint(state, [f"{name}.weight" for name in state.modules])
    device = next(iter(state.parameters.values())).device.type
    return f"{state.model_id}|{denoiser(pipe).dtype}|{device}|{digest[:16]}|batch{generation_batch(pipe)}"


def default_device_and_dtype() -> tuple[str, torch.dtype]:
    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


def load_pipeline(model: str = DEFAULT_MODEL, device: str | None = None, dtype: torch.dtype | None = None):
    """Load an SD-1.x/2.x, SDXL or FLUX pipeline: a hub id, a local diffusers folder (each through its own
    pipeline class, read from model_index.json), a single SD-1.x/2.x/XL .safetensors/.ckpt file, or a model source
    registered by `erasure.worlds` ("toy", the toy world; "tiny", "tiny-sd2", "tiny-sdxl", "tiny-flux": random
    weights; offline). CUDA + fp16 when available, else CPU + fp32."""
    auto_device, auto_dtype = default_device_and_dtype()
    device = device or auto_device
    dtype = dtype or (auto_dtype if device.startswith("cuda") else torch.float32)

    source = SOURCES.get(model)
    if source is not None:
        try:
            pipe = source.load()
        except (FileNotFoundError, RuntimeError) as error:
            raise ModelLoadError(f"could not load {model!r}: {error}") from None
    else:
        pipe = _load_pretrained(model, dtype)
    if model_family(pipe).denoiser(pipe).dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return attach_profile(pipe, model, source.profile if source else PRETRAINED)


def attach_profile(pipe, model_id: str, profile: ModelProfile):
    """Give `pipe` fresh engine state naming the model and what it is; returns `pipe`."""
    # object.__setattr__: diffusers' own __setattr__ would try to register it as a component.
    object.__setattr__(pipe, "_erasure_state", PipelineState(model_id=model_id, profile=profile))
    pipeline_state(pipe)
    return pipe


def _load_pretrained(model: str, dtype: torch.dtype):
    path = Path(model).expanduser()
    try:
        if path.is_file():
            if path.suffix not in (".safetensors", ".ckpt"):
                raise ModelLoadError(f"{model!r} is a file but not a .safetensors or .ckpt checkpoint")
            cls = _single_file_class(path)
            return cls.from_single_file(str(path), **_load_kwargs(cls, dtype))
        if path.is_dir():
            cls = _pipeline_class(model, str(path), local_files_only=True)
            return cls.from_pretrained(str(path), local_files_only=True, **_load_kwargs(cls, dtype))
        if model.count("/") != 1 or model.startswith((".", "/", "~")):
            raise ModelLoadError(f"model {model!r} is neither a local folder/file nor a hub id like "
                                 f"'{DEFAULT_MODEL}' (or 'toy' / 'tiny' for the offline models)")
        cls = _pipeline_class(model, model)
        return cls.from_pretrained(model, **_load_kwargs(cls, dtype))
    except ModelLoadError:
        raise
    except Exception as error:  # hub, network and format errors come in many types; one sentence for all
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = textwrap.shorten(first_line, 400, placeholder=" …")  # whole words: it is shown to people
        raise ModelLoadError(
            f"could not load model {model!r} ({reason}). Check the network or that the model is in the "
            f"Hugging Face cache (HF_HOME), pass a local diffusers folder or .safetensors file, or use 'toy' (the "
            f"offline toy world) or 'tiny' (offline random weights).") from None


SDXL_CHECKPOINT_KEYS = ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",  # base
                        "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias")  # refiner


def _pipeline_class(model: str, where: str, **hub):
    """The pipeline class a diffusers folder or hub repository names in its model_index.json, if supported."""
    import diffusers

    name = diffusers.DiffusionPipeline.load_config(where, **hub).get("_class_name", "")
    supported = {family.pipeline_class for family in FAMILIES.values()}
    if name not in supported:
        raise ModelLoadError(f"{model!r} is a {name or 'pipeline of unknown class'}; supported are "
                             f"{', '.join(sorted(supported))}")
    return getattr(diffusers, name)


def _single_file_class(path: Path):
    """SDXL or SD-1.x/2.x, by the keys of a single-file checkpoint (the SD loader tells 1.x from 2.x itself).
    Only .safetensors headers can be read without loading the file; a .ckpt loads as SD-1.x/2.x."""
    import diffusers

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as checkpoint:
            if any(key in checkpoint.keys() for key in SDXL_CHECKPOINT_KEYS):
                return diffusers.StableDiffusionXLPipeline
    return diffusers.StableDiffusionPipeline


def _load_kwargs(cls, dtype: torch.dtype) -> dict:
    import diffusers

    if issubclass(cls, diffusers.StableDiffusionPipeline):  # the only family with a safety checker to switch off
        return dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    return dict(dtype=dtype)
