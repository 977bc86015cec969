"""`python -m erasure.worlds.toy.report`: the toy world's numbers, as tables (the README's come from here).

1. Can the model draw its world? The judge's shape and colour recognition on the base model.
2. For every method in the registry, with its default parameters on a preset (default toy-circle): the
   share of images judged to show each erased and kept concept, original -> edited, and the kept prompts'
   same-seed pixel change.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from erasure import erase, load_pipeline
from erasure.engine.presets import load_preset, presets
from erasure.engine.registry import METHODS, get_method
from erasure.evaluation.generate import OriginalCache, Settings
from erasure.worlds.toy import TOY_GUIDANCE, TOY_SCHEDULER, TOY_STEPS, toy_pipeline
from erasure.worlds.toy.measure import concept_rates, drawing_quality


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m erasure.worlds.toy.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="toy-circle", choices=presets("toy"),
                        help="toy preset (default toy-circle)")
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS),
                        help="methods to run with their default parameters (default: all)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per kept concept's prompt (default 4)")
    parser.add_argument("--erased-seeds", type=int, default=16,
                        help="seeds per erased concept's prompt (default 16: the anchor \"shape\" itself draws the "
                             "target 1 time in 8)")
    parser.add_argument("--templates", type=int, default=4, help="prompt templates per concept (default 4)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="a folder `python -m erasure.worlds.toy.train --out` wrote (default: the shipped weights); "
                             "measured with the shipped judge, so a retrained world is compared on one yardstick")
    args = parser.parse_args(argv)

    pipe = toy_pipeline(args.weights) if args.weights else load_pipeline("toy", device="cpu")
    settings = Settings(TOY_STEPS, TOY_GUIDANCE, 32, 32, TOY_SCHEDULER)
    seeds = list(range(args.seeds))
    cache = OriginalCache(max_images=4096)
    started = time.time()
    quality = drawing_quality(pipe, [0, 1], settings)
    print(f"## Base model ({quality.images} images: \"a {{colour}} {{shape}}\", 8 shapes x 6 colours x "
          f"{quality.seeds} seeds, {time.time() - started:.0f} s)\n")
    print("| judged | share |\n|---|---|")
    print(f"| prompted shape present | {quality.shape_rate:.1%} |\n| prompted colour present | "
          f"{quality.colour_rate:.1%} |")
    print("| per shape | " + ", ".join(f"{s} {r:.0%}" for s, r in quality.per_shape.items()) + " |\n")

    preset = load_preset(args.preset)
    print(f"## {args.preset}: {preset.description}\n")
    print(f"{args.templates} templates x {args.erased_seeds} seeds per erased concept, x {args.seeds} per kept one; "
          f"rates: share of images the judge sees the concept in, original -> edited; pixel change: mean "
          f"|edited - original| over kept images, 0-1 scale.\n")
    print("| method | erased: original -> edited | kept: worst change (points) | kept: pixel change | "
          "passes |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        retain = preset.retain if get_method(method).uses_retain else ()
        edit = erase(pipe, method, preset.targets, preset.anchors, retain, **preset.method_params(method))
        rates = concept_rates(pipe, edit, preset.targets, preset.retain, preset.kind, seeds, args.templates,
                              settings, cache=cache, erased_seeds=range(args.erased_seeds))
        erased = [r for r in rates if r.role == "erased"]
        kept = [r for r in rates if r.role == "kept"]
        worst = max(kept, key=lambda r: abs(r.edited - r.original))
        passes = (all(r.original >= 0.9 and r.edited <= 0.2 for r in erased)
                  and all(abs(r.edited - r.original) <= 0.1 for r in kept))
        print(f"| {method} | " + ", ".join(f"{r.concept} {r.original:.0%} -> {r.edited:.0%}" for r in erased)
              + f" | {100 * (worst.edited - worst.original):+.0f} ({worst.concept}) | "
              f"{np.mean([r.pixel_change for r in kept]):.4f} | {'yes' if passes else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
