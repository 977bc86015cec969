"""Same-seed generation (one Generator per image), the cache of original images, and labelled grids.

Every image is keyed by (model, prompt, seed, steps, guidance, size, scheduler), so an original image
is computed once and reused whatever edit it is compared with.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from erasure.engine.apply import applied, restore, write_edit
from erasure.engine.edit import Edit
from erasure.engine.lru import LRU
from erasure.engine.pipeline import generation_batch, model_identity, pipeline_state
from erasure.engine.progress import Cancelled, OnStep, Progress, ShouldStop
from erasure.engine.settings import SCHEDULERS, Settings, default_settings  # noqa: F401  (re-exported)

GenerationCancelled = Cancelled  # the run protocol's one cancellation (kept under its older name)


def image_key(identity: str, prompt: str, seed: int, settings: Settings) -> str:
    """Cache key of an original image; `identity` is `pipeline.model_identity(pipe)`."""
    payload = json.dumps([identity, prompt, int(seed), asdict(settings)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def default_cache_folder() -> Path:
    """Where original images are kept on disk between runs: $ERASURE_CACHE/originals, else
    ~/.cache/erasure-studio/originals. Shared by the app and `python -m erasure evaluate`."""
    base = os.environ.get("ERASURE_CACHE") or Path.home() / ".cache" / "erasure-studio"
    return Path(base) / "originals"


class OriginalCache:
    """Original (unedited) images by `image_key`: in memory (LRU), and on disk when given a folder."""

    def __init__(self, max_images: int = 1024, folder: str | Path | None = None):
        self.max_images = max_images
        self.folder = Path(folder) if folder else None
        self._images: LRU[Image.Image] = LRU(max_items=max_images)

    def get(self, key: str) -> Image.Image | None:
        image = self._images.get(key)
        if image is None and self.folder and (self.folder / f"{key}.png").is_file():
            image = Image.open(self.folder / f"{key}.png").convert("RGB")
            self._images[key] = image
        return image

    def put(self, key: str, image: Image.Image) -> None:
        self._images[key] = image
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
            # Write, then rename: another process reading the folder never sees half a file.
            partial = self.folder / f".{key}.{os.getpid()}.{threading.get_ident()}.png"
            image.save(partial)
            os.replace(partial, self.folder / f"{key}.png")


def generate_images(pipe, prompts: Sequence[str], seeds: Sequence[int], settings: Settings, edit: Edit | None = None,
                    *, edit_from_step: int = 0, on_step: OnStep | None = None,
                    should_stop: ShouldStop | None = None) -> list[Image.Image]:
    """Images for every (prompt, seed) pair, prompt-major, with `edit` applied (None: the base model).

    Each image has its own CPU Generator seeded with its seed, so it does not depend on batching or on
    the other prompts. `edit_from_step` k runs steps 0..k-1 with the base weights and the rest with the
    edit (0: the edited model throughout; `settings.steps`: the original model). `on_step(Progress)`
    reports denoising steps; `should_stop()` cancels.
    """
    return generate_pairs(pipe, [(p, int(s)) for p in prompts for s in seeds], settings, edit,
                          edit_from_step=edit_from_step, on_step=on_step,
                          should_stop=should_stop)


def generate_pairs(pipe, pairs: Sequence[tuple[str, int]], settings: Settings, edit: Edit | None = None,
                   *, edit_from_step: int = 0, on_step: OnStep | None = None,
                   should_stop: ShouldStop | None = None, latents: bool = False) -> list:
    """Images for an explicit list of (prompt, seed) pairs, in list order (with `latents`: the final latents,
    undecoded, as float32 tensors).

    Every pipeline call renders exactly `generation_batch(pipe)` images (the last batch is filled with repeats
    of its last pair, rendered and dropped), so each image is computed on the same shapes wherever it falls:
    an image is a function of (prompt, seed, settings) on a given device, not of what was rendered beside
    it (batches of 4 and of 2 drew pixels 1/255 apart)."""
    settings.check()
    if not 0 <= edit_from_step <= settings.steps:
        raise ValueError(f"edit_from_step must be between 0 and the {settings.steps} steps, got {edit_from_step}")
    swap_at = edit_from_step if edit is not None and 0 < edit_from_step < settings.steps else None
    pairs = [(p, int(s)) for p, s in pairs]
    family = pipeline_state(pipe).family
    done = 0
    images: list[Image.Image] = []
    # The lock is held throughout (applied), so swapping the edit in between steps races with no one.
    with applied(pipe, edit if edit_from_step == 0 else None), swapped_scheduler(pipe, settings.scheduler):
        total = len(pairs) * denoiser_calls(pipe.scheduler, settings.steps)
        size = generation_batch(pipe)
        for start in range(0, len(pairs), size):
            batch = pairs[start:start + size]
            padded = batch + batch[-1:] * (size - len(batch))
            swapped = []

            def step_end(pipeline, step, timestep, tensors):
                nonlocal done
                done += len(batch)  # one callback per batched step advances every image in the batch
                if swap_at is not None and step + 1 == swap_at:
                    swapped.append(write_edit(pipe, edit))
                if on_step:
                    on_step(Progress(done, total, "denoising"))
                if should_stop and should_stop():
                    pipeline._interrupt = True
                return tensors

            try:
                result = pipe([p for p, _ in padded], num_inference_steps=settings.steps,
                              guidance_scale=settings.guidance, height=settings.height, width=settings.width,
                              generator=[torch.Generator("cpu").manual_seed(s) for _, s in padded],
                              callback_on_step_end=step_end, output_type="latent" if latents else "pil",
                              **family.generation_kwargs(pipe))
            finally:
                for record in swapped:
                    restore(pipe, record)
            if should_stop and should_stop():
                raise Cancelled("generation cancelled")
            images.extend(result.images[:len(batch)].float().cpu() if latents else result.images[:len(batch)])
    return images


def originals(pipe, prompts: Sequence[str], seeds: Sequence[int], settings: Settings, cache: OriginalCache,
              **kwargs) -> tuple[list[Image.Image], int]:
    """Base-model images for every (prompt, seed), prompt-major, computing only the pairs the cache lacks
    (each image has its own generator, so which pairs are batched together does not matter).
    Returns the images and how many came from the cache."""
    identity = model_identity(pipe)
    keys = {(p, int(s)): image_key(identity, p, s, settings) for p in prompts for s in seeds}
    found = {pair: cache.get(key) for pair, key in keys.items()}
    missing = [pair for pair, image in found.items() if image is None]
    if missing:
        for pair, image in zip(missing, generate_pairs(pipe, missing, settings, None, **kwargs)):
            found[pair] = image
            cache.put(keys[pair], image)
    return [found[(p, int(s))] for p in prompts for s in seeds], len(keys) - len(missing)


@contextmanager
def swapped_scheduler(pipe, scheduler) -> Iterator[None]:
    """Swap in a scheduler for one generation: a name from SCHEDULERS (built from the pipeline's own config),
    or a scheduler object (a probe's own sampler). Hold the pipeline's lock: the scheduler is shared."""
    import diffusers

    current = pipe.scheduler
    family = pipeline_state(pipe).family
    if isinstance(scheduler, str) and scheduler not in family.schedulers:
        raise ValueError(f"scheduler {scheduler!r} does not sample {family.name.upper()} models; choose from "
                         f"{', '.join(family.schedulers)}")
    if not isinstance(scheduler, str):
        pipe.scheduler = scheduler
    elif type(current).__name__ != SCHEDULERS[scheduler]:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(current.config)
    try:
        yield
    finally:
        pipe.scheduler = current


def denoiser_calls(scheduler, steps: int) -> int:
    """Denoiser iterations per image for `steps` (PNDM runs one more). Progress counts these."""
    if scheduler.config.get("use_dynamic_shifting"):  # FLUX's: the count does not depend on the shift mu
        scheduler.set_timesteps(steps, mu=0.0)
    else:
        scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def comparison_grid(row_labels: Sequence[str], column_titles: Sequence[str],
                    columns: Sequence[Sequence[Image.Image]], captions: Sequence[Sequence[str]] | None = None,
                    cell: int = 256) -> Image.Image:
    """A labelled grid: one row per label, one column per title (e.g. original | edited)."""
    font = ImageFont.load_default()
    label_width, title_height, caption_height = 220, 24, 18 if captions else 0
    height = title_height + len(row_labels) * (cell + caption_height)
    grid = Image.new("RGB", (label_width + len(column_titles) * cell, height), "white")
    draw = ImageDraw.Draw(grid)
    for j, title in enumerate(column_titles):
        draw.text((label_width + j * cell + 6, 5), title, fill="black", font=font)
    for i, label in enumerate(row_labels):
        top = title_height + i * (cell + caption_height)
        draw.multiline_text((6, top + 6), "\n".join(wrap_words(label, 32)), fill="black", font=font)
        for j, column in enumerate(columns):
            grid.paste(column[i].convert("RGB").resize((cell, cell), Image.NEAREST), (label_width + j * cell, top))
            if captions:
                draw.text((label_width + j * cell + 4, top + cell + 3), captions[j][i], fill="black", font=font)
    return grid


def wrap_words(text: str, width: int) -> list[str]:
    """Greedy word wrap into lines of at most `width` characters (a longer word gets its own line)."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]
