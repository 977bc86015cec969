"""`python -m erasure bench`: text-encoding and solve time per method and concept count on the full
SD-1.4 architecture with random weights (no download: timing does not depend on weight values); with
`--memory`, what held edits cost the server, factored against dense."""

from __future__ import annotations

import json
import resource
import statistics
import time

import torch

from erasure.engine.apply import edited_weights
from erasure.engine.compute import erase
from erasure.engine.edit import Edit
from erasure.engine.pipeline import denoiser, load_pipeline, pipeline_state
from erasure.engine.presets import load_preset
from erasure.engine.registry import METHODS, closed_forms
from erasure.engine.training import TrainingJob
from erasure.methods.esd import FULL, ESDParams, trainable_names
from erasure.methods.minimalist import MinimalistParams, masked_overrides, unit_count, unit_names
from erasure.methods.speed import LEAST_GAIN_CACHE
from erasure.studio.sessions import EditStore


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
    print(f"built {model} on {device} ({denoiser(pipe).dtype}) in {time.perf_counter() - start:.1f} s; "
          f"{len(pipeline_state(pipe).modules)} editable projections")
    pool = list(load_preset("celebrity-100").targets) + list(load_preset("instance").retain)
    instance_retain = list(load_preset("instance").retain)[:600]
    results = []
    for method in methods or closed_forms():
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
                            "dtype": str(denoiser(pipe).dtype).replace("torch.", "")})
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


# Sustained bf16/fp16 throughput assumed for an H100 on these batch-1-to-8 UNet passes: about 10% of its
# ~990 TFLOP/s dense peak (small batches, attention and normalisation layers keep it far from peak).
ASSUMED_H100_TFLOPS = 100.0


