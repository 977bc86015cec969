"""`python -m erasure bench`: text-encoding and solve time per method and concept count on the full
SD-1.4 architecture with random weights (no download: timing does not depend on weight values)."""

from __future__ import annotations

import json
import resource
import statistics
import time

import torch

from .compute import erase
from .methods import METHODS
from .methods.speed import LEAST_GAIN_CACHE
from .pipeline import load_pipeline, pipeline_state
from .presets import load_preset


def _peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_bench(device: str | None = None, concept_counts=(1, 10, 100), methods=None, json_path=None,
              model: str = "sd14-random", repeats: int = 3) -> list[dict]:
    """Median over `repeats` of each timing, per method and number of target concepts."""
    start = time.perf_counter()
    pipe = load_pipeline(model, device=device)
    device = str(pipe.device)
    print(f"built {model} on {device} ({pipe.unet.dtype}) in {time.perf_counter() - start:.1f} s; "
          f"{len(pipeline_state(pipe).modules)} editable projections")
    pool = list(load_preset("celebrity-100").targets) + list(load_preset("instance").retain)
    instance_retain = list(load_preset("instance").retain)[:600]
    results = []
    for method in methods or sorted(METHODS):
        retain = instance_retain if METHODS[method].uses_retain else []  # ScaPre takes none
        # warm-up of kernels and allocator only: caches are cleared before every timed first edit
        erase(pipe, method, targets=pool[:1], anchors=[""], retain=retain[:8])
        for n in concept_counts:
            targets = [t for t in pool if t not in instance_retain][:n]
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            runs = [_time_first_and_next_edit(pipe, method, targets, retain) for _ in range(repeats)]
            row = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key.endswith("_s")}
            results.append({"method": method, "concepts": len(targets), "retain": runs[0]["retain"],
                            "matrices": runs[0]["matrices"], **row, "repeats": repeats,
                            "peak_memory_gib": _peak_memory_gib(device), "device": device,
                            "dtype": str(pipe.unet.dtype).replace("torch.", "")})
            print_row(results[-1], header=len(results) == 1)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results))
    return results


COLUMNS = [("method", "method", "<12", ""), ("concepts", "concepts", ">8", ""), ("retain", "retain", ">6", ""),
           ("matrices", "matrices", ">8", ""), ("encode s", "encode_s", ">8", ".3f"), ("solve s", "solve_s", ">8", ".3f"),
           ("total s", "total_s", ">8", ".3f"), ("next solve s", "next_solve_s", ">12", ".3f"),
           ("next total s", "next_total_s", ">12", ".3f"), ("peak GiB", "peak_memory_gib", ">8", ".2f")]


def _time_first_and_next_edit(pipe, method, targets, retain) -> dict:
    """The first edit on a fresh pipeline (every concept encoded, SPEED's per-weight DPA directions
    computed), then the next edit of the same concepts, as after changing a parameter in the app."""
    pipeline_state(pipe).text_cache.clear()
    LEAST_GAIN_CACHE.clear()
    t0 = time.perf_counter()
    first = erase(pipe, method, targets=targets, anchors=[""], retain=retain)
    t1 = time.perf_counter()
    again = erase(pipe, method, targets=targets, anchors=[""], retain=retain)
    t2 = time.perf_counter()
    return {"retain": len(first.retain), "matrices": len(first.modules()),
            "encode_s": first.stats["encode_seconds"], "solve_s": first.stats["solve_seconds"], "total_s": t1 - t0,
            "next_solve_s": again.stats["solve_seconds"], "next_total_s": t2 - t1}


def print_row(row: dict, header: bool) -> None:
    """A markdown table row; 'next' is a second edit of the same concepts with caches warm."""
    if header:
        print("| " + " | ".join(f"{title:{align}}" for title, _, align, _ in COLUMNS) + " |")
        print("|" + "|".join("-" * (int(align[1:]) + 2) for _, _, align, _ in COLUMNS) + "|")
    print("| " + " | ".join(f"{row[key]:{align}{fmt}}" for _, key, align, fmt in COLUMNS) + " |", flush=True)
