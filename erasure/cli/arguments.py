"""What the command-line arguments mean: the model, concept and method flags shared by `erase` and
`evaluate`, and turning parsed arguments into concepts, method parameters and generation settings."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from erasure.engine.pipeline import DEFAULT_MODEL, family_preset_params
from erasure.engine.presets import load_preset
from erasure.engine.registry import METHODS
from erasure.engine.text import split_concepts
from erasure.evaluation.generate import SCHEDULERS, default_settings


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="hub id or local diffusers folder (SD-1.x/2.x, SDXL, FLUX), single .safetensors/.ckpt "
                             "file, 'toy' (the offline toy world) or a random-weight model ('tiny', 'tiny-sd2', "
                             "'tiny-sdxl', 'tiny-flux')")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def add_concept_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="speed", choices=sorted(METHODS),
                        help="the erasure method (default speed)")
    parser.add_argument("--preset", default=None, help="fills targets, anchors, retain and the method's settings")
    parser.add_argument("--targets", default=None, help="comma-separated concepts to erase (overrides the preset)")
    parser.add_argument("--anchors", default=None, help="comma-separated anchors: one, or one per target")
    parser.add_argument("--retain", default=None, help="comma-separated concepts to keep (overrides the preset)")
    parser.add_argument("--retain-file", default=None, help="a text file with one retain concept per line")
    # One flag per parameter name; methods sharing a name (lamb, seed, ...) each keep their own default.
    by_name: dict[str, list] = {}
    for method in METHODS.values():
        for name, spec in method.schema().items():
            by_name.setdefault(name, []).append((method.name, spec))
    for name, specs in by_name.items():
        if len({spec["help"] for _, spec in specs}) == 1:
            defaults = ", ".join(f"{method} {spec['default']!r}" for method, spec in specs)
            text = f"{specs[0][1]['help']} (default: {defaults})"
        else:
            text = "; ".join(f"{method}: {spec['help']} (default {spec['default']!r})" for method, spec in specs)
        parser.add_argument(f"--{name}", default=None, help=text)


def seed(text: str) -> int:
    """An argparse type: a seed is a whole number from 0 to 2**63 - 1 (what torch.Generator takes)."""
    if not (text.isascii() and text.isdigit()) or int(text) >= 2**63:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not a whole number from 0 to 2**63 - 1")
    return int(text)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; 3 on random-weight models)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--scheduler", default=None, choices=list(SCHEDULERS), help="sampler (default pndm)")


def concepts_and_params(args, pipe=None) -> tuple[list[str], list[str], list[str], dict]:
    """Targets, anchors, retain and method parameters from a preset (with `pipe`: as its model family can take
    them), overridden by explicit flags."""

    targets, anchors, retain, params = [], [""], [], {}
    if args.preset:
        preset = load_preset(args.preset)
        targets, anchors, retain = list(preset.targets), list(preset.anchors), list(preset.retain)
        params = preset.method_params(args.method)
        if pipe is not None:

            params = family_preset_params(pipe, args.method, params)
    if args.targets is not None:
        targets = split_concepts(args.targets)
    if args.anchors is not None:
        anchors = [a.strip() for a in args.anchors.split(",")]
    if args.retain is not None:
        retain = split_concepts(args.retain)
    if args.retain_file:
        retain = [line.strip() for line in Path(args.retain_file).read_text("utf-8").splitlines() if line.strip()]
    schema = METHODS[args.method].schema()
    for name in schema:
        if getattr(args, name, None) is not None:
            params[name] = getattr(args, name)
    return targets, anchors, retain, params


def settings_from_args(pipe, args):
    """Generation settings: the model's defaults, overridden by --steps/--guidance/--size/--scheduler."""

    overrides = {k: v for k, v in dict(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler).items()
                 if v is not None}
    if args.size:
        overrides.update(height=args.size, width=args.size)
    return default_settings(pipe, **overrides)


def process_state(requested_device: str | None):
    """accelerate's view of this process (its rank among `accelerate launch`'s processes; one process otherwise)
    and the device it runs on: the requested one when alone, else the one accelerate gives it. CPU processes
    (`--device cpu`, no CUDA, ACCELERATE_USE_CPU) join a gloo group."""
    from accelerate import PartialState  # heavy, and only for the commands that shard

    cpu = (requested_device == "cpu" or not torch.cuda.is_available()
           or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))
    state = PartialState(cpu=cpu)
    device = requested_device if state.num_processes == 1 and requested_device else str(state.device)
    return state, "cpu" if device.startswith("cpu") else device
