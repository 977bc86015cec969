"""`python -m erasure bench`: text-encoding and solve time per method and concept count on the full
SD-1.4 architecture with random weights (no download: timing does not depend on weight values)."""

from __future__ import annotations

import json
import resource
import time

import torch

from .edit import erase
from .methods import METHODS
from .pipeline import load_pipeline, pipeline_state
from .presets import load_preset


def _peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_bench(device: str | None = None, concept_counts=(1, 10, 100), methods=None, json_path=None,
              model: str = "sd14-random") -> list[dict]:
    start = time.perf_counter()
    pipe = load_pipeline(model, device=device)
    device = str(pipe.device)
    print(f"built {model} on {device} ({pipe.unet.dtype}) in {time.perf_counter() - start:.1f} s; "
          f"{len(pipeline_state(pipe).modules)} editable projections")
    pool = list(load_preset("celebrity-100").targets) + list(load_preset("instance").retain)
    retain = list(load_preset("instance").retain)[: 600]
    results = []
    for method in methods or sorted(METHODS):
        # warm-up: first-call costs (kernels, allocator) are not what a user waits for on the second edit
        erase(pipe, method, targets=pool[:1], anchors=[""], retain=retain[:8])
        for n in concept_counts:
            targets = [t for t in pool if t not in retain][:n]
            pipeline_state(pipe).text_cache.clear()  # time a cold encoding of every concept
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            edit = erase(pipe, method, targets=targets, anchors=[""], retain=retain)
            total = time.perf_counter() - t0
            results.append({"method": method, "concepts": len(targets), "retain": len(edit.retain),
                            "matrices": len(edit.weights), "encode_s": edit.stats["encode_seconds"],
                            "solve_s": edit.stats["solve_seconds"], "total_s": total,
                            "peak_memory_gib": _peak_memory_gib(device), "device": device,
                            "dtype": str(pipe.unet.dtype).replace("torch.", "")})
            print_row(results[-1], header=len(results) == 1)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results))
    return results


def print_row(row: dict, header: bool) -> None:
    if header:
        print(f"| {'method':<7} | {'concepts':>8} | {'retain':>6} | {'matrices':>8} | {'encode s':>8} | "
              f"{'solve s':>8} | {'total s':>8} | {'peak GiB':>8} |")
        print("|" + "|".join("-" * w for w in (9, 10, 8, 10, 10, 10, 10, 10)) + "|")
    print(f"| {row['method']:<7} | {row['concepts']:>8} | {row['retain']:>6} | {row['matrices']:>8} | "
          f"{row['encode_s']:>8.3f} | {row['solve_s']:>8.3f} | {row['total_s']:>8.3f} | {row['peak_memory_gib']:>8.2f} |",
          flush=True)
