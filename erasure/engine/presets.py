"""Presets: concept sets, retain pools, prompt templates and named method settings, read from
`presets/*.toml` (data only; one file per preset, long lists in `presets/lists/*.txt`)."""

from __future__ import annotations

import random
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from erasure.engine.profiles import profile_of
from erasure.engine.registry import METHODS

PRESET_DIR = Path(__file__).resolve().parents[2] / "presets"
KINDS = ("object", "style", "celebrity", "nudity", "toy-shape", "toy-colour", "toy-style")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    kind: str  # one of KINDS: picks the prompt templates
    targets: tuple[str, ...]
    anchors: tuple[str, ...]
    retain: tuple[str, ...]
    source: str
    params: dict[str, dict] = field(default_factory=dict)  # method name -> the reference's setting
    model: str | None = None  # "toy": made for the toy world; None: for real models

    def method_params(self, method: str) -> dict:
        """The preset's parameters for `method`; a method that writes prompts from templates (`template_kind`)
        uses the preset's kind unless the preset says otherwise."""

        params = dict(self.params.get(method, {}))
        if method in METHODS and "template_kind" in METHODS[method].schema():
            params.setdefault("template_kind", self.kind)
        return params


def presets(model: str | None = None) -> list[str]:
    """Every preset's name; with `model`, those made for it (its profile's `presets`: the toy world's on "toy",
    the real-model presets on any hub model)."""
    names = sorted(p.stem for p in PRESET_DIR.glob("*.toml") if p.stem != "templates")
    if model is None:
        return names
    made_for = profile_of(model).presets
    return [name for name in names if load_preset(name).model == made_for]


@lru_cache(maxsize=None)
def load_preset(name: str) -> Preset:
    path = PRESET_DIR / f"{name}.toml"
    if name == "templates" or not path.is_file():
        raise ValueError(f"unknown preset {name!r}; choose from {presets()}")
    data = tomllib.loads(path.read_text("utf-8"))
    kind = data.get("kind")
    if kind not in KINDS:
        raise ValueError(f"preset {name!r}: kind must be one of {KINDS}, got {kind!r}")
    if "targets_file" in data:
        targets = _read_list(data["targets_file"])[: data.get("targets_count")]
    else:
        targets = data["targets"]
    retain = _read_list(data["retain_file"]) if "retain_file" in data else data.get("retain", [])
    return Preset(name, data["description"], kind, tuple(targets), tuple(data["anchors"]), tuple(retain),
                  data["source"], data.get("params", {}), data.get("model"))


def _read_list(relative: str) -> list[str]:
    lines = (PRESET_DIR / relative).read_text("utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


@lru_cache(maxsize=None)
def templates() -> dict:
    return tomllib.loads((PRESET_DIR / "templates.toml").read_text("utf-8"))


def prompt_templates(kind: str, full: bool = False) -> list[str]:
    table = templates()[kind]
    return list(table["templates"] if full else table["templates"][: table["interactive"]])


def concept_text(kind: str, concept: str) -> str:
    """The bare-concept text CLIP scores compare against ("a photo of X", "a painting in the style of X")."""
    return templates()["concept_text"][kind].format(concept)


@lru_cache(maxsize=None)
def neutral_prompts(kind: str = "object") -> tuple[str, ...]:
    """Prompts that name no concept of the set; the toy world's are its own captions."""
    name = "toy_neutral_prompts" if kind.startswith("toy-") else "neutral_prompts"
    return tuple(_read_list(f"lists/{name}.txt"))


def names_any(prompt: str, concepts) -> bool:
    """Whether the prompt contains one of the concepts as whole words ("a red circle" names "circle")."""
    padded = f" {' '.join(prompt.lower().split())} "
    return any(f" {' '.join(c.lower().split())} " in padded for c in concepts if c.strip())


@dataclass(frozen=True)
class PromptItem:
    set: str  # "erase" (a target's prompts), "retain" (a retain concept's) or "neutral" (no concept)
    concept: str  # the concept the prompt is about; "" for neutral prompts
    prompt: str


def prompt_set_sizes(full: bool = False) -> dict:
    """Default sizes of the evaluation prompt sets (templates.toml [prompt_sets])."""
    return dict(templates()["prompt_sets"]["full" if full else "interactive"])


def evaluation_prompts(kind: str, targets, retain, full: bool = False, retain_count: int | None = None,
                       neutral_count: int | None = None) -> list[PromptItem]:
    """The erase, retain and neutral prompt sets, in a fixed order. Retain concepts are a seeded sample
    of the pool (in pool order); empty concepts and concepts that are also targets are left out."""
    sizes = prompt_set_sizes(full)
    forms = prompt_templates(kind, full)
    retain_count = sizes["retain_concepts"] if retain_count is None else retain_count
    neutral_count = sizes["neutral_prompts"] if neutral_count is None else neutral_count
    if retain_count < 0 or neutral_count < 0:
        raise ValueError(f"retain and neutral counts must be >= 0, got {retain_count} and {neutral_count}")
    pool = [c for c in dict.fromkeys(retain) if c.strip() and c not in set(targets)]
    if 0 < retain_count < len(pool):
        picked = set(random.Random(0).sample(range(len(pool)), retain_count))
        pool = [c for i, c in enumerate(pool) if i in picked]
    items = [PromptItem("erase", c, form.format(c)) for c in targets for form in forms]
    items += [PromptItem("retain", c, form.format(c)) for c in pool for form in forms]
    neutral = [prompt for prompt in neutral_prompts(kind) if not names_any(prompt, targets)]
    items += [PromptItem("neutral", "", prompt) for prompt in neutral[:neutral_count]]
    return items
