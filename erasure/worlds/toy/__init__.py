"""The toy world: a small text-to-image model trained here on rendered shapes, and a judge for it.

`load_pipeline("toy")` gives an ordinary `StableDiffusionPipeline` (CLIP tokenizer and text encoder,
cross-attention UNet, AutoencoderKL, DDIM) that draws 32×32 scenes of coloured shapes, so erasure can
be seen and counted offline on a CPU. `load_judge()` names what an image shows; `load_clip_scorer("toy")`
is a CLIP trained on the world's captions. Weights: `erasure/worlds/toy/weights`, made by
`python -m erasure.worlds.toy.train`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from erasure.engine.pipeline import attach_profile
from erasure.engine.profiles import ModelProfile, register_source
from erasure.evaluation.scoring import register_offline_scorer
from erasure.worlds.tiny import clip_tokenizer
from erasure.worlds.toy import models
from erasure.worlds.toy.models import JUDGE_HEADS, WEIGHTS
from erasure.worlds.toy.world import BACKGROUNDS, COLOURS, SHAPES, STYLES

TOY_MODEL = "toy"
# Sampling defaults the world was checked with (README: toy-world table).
TOY_STEPS, TOY_GUIDANCE, TOY_SCHEDULER = 20, 5.0, "ddim"


def toy_pipeline(folder: Path = WEIGHTS):
    """The toy world's StableDiffusionPipeline on CPU in fp32 (about a second to build)."""
    from diffusers import StableDiffusionPipeline

    card = models.read_card(folder)
    if "unet" not in card.get("stages", {}):
        raise FileNotFoundError(f"no trained toy world in {folder}; train one with `python -m erasure.worlds.toy.train`")
    text_encoder = models.load_weights(models.build_text_encoder(), folder / "text_encoder.safetensors")
    _check_seeded_rows(text_encoder, folder / "text_encoder.safetensors")
    vae = models.load_weights(models.build_vae(card["stages"]["vae"]["scaling_factor"]), folder / "vae.safetensors")
    unet = models.load_weights(models.build_unet(), folder / "unet.safetensors")
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                                   unet=unet.eval(), scheduler=models.build_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return attach_profile(pipe, TOY_MODEL, TOY_PROFILE)


def _check_seeded_rows(text_encoder, path: Path) -> None:
    """The stored rows of the frozen token table must equal the rebuilt ones: otherwise this torch draws the
    seeded table differently and every word outside the world would mean something else."""
    from safetensors import safe_open

    name = models.token_table_name(text_encoder)
    with safe_open(str(path), "pt") as stored:
        ids, rows = stored.get_tensor(f"{name}.ids"), stored.get_tensor(f"{name}.rows")
    rebuilt = models.seeded_token_table(*text_encoder.get_input_embeddings().weight.shape)
    if not torch.equal(rebuilt[ids], rows.float()):
        raise RuntimeError("this torch version draws the toy text encoder's seeded token table differently from "
                           "the one the toy world was trained with; retrain it with `python -m erasure.worlds.toy.train`")


@dataclass(frozen=True)
class Verdict:
    """The judge's reading of a set of images: per head, probabilities [n, labels]."""
    probabilities: dict[str, np.ndarray]

    def labels(self, head: str) -> tuple[str, ...]:
        return JUDGE_HEADS[head]

    def present(self, word: str, threshold: float = 0.5) -> np.ndarray:
        """Boolean [n]: the judge sees `word` (a shape, colour, style or background) in each image."""
        for head, labels in JUDGE_HEADS.items():
            if word in labels:
                return self.probabilities[head][:, labels.index(word)] > threshold
        raise ValueError(f"the toy judge knows shapes, colours, styles and backgrounds, not {word!r}; "
                         f"e.g. {', '.join(SHAPES[:3])}")

    def main(self, head: str) -> list[str]:
        """The most likely label of `head` in each image (for one-object scenes)."""
        return [JUDGE_HEADS[head][i] for i in self.probabilities[head].argmax(axis=1)]

    @staticmethod
    def knows(concept: str) -> bool:
        """Whether `concept` names anything the judge can see."""
        return any(w in KNOWN_WORDS for w in concept.lower().split())

    def finds(self, concept: str) -> np.ndarray:
        """Boolean [n]: every world word of `concept` ("circle", "red circle", "striped") is seen."""
        words = [w for w in concept.lower().split() if w in KNOWN_WORDS]
        if not words:
            raise ValueError(f"{concept!r} names nothing the toy judge knows (shapes, colours, styles, "
                             f"backgrounds)")
        return np.logical_and.reduce([self.present(w) for w in words])


KNOWN_WORDS = frozenset([*SHAPES, *COLOURS, *STYLES, *BACKGROUNDS])


class ToyJudge:
    """The world's classifier, loaded once; thread-safe."""

    def __init__(self, network: models.Judge):
        self.network = network.eval()
        self._lock = threading.Lock()

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> Verdict:
        if not images:
            return Verdict({h: np.zeros((0, len(l))) for h, l in JUDGE_HEADS.items()})
        arrays = np.stack([np.asarray(im.convert("RGB").resize((32, 32), Image.BOX)) for im in images])
        pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1
        with self._lock:
            logits = self.network(pixels)
        return Verdict({h: (torch.softmax(v, -1) if h == "background" else torch.sigmoid(v)).numpy()
                        for h, v in logits.items()})


_JUDGES: dict[Path, ToyJudge] = {}
_JUDGES_LOCK = threading.Lock()


def load_judge(folder: Path = WEIGHTS) -> ToyJudge:
    with _JUDGES_LOCK:
        if folder not in _JUDGES:
            _JUDGES[folder] = ToyJudge(models.load_weights(models.Judge(), folder / "judge.safetensors"))
        return _JUDGES[folder]


def load_toy_clip(folder: Path = WEIGHTS):
    """(model, preprocess, tokenizer) of the world's CLIP, through open_clip like the real scorers."""
    import open_clip

    model = models.load_weights(models.build_clip(), folder / "clip.safetensors").eval()
    preprocess = open_clip.image_transform(models.TOY_CLIP["vision_cfg"]["image_size"], is_train=False)
    return model, preprocess, open_clip.get_tokenizer("ViT-B-32")


TOY_PROFILE = ModelProfile(
    name="toy", settings={"steps": TOY_STEPS, "guidance": TOY_GUIDANCE, "scheduler": TOY_SCHEDULER},
    generation_batch=16,  # its 32-px images: twice as fast per image as 4 per call on a CPU
    scorer="toy", judge=load_judge, prompt_kind="toy-shape", presets="toy", neighbours=tuple(SHAPES),
    offline=True, real_images=False,
    banner="This is the **toy world**: a small model trained in this project on rendered 32×32 shapes, colours and "
           "styles, with a CLIP trained on its captions. Try a *toy-* preset: erased shapes visibly disappear. Start "
           "with `--model CompVis/stable-diffusion-v1-4` on a GPU for real images.")
register_source(TOY_MODEL, toy_pipeline, TOY_PROFILE)
register_offline_scorer("toy", lambda: (*load_toy_clip(), "toy (trained on the toy world's captions)"))