def run_train_bench(device: str | None = None, model: str = "sd14-random", size: int = 512, targets: int = 1,
                    retain: int = 4) -> list[dict]:
    """Per-row cost of the UNet passes trained methods make (one row = one latent through the UNet): time on
    this device and FLOPs (counted by torch's FlopCounterMode), then each method's default run as a count of
    such rows, projected to a time here and on an H100 at ASSUMED_H100_TFLOPS."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe = load_pipeline(model, device=device)
    job = TrainingJob.for_pipeline(pipe)
    x = job.noise([0], size)
    context = job.encode(["a photo of a cat"])
    t = 500

    def measure(fn) -> tuple[float, float]:
        fn()  # warm-up
        with FlopCounterMode(display=False) as counter:
            start = time.perf_counter()
            fn()
            if str(job.device).startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        return seconds, counter.get_total_flops()

    def frozen():
        with torch.no_grad():
            job.denoise(x, t, context)

    esd_masters = {n: job.base(n).float().clone().requires_grad_(True) for n in trainable_names(job, FULL)}

    def esd_step():
        job.denoise(x, t, context, esd_masters).square().mean().backward()

    names = unit_names(job, MinimalistParams.units)
    logits = {n: torch.full((unit_count(job, n),), 2.0, device=job.device, requires_grad=True) for n in names}

    def mask_step():
        x_in = x.clone().requires_grad_(True)
        masks = {n: torch.sigmoid(v) for n, v in logits.items()}
        job.denoise(x_in, t, context, masked_overrides(job, masks)).square().mean().backward()

    passes = {"frozen forward": measure(frozen), "ESD-x forward+backward": measure(esd_step),
              "masked forward+backward": measure(mask_step)}
    print(f"{model} on {job.device} ({job.dtype}), {size} px, one latent per pass:\n")
    print("| pass | s per row | GFLOP per row |\n|---|---:|---:|")
    for name, (seconds, flops) in passes.items():
        print(f"| {name} | {seconds:.2f} | {flops / 1e9:.0f} |")

    esd, mini = ESDParams(), MinimalistParams()
    samples = (targets + retain) * mini.templates
    k = mini.trajectory_steps
    per_step = mini.iterations * mini.samples_per_step * k * 2
    runs = {
        f"esd-x (defaults, {targets} target)": {
            # per iteration a fresh guided trajectory stopped after k ~ U{0..steps-1} steps (2 rows a step, (steps
            # - 1) / 2 steps on average), then the frozen ε for the concept and the empty prompt at x_t
            "frozen forward": esd.iterations * esd.batch * ((esd.sample_steps - 1) + 2),
            "ESD-x forward+backward": esd.iterations * esd.batch},
        f"minimalist (defaults, {targets} target + {retain} retain)": {
            # goal trajectories; per step K no-grad guided steps of each sample, then K recomputed with grad;
            # the final losses with all units on and with the binary masks
            "frozen forward": samples * k * 2 + per_step + 2 * samples * k * 2,
            "masked forward+backward": per_step},
    }
    rows = []
    print(f"\n| default run | UNet rows | here, s | projected H100 s (at {ASSUMED_H100_TFLOPS:.0f} TFLOP/s) |")
    print("|---|---|---:|---:|")
    for run, counts in runs.items():
        here = sum(n * passes[p][0] for p, n in counts.items())
        flops = sum(n * passes[p][1] for p, n in counts.items())
        rows.append({"run": run, "rows": counts, "seconds_here": here, "tflop": flops / 1e12,
                     "projected_h100_s": flops / (ASSUMED_H100_TFLOPS * 1e12)})
        shown = ", ".join(f"{n} {p}" for p, n in counts.items())
        print(f"| {run} | {shown} | {here:.0f} | {rows[-1]['projected_h100_s']:.1f} |", flush=True)
    return rows


def _resident_mib() -> float:
    """This process's resident memory now (not its peak), from /proc, after returning freed heap pages to the
    system (without the trim, the solves' freed float64 temporaries stay resident: +2 to +143 MiB by chance)."""
    import ctypes
    import gc
    import os

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the growth then includes whatever the allocator keeps
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def densified(pipe, edit):
    """The same edit with every patch the full new weight (how edits were stored before format 3)."""

    weights = {name: weight.cpu() for name, weight in edited_weights(pipe, edit).items()}
    return Edit.from_weights(weights, edit.method, edit.params, edit.targets, edit.anchors, edit.retain,
                             edit.model_id, edit.fingerprint, edit.stats)


def run_memory_bench(model: str = "sd14-random", edits: int = 10, concepts: int = 3, method: str = "uce",
                     device: str | None = None) -> list[dict]:
    """Hold `edits` edits of `concepts` targets each the way the app does (an EditStore, tensors on the host),
    as the method stores them and densified, and report per edit the tensor bytes and file size, and for all
    of them the bytes held and the growth of resident memory."""
    import tempfile
    from pathlib import Path

    pool = list(load_preset("celebrity-100").targets)
    if not 1 <= edits * concepts <= len(pool):
        raise ValueError(f"--edits must be between 1 and {len(pool) // concepts} (the celebrity-100 preset has "
                         f"{len(pool)} names for {concepts}-concept edits), got {edits}")
    pipe = load_pipeline(model, device=device)
    batches = [pool[i * concepts:(i + 1) * concepts] for i in range(edits)]
    retain = list(load_preset("instance").retain)[:20]
    for targets in batches:  # encode every concept once: the text cache is not what is measured
        erase(pipe, method, targets=targets, anchors=[""], retain=retain)
    rows = []
    for form, convert in (("factored (format 3)", lambda e: e), ("dense (every weight)", lambda e: densified(pipe, e))):
        before = _resident_mib()
        store = EditStore()
        ids = [store.add(convert(erase(pipe, method, targets=targets, anchors=[""], retain=retain)))
               for targets in batches]
        growth = _resident_mib() - before
        held = [store.get(i) for i in ids]
        held_mib = sum(p.value.numel() * p.value.element_size() for e in held for p in e.patches.values()) / 2**20
        with tempfile.TemporaryDirectory() as folder:
            file_mib = held[0].save(Path(folder) / "edit.safetensors").stat().st_size / 2**20
        rows.append({"form": form, "matrices": len(held[0].modules()), "tensor_mib_per_edit": held_mib / edits,
                     "file_mib_per_edit": file_mib, "held_mib": held_mib, "resident_growth_mib": growth})
        del store, held
    print(f"\n{edits} {method} edits of {concepts} concepts each, held as the app holds them, on {model}:\n")
    print(f"| form | matrices | tensors per edit, MiB | file per edit, MiB | {edits} held: tensors, MiB "
          f"| {edits} held: resident growth, MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['form']} | {row['matrices']} | {row['tensor_mib_per_edit']:.2f} | {row['file_mib_per_edit']:.2f} "
              f"| {row['held_mib']:.1f} | {row['resident_growth_mib']:.0f} |")
    return rows
