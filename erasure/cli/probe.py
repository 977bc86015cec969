"""`python -m erasure probe`: run probes on an edit, write probes.json and an image sheet.

Under `accelerate launch` the seeds are shared out across processes (seed i on process i mod N). Each process
renders and judges every image probe on all prompts and its seeds: an image and its verdict depend only on its
own (prompt, seed) (fixed generation batches, one judge batch per sample), and what a probe trains first (the
guidance classifier, the textual inversion, the adversarial search) uses seeds of its own, so every process
trains the same one. Each process writes its verdicts and images to out/.shards; rank 0 merges them in the
single-process order, runs the probes that report on all seeds at once (interference, the diagnostic), and
writes the same report one process would have.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

import erasure
from erasure.cli.arguments import process_state, settings_from_args
from erasure.engine.pipeline import pipeline_state
from erasure.evaluation.probes import PROBES, Judge, ProbeImages, probe_sheet, run_probes
from erasure.evaluation.probes.protocols import get_protocol
from erasure.evaluation.probes.runner import (JudgedImages, ProbeProgress, check_probe_names, rates, render_and_judge,
                                              report_header, run_report_probe)
from erasure.studio.reports import default_probe_prompts, probe_result_lines


def cmd_probe(args) -> None:
    names = list(PROBES) if "all" in args.probes else list(dict.fromkeys(args.probes))
    check_probe_names(names)
    rules = get_protocol(args.protocol)
    state, device = process_state(args.device)
    rank, world = state.process_index, state.num_processes
    pipe = erasure.load_pipeline(args.model, device=device)
    edit = erasure.Edit.load(args.edit)
    erasure.check_applicable(pipe, edit)
    pipeline_state(pipe).family.check_unet_method("the probes")  # before the judge's scorer loads
    kind = args.kind or pipeline_state(pipe).profile.prompt_kind
    prompts = args.prompt or default_probe_prompts(edit, kind)
    settings = settings_from_args(pipe, args)
    judge = Judge(pipe, edit, kind)
    out = Path(args.out)
    bar = tqdm(total=len(names), desc=f"probing ({rules.name} protocol)", unit="probe", disable=rank != 0)

    def on_step(step):
        bar.n = step.done
        bar.set_postfix_str(step.message, refresh=True)

    if world == 1:
        report, rendered = run_probes(pipe, edit, names, prompts, args.seeds, settings, judge, kind, on_step=on_step,
                                      protocol=rules.name)
    else:
        shards = out / ".shards"
        if state.is_main_process:
            shutil.rmtree(shards, ignore_errors=True)
        state.wait_for_everyone()
        progress, mine, judged = ProbeProgress(len(names), on_step), args.seeds[rank::world], {}
        for name in (name for name in names if PROBES[name].yields == "images" and mine):
            judged[name] = render_and_judge(pipe, edit, name, prompts, mine, settings, judge, rules, progress)
            progress.finish(name)
        write_shard(shards / str(rank), judged)
        state.wait_for_everyone()
        if not state.is_main_process:
            return
        merged = merge_shards([shards / str(r) for r in range(world)], prompts, args.seeds)
        report, rendered = report_header(edit, judge, prompts, args.seeds, settings, rules), []
        for name in names:
            if name in merged:
                report["probes"][name] = rates(merged[name])
                rendered.append(merged[name].images)
            else:
                report["probes"][name] = run_report_probe(pipe, edit, name, prompts, args.seeds, settings, judge,
                                                          kind, rules, progress)
        shutil.rmtree(shards)
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    report["processes"] = world
    (out / "probes.json").write_text(json.dumps(report, indent=2), "utf-8")
    if rendered:
        probe_sheet(rendered).save(out / "probes.png")
    print(f"protocol: {rules.name} ({rules.summary})")
    for line in probe_result_lines(report):
        print(line)
    print(f"-> {out / 'probes.json'}" + (f", {out / 'probes.png'}" if rendered else ""))


def write_shard(folder: Path, judged: dict[str, JudgedImages]) -> None:
    """One process's images (PNG, lossless) and verdicts, per probe."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {}
    for name, result in judged.items():
        images = result.images
        for i, image in enumerate(images.images):
            image.save(folder / f"{name}-{i:05d}.png")
        record[name] = {"probe": images.probe, "variants": images.variants, "prompts": images.prompts,
                        "seeds": images.seeds, "per_sample": images.per_sample, "settings": images.settings,
                        "seen": result.seen.tolist(),
                        "baseline": None if result.baseline_seen is None else result.baseline_seen.tolist(),
                        "baseline_samples": [[p, s] for p, s in baseline_samples(images)]}
    (folder / "verdicts.json").write_text(json.dumps(record), "utf-8")


def baseline_samples(images: ProbeImages) -> list[tuple[str, int]]:
    """The (prompt, seed) of each baseline image: the probe's first prompt on its seeds (the adversarial probe's
    baseline), else each of its samples once."""
    samples = list(dict.fromkeys(zip(images.prompts, images.seeds)))
    return samples[: len(images.baseline)]


def merge_shards(folders: list[Path], prompts: list[str], seeds: list[int]) -> dict[str, JudgedImages]:
    """Every process's images and verdicts, per probe, in the order one process renders them: prompt-major, then
    seed, then variant."""
    records = [json.loads((folder / "verdicts.json").read_text("utf-8")) for folder in folders]
    merged = {}
    for name in dict.fromkeys(name for record in records for name in record):
        rows, baseline = [], []
        parts = [(folder, record[name]) for folder, record in zip(folders, records) if name in record]
        for folder, part in parts:
            for i, (prompt, seed, variant, seen) in enumerate(zip(part["prompts"], part["seeds"], part["variants"],
                                                                  part["seen"])):
                rows.append((prompts.index(prompt), seeds.index(seed), len(rows), folder / f"{name}-{i:05d}.png",
                             prompt, seed, variant, seen))
            if part["baseline"] is not None:
                baseline += [(prompts.index(p), seeds.index(s), seen)
                             for (p, s), seen in zip(part["baseline_samples"], part["baseline"])]
        rows.sort(key=lambda row: row[:3])
        first = parts[0][1]
        images = ProbeImages(first["probe"], [load_png(row[3]) for row in rows], [row[6] for row in rows],
                             [row[4] for row in rows], [row[5] for row in rows], first["per_sample"],
                             first["settings"])
        baseline_seen = np.array([seen for *_, seen in sorted(baseline)]) if first["baseline"] is not None else None
        merged[name] = JudgedImages(images, np.array([row[7] for row in rows], dtype=bool), baseline_seen)
    return merged


def load_png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
