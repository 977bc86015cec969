"""`python -m erasure erase | generate | export | bench | evaluate | probe`: argparse over the library, nothing more."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import erasure
from erasure.cli.arguments import (add_concept_arguments, add_generation_arguments,
                                   add_model_arguments, concepts_and_params, seed, settings_from_args)
from erasure.cli.bench import run_bench, run_memory_bench, run_train_bench
from erasure.cli.evaluate import cmd_evaluate
from erasure.cli.probe import cmd_probe
from erasure.engine.export import EXPORT_FORMATS, export
from erasure.engine.pipeline import ModelLoadError
from erasure.engine.presets import KINDS
from erasure.engine.registry import closed_forms
from erasure.evaluation.generate import comparison_grid, generate_images
from erasure.evaluation.probes import PROBES
from erasure.evaluation.probes.protocols import PROTOCOLS
from erasure.evaluation.scoring import ScorerLoadError


def cmd_erase(args) -> None:
    concepts_and_params(args)  # a bad preset or file fails before the model loads
    pipe = erasure.load_pipeline(args.model, device=args.device)
    targets, anchors, retain, params = concepts_and_params(args, pipe)
    edit = erasure.erase(pipe, args.method, targets, anchors, retain, progress=True, **params)
    path = edit.save(args.out)
    stats = edit.stats
    if "train_seconds" in stats:
        timing = (f"trained in {stats['train_seconds']:.1f} s, loss {stats['loss_first']:.4g} -> "
                  f"{stats['loss_last']:.4g}")
        if "sparsity" in stats:
            timing += f", {stats['units_off']} of {stats['units']} units off"
    else:
        timing = f"text encoding {stats['encode_seconds']:.2f} s, solve {stats['solve_seconds']:.2f} s"
    print(f"{args.method}: erased {len(edit.targets)} concept(s), kept {len(edit.retain)} retain concept(s), "
          f"{len(edit.modules())} modules; {timing} -> {path}")


def cmd_generate(args) -> None:
    from PIL import Image
    from tqdm import tqdm

    if Path(args.out).suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {args.out!r} is not an image file name; use .png or .jpg")  # before, not after, the work
    pipe = erasure.load_pipeline(args.model, device=args.device)
    edit = erasure.Edit.load(args.edit) if args.edit else None
    settings = settings_from_args(pipe, args)
    columns, titles = [], ["original"] + ([f"edited ({edit.method})"] if edit else [])

    def report(bar):
        def on_step(step):
            bar.total = step.total
            bar.update(step.done - bar.n)
        return on_step

    for title, which in zip(titles, [None, edit]):
        with tqdm(desc=title, unit="step") as bar:
            columns.append(generate_images(pipe, args.prompt, args.seeds, settings, which, on_step=report(bar)))
    labels = [f"{p}  (seed {s})" for p in args.prompt for s in args.seeds]
    grid = comparison_grid(labels, titles, columns)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"{len(labels)} row(s) x {len(titles)} column(s) -> {args.out}")


def cmd_export(args) -> None:
    edit = erasure.Edit.load(args.edit)
    pipe = erasure.load_pipeline(args.model or edit.model_id, device=args.device)
    result = export(pipe, edit, args.out, args.format, args.rank)
    if args.format.startswith("lora"):
        print(f"LoRA of rank {result['rank']} (exact rank {result['exact_rank']}) over {result['layers']} layers, "
              f"relative error {result['relative_error']:.3g} -> {result['path']}")
    else:
        print(f"{args.format} -> {result['path']}")


def cmd_bench(args) -> None:
    if args.trained:
        run_train_bench(device=args.device, size=args.size)
        return
    if args.memory:

        run_memory_bench(device=args.device, edits=args.edits)
        return
    run_bench(device=args.device, concept_counts=args.concepts, methods=args.methods, json_path=args.json,
              repeats=args.repeats)


def add_evaluate_parser(commands) -> None:
    parser = commands.add_parser(
        "evaluate", help="generate prompt sets with the original and edited model; CLIP, accuracy, FID/KID, "
                         "NudeNet; write metrics.json/.csv/.md and plots (accelerate launch shards it)")
    add_model_arguments(parser)
    add_concept_arguments(parser)
    parser.add_argument("--edit", default=None, help="evaluate this edit file instead of computing one")
    parser.add_argument("--kind", default=None, choices=list(KINDS),
                        help="prompt templates to use (default: the preset's kind, else object)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per prompt (default 2; --full 10)")
    parser.add_argument("--full", action="store_true", help="paper-sized prompt sets: every template, the "
                                                            "whole retain pool, 40 neutral prompts, 10 seeds")
    parser.add_argument("--retain-count", type=int, default=None,
                        help="retain concepts to prompt (a seeded sample; default 5, --full all; 0 = all)")
    parser.add_argument("--neutral-count", type=int, default=None, help="neutral prompts (default 4; --full 40)")
    add_generation_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=4,
                        help="(prompt, seed) pairs per block, the unit of sharding and of CLIP scoring; images do "
                             "not depend on it, scores may in the last digits, so keep it when comparing runs")
    parser.add_argument("--clip-model", default=None,
                        help="open_clip model name (default ViT-L-14; with --model toy or tiny, that model's own "
                             "offline CLIP)")
    parser.add_argument("--clip-pretrained", default=None, help="open_clip weights tag (default openai)")
    parser.add_argument("--fid-features", default="auto", choices=["auto", "inception", "clip"],
                        help="auto: Inception-v3 (the papers'), else the CLIP image encoder with a label saying so")
    parser.add_argument("--originals", default=None,
                        help="on-disk cache of original images (default: the app's, $ERASURE_CACHE/originals or "
                             "~/.cache/erasure-studio/originals)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.set_defaults(run=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
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
    generate.add_argument("--prompt", nargs="+", required=True, help="one or more prompts (quote each)")
    generate.add_argument("--seeds", nargs="+", type=seed, default=[0],
                          help="one image per prompt and seed (whole numbers 0 to 2**63 - 1; default 0)")
    add_generation_arguments(generate)
    generate.add_argument("--out", default="grid.png", help="the grid image (.png or .jpg; default grid.png)")
    generate.set_defaults(run=cmd_generate)

    exporter = commands.add_parser("export", help="an edit as a LoRA, a baked diffusers folder, the edited weights "
                                                  "or the native edit file")
    add_model_arguments(exporter)
    exporter.add_argument("--edit", required=True, help="an edit .safetensors file")
    exporter.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                          help="lora: PEFT keys (diffusers' load_lora_weights); lora-kohya: kohya keys; diffusers: a "
                               "pipeline folder with the edit baked in (from_pretrained); state-dict: the edited "
                               "weights by the denoiser's parameter names; safetensors-delta: the edit file itself (factors)")
    exporter.add_argument("--rank", type=int, default=None,
                          help="LoRA rank (default: each layer's exact rank; lower ranks report their error)")
    exporter.add_argument("--out", required=True, help="a .safetensors file, or a new folder for 'diffusers'")
    exporter.set_defaults(run=cmd_export, model=None)  # default: the model the edit was made for

    bench = commands.add_parser("bench", help="time text encoding and solves on full-size SD-1.4 (random weights)")
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--concepts", nargs="+", type=int, default=[1, 10, 100],
                       help="numbers of target concepts to time (default 1 10 100)")
    bench.add_argument("--methods", nargs="+", default=closed_forms(), choices=closed_forms(),
                       help="closed-form methods to time (default: all; --trained times the trained ones)")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per cell; the table shows medians")
    bench.add_argument("--json", default=None, help="also write the results here")
    bench.add_argument("--trained", action="store_true",
                       help="instead: per-pass cost of the trained methods (ESD-x, Minimalist) and their default runs "
                            "projected here and on an H100")
    bench.add_argument("--size", type=int, default=512, help="with --trained: image side in pixels (default 512)")
    bench.add_argument("--memory", action="store_true",
                       help="instead: memory and file size of held 3-concept UCE edits, factored vs dense")
    bench.add_argument("--edits", type=int, default=10, help="with --memory: how many edits to hold (default 10)")
    bench.set_defaults(run=cmd_bench)

    add_evaluate_parser(commands)

    probe = commands.add_parser("probe", help="is the concept really gone? run probes on an edit (JSON + image sheet)")
    add_model_arguments(probe)
    probe.add_argument("--edit", required=True, help="an edit .safetensors file")
    probe.add_argument("--probes", nargs="+", default=["all"], choices=[*PROBES, "all"],
                       help="which probes (default all)")
    probe.add_argument("--prompt", nargs="+", default=None,
                       help="target prompts (default: the kind's interactive templates with the edit's first target)")
    probe.add_argument("--kind", default=None, choices=list(KINDS), help="prompt templates (default object; toy-shape "
                                                                         "on the toy world)")
    probe.add_argument("--seeds", nargs="+", type=seed, default=[0, 1, 2, 3], help="seeds (default 0 1 2 3)")
    probe.add_argument("--protocol", default="paper", choices=list(PROTOCOLS),
                       help="paper: the paper's settings (50 steps, noise N = 24, guidance N = 25); quick: the run's "
                            "steps and sampler, noise N = 6, guidance N = 3, for a CPU (default paper)")
    add_generation_arguments(probe)
    probe.add_argument("--out", required=True, help="output folder")
    probe.set_defaults(run=cmd_probe)

    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    try:
        args.run(args)
    except (ValueError, OSError, ModelLoadError, ScorerLoadError) as error:
        # User errors (bad concepts, parameters, files, models) end with one sentence, not a traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
