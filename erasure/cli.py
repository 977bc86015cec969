"""`python -m erasure erase | generate | bench | evaluate`: argparse over the library, nothing more."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .methods import METHODS
from .pipeline import DEFAULT_MODEL, ModelLoadError
from .scoring import ScorerLoadError
from .text import split_concepts


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="hub id, local diffusers folder, single .safetensors/.ckpt file, or 'tiny' (offline)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def add_concept_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="speed", choices=sorted(METHODS))
    parser.add_argument("--preset", default=None, help="fills targets, anchors, retain and the method's settings")
    parser.add_argument("--targets", default=None, help="comma-separated concepts to erase (overrides the preset)")
    parser.add_argument("--anchors", default=None, help="comma-separated anchors: one, or one per target")
    parser.add_argument("--retain", default=None, help="comma-separated concepts to keep (overrides the preset)")
    parser.add_argument("--retain-file", default=None, help="a text file with one retain concept per line")
    seen = set()
    for method in METHODS.values():
        for name, spec in method.schema().items():
            if name in seen:
                continue
            seen.add(name)
            parser.add_argument(f"--{name}", default=None, help=f"{spec['help']} (default {spec['default']!r})")


def concepts_and_params(args) -> tuple[list[str], list[str], list[str], dict]:
    """Targets, anchors, retain and method parameters from a preset, overridden by explicit flags."""
    from .presets import load_preset

    targets, anchors, retain, params = [], [""], [], {}
    if args.preset:
        preset = load_preset(args.preset)
        targets, anchors, retain = list(preset.targets), list(preset.anchors), list(preset.retain)
        params = preset.method_params(args.method)
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


def cmd_erase(args) -> None:
    import erasure

    targets, anchors, retain, params = concepts_and_params(args)
    pipe = erasure.load_pipeline(args.model, device=args.device)
    edit = erasure.erase(pipe, args.method, targets, anchors, retain, progress=True, **params)
    path = edit.save(args.out)
    stats = edit.stats
    print(f"{args.method}: erased {len(edit.targets)} concept(s), kept {len(edit.retain)} retain concept(s), "
          f"{len(edit.weights)} matrices; text encoding {stats['encode_seconds']:.2f} s, "
          f"solve {stats['solve_seconds']:.2f} s -> {path}")


def settings_from_args(pipe, args):
    """Generation settings: the model's defaults, overridden by --steps/--guidance/--size/--scheduler."""
    from .generate import default_settings

    overrides = {k: v for k, v in dict(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler).items()
                 if v is not None}
    if args.size:
        overrides.update(height=args.size, width=args.size)
    return default_settings(pipe, **overrides)


def cmd_generate(args) -> None:
    from tqdm import tqdm

    import erasure
    from .generate import comparison_grid, generate_images

    pipe = erasure.load_pipeline(args.model, device=args.device)
    edit = erasure.Edit.load(args.edit) if args.edit else None
    settings = settings_from_args(pipe, args)
    columns, titles = [], ["original"] + ([f"edited ({edit.method})"] if edit else [])
    for title, which in zip(titles, [None, edit]):
        with tqdm(total=len(args.prompt) * len(args.seeds) * settings.steps, desc=title, unit="step") as bar:
            columns.append(generate_images(pipe, args.prompt, args.seeds, settings, which,
                                           on_step=lambda done, total: bar.update(done - bar.n)))
    labels = [f"{p}  (seed {s})" for p in args.prompt for s in args.seeds]
    grid = comparison_grid(labels, titles, columns)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"{len(labels)} row(s) x {len(titles)} column(s) -> {args.out}")


def cmd_bench(args) -> None:
    from .bench import run_bench

    run_bench(device=args.device, concept_counts=args.concepts, methods=args.methods, json_path=args.json,
              repeats=args.repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erasure", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    erase = commands.add_parser("erase", help="compute an edit and save it as .safetensors")
    add_model_arguments(erase)
    add_concept_arguments(erase)
    erase.add_argument("--out", required=True, help="where to write the edit (.safetensors)")
    erase.set_defaults(run=cmd_erase)

    generate = commands.add_parser("generate", help="same-seed grid: rows prompt x seed, columns original | edited")
    add_model_arguments(generate)
    generate.add_argument("--edit", default=None, help="an edit .safetensors file")
    generate.add_argument("--prompt", nargs="+", required=True)
    generate.add_argument("--seeds", nargs="+", type=int, default=[0])
    generate.add_argument("--steps", type=int, default=None)
    generate.add_argument("--guidance", type=float, default=None)
    generate.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    generate.add_argument("--scheduler", default=None)
    generate.add_argument("--out", default="grid.png")
    generate.set_defaults(run=cmd_generate)

    bench = commands.add_parser("bench", help="time text encoding and solves on full-size SD-1.4 (random weights)")
    bench.add_argument("--device", default=None)
    bench.add_argument("--concepts", nargs="+", type=int, default=[1, 10, 100])
    bench.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per cell; the table shows medians")
    bench.add_argument("--json", default=None, help="also write the results here")
    bench.set_defaults(run=cmd_bench)

    try:
        from .evaluate import add_evaluate_parser
    except ImportError:
        pass
    else:
        add_evaluate_parser(commands, add_model_arguments, add_concept_arguments)

    args = parser.parse_args(argv)
    warnings.simplefilter("default")
    try:
        args.run(args)
    except (ValueError, OSError, ModelLoadError, ScorerLoadError) as error:
        # User errors (bad concepts, parameters, files, models) end with one sentence, not a traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
