"""`python -m erasure evaluate`: generate the prompt sets with the original and the edited model, score them and
write metrics.json/.csv/.md and charts; `accelerate launch` shards the (prompt, seed) blocks across processes and
rank 0 merges (through files, no collectives)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

import erasure
from erasure.cli.arguments import concepts_and_params, process_state, settings_from_args
from erasure.engine.edit import Edit
from erasure.engine.pipeline import model_identity
from erasure.engine.presets import concept_text, evaluation_prompts, load_preset, prompt_set_sizes, prompt_templates
from erasure.engine.profiles import profile_of
from erasure.evaluation import scoring
from erasure.evaluation.evaluate import fid_kid, run_settings, score_block, summarize, write_outputs
from erasure.evaluation.generate import OriginalCache, default_cache_folder, generate_pairs, image_key
from erasure.evaluation.probes import model_classifier


def cmd_evaluate(args) -> None:
    started = time.time()
    state, device = process_state(args.device)
    rank, world = state.process_index, state.num_processes
    out = Path(args.out)
    shards = out / ".shards"
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")

    kind = args.kind or (load_preset(args.preset).kind if args.preset else "object")
    seeds = list(range(args.seeds if args.seeds is not None else prompt_set_sizes(args.full)["seeds"]))
    if not seeds:
        raise ValueError("--seeds must be >= 1")
    clip_name = args.clip_model or profile_of(args.model).scorer or scoring.DEFAULT_CLIP[0]
    clip_tag = args.clip_pretrained or scoring.DEFAULT_CLIP[1]
    try:
        scorer = scoring.load_clip_scorer(clip_name, clip_tag, device=device)
    except scoring.ScorerLoadError as error:
        raise ValueError(str(error)) from None  # the CLI ends ValueErrors with one sentence, no traceback
    pipe = erasure.load_pipeline(args.model, device=device)
    settings = settings_from_args(pipe, args)

    # One edit for every process: rank 0 computes (or copies) it, the others read the same file.
    edit_path = out / "edit.safetensors"
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(shards, ignore_errors=True)
        if args.edit:
            Edit.load(args.edit).save(edit_path)
        else:
            targets, anchors, retain, params = concepts_and_params(args, pipe)
            erasure.erase(pipe, args.method, targets, anchors, retain, **params).save(edit_path)
    state.wait_for_everyone()
    edit = Edit.load(edit_path)

    items = evaluation_prompts(kind, edit.targets, edit.retain, args.full, args.retain_count, args.neutral_count)
    pairs = [(item, seed) for item in items for seed in seeds]
    blocks = [list(range(start, min(start + args.batch_size, len(pairs))))
              for start in range(0, len(pairs), args.batch_size)]
    mine = blocks[rank::world]
    identity = model_identity(pipe)
    keys = [image_key(identity, item.prompt, seed, settings) for item, seed in pairs]
    cache = OriginalCache(max_images=2 * args.batch_size, folder=args.originals or default_cache_folder())
    edited_dir = out / "images" / "edited"
    edited_dir.mkdir(parents=True, exist_ok=True)
    quiet = not state.is_local_main_process

    def pairs_of(block):
        return [(pairs[i][0].prompt, pairs[i][1]) for i in block]

    # Zero-shot classes: targets, anchors and the retain concepts prompted, each averaged over all templates.
    classes = list(dict.fromkeys(c for c in [*edit.targets, *edit.anchors,
                                             *(it.concept for it in items if it.set == "retain")] if c.strip()))
    class_features = scorer.class_features(classes, prompt_templates(kind, full=True)) if len(classes) > 1 else None
    detector = scoring.load_nudity_detector() if kind == "nudity" else None
    judge = model_classifier(pipe)
    # Each distinct prompt and concept text is encoded once (not once per seed), in the same order on every
    # process, so no score depends on how the pairs are sharded.
    texts = list(dict.fromkeys([item.prompt for item in items]
                               + [concept_text(kind, item.concept) for item in items if item.set != "neutral"]))
    text_features = dict(zip(texts, scorer.text_features(texts)))

    rows = []
    for block in tqdm(mine, desc="images and scores", unit="batch", disable=quiet):
        missing = [i for i in block if cache.get(keys[i]) is None]
        for i, image in zip(missing, generate_pairs(pipe, pairs_of(missing), settings, None) if missing else []):
            cache.put(keys[i], image)
        images = {"original": [cache.get(keys[i]) for i in block],
                  "edited": generate_pairs(pipe, pairs_of(block), settings, edit)}
        for i, image in zip(block, images["edited"]):
            image.save(edited_dir / f"{i:06d}.png")
        # scored while in memory: no image is decoded again
        rows.extend(score_block(block, pairs, keys, images, text_features, scorer, class_features, classes,
                                 detector, kind, judge))
    shards.mkdir(parents=True, exist_ok=True)
    (shards / f"rows-{rank}.json").write_text(json.dumps(rows), "utf-8")
    state.wait_for_everyone()
    if not state.is_main_process:
        return

    rows = sorted((row for path in shards.glob("rows-*.json") for row in json.loads(path.read_text("utf-8"))),
                  key=lambda row: row["index"])
    if [row["index"] for row in rows] != list(range(len(pairs))):
        raise RuntimeError(f"merged {len(rows)} score rows for {len(pairs)} images; a process did not finish")
    shutil.rmtree(shards)

    metrics = summarize(rows, classes if class_features is not None else [], scorer, kind, judged=judge is not None)
    neutral = [i for i, (item, _) in enumerate(pairs) if item.set == "neutral"]
    with tqdm(total=1, desc="fid/kid", disable=quiet) as bar:
        metrics["fid_kid"] = fid_kid([cache.get(keys[i]) for i in neutral],
                                      [_open(edited_dir / f"{i:06d}.png") for i in neutral],
                                      scorer, args.fid_features, profile_of(args.model).real_images, device)
        bar.update()
    metrics = {"settings": run_settings(args, edit, kind, seeds, settings, pipe, items), **metrics}
    write_outputs(out, metrics, rows)
    run = {"processes": world, "device": device, "seconds": round(time.time() - started, 1),
           "originals_cache": str(cache.folder), "edit": str(edit_path), "edit_stats": edit.stats}
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str) + "\n", "utf-8")
    print(f"{len(pairs)} (prompt, seed) pairs x original | edited, scored with {scorer.backbone} -> {out}/metrics.json")


def _open(path):
    with Image.open(path) as image:
        return image.convert("RGB")


