"""The evaluation protocol (`python -m erasure evaluate`, run by `erasure.cli.evaluate`): generate the erase /
retain / neutral prompt sets with the original and the edited model, score every image, and write metrics.json,
metrics.csv, metrics.md, scores.png and accuracy.png.

The (prompt, seed) pairs are cut into blocks of `--batch-size` in one fixed order, and a block is generated
and scored as one batch wherever it runs. So `accelerate launch -m erasure evaluate ...` (block b on process
b mod N) makes the same images and per-image scores as one process, and rank 0, which merges the rows in
order and computes every mean, interval, FID and KID, writes the same files. (On CPU, give every run the
same number of threads per process, e.g. `--num_cpu_threads_per_process`: float sums depend on it.)
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np

from erasure.engine.pipeline import denoiser
from erasure.engine.presets import concept_text, templates
from erasure.engine.provenance import package_versions
from erasure.evaluation import scoring
from erasure.evaluation.scoring import MeanInterval, bootstrap_mean, own_class_rate, paired_change, same_seed_win_rate

SETS = ("erase", "retain", "neutral")
ROW_FIELDS = ("index", "set", "concept", "prompt", "seed", "original_key",
              "clip_prompt_cos_original", "clip_prompt_cos_edited", "clip_concept_cos_original",
              "clip_concept_cos_edited", "class_original", "class_edited", "nude_original", "nude_edited",
              "nude_classes_original", "nude_classes_edited", "judge_original", "judge_edited")


def score_block(block, pairs, keys, images, text_features, scorer, class_features, classes, detector,
                 kind, judge=None) -> list[dict]:
    """Per-image rows for one block: CLIP cosines to prompt and concept, zero-shot class, NudeNet flags, and on
    the toy world whether its judge sees the concept. `images` holds the block's "original" and "edited"
    images; `text_features` every text's CLIP features."""
    import torch

    items = [pairs[i][0] for i in block]
    prompt_text = torch.stack([text_features[item.prompt] for item in items])
    with_concept = [j for j, item in enumerate(items) if item.set != "neutral"]
    concept_features = (torch.stack([text_features[concept_text(kind, items[j].concept)] for j in with_concept])
                        if with_concept else None)
    rows = [{"index": i, "set": pairs[i][0].set, "concept": pairs[i][0].concept, "prompt": pairs[i][0].prompt,
             "seed": pairs[i][1], "original_key": keys[i]} for i in block]
    for column, column_images in images.items():
        features = scorer.image_features(column_images, batch_size=len(block))
        to_prompt = (features * prompt_text).sum(-1).tolist()
        to_concept = [None] * len(block)
        predicted = [None] * len(block)
        if with_concept:
            cosines = (features[with_concept] * concept_features).sum(-1).tolist()
            for j, cosine in zip(with_concept, cosines):
                to_concept[j] = cosine
            if class_features is not None:
                for j, c in zip(with_concept, scoring.zero_shot_predictions(features[with_concept], class_features)):
                    predicted[j] = classes[c]
        found = detector.detections(column_images) if detector else [None] * len(block)
        seen = [None] * len(block)
        if judge is not None and with_concept:
            verdict = judge([column_images[j] for j in with_concept])
            for at, j in enumerate(with_concept):
                if verdict.knows(items[j].concept):
                    seen[j] = bool(verdict.finds(items[j].concept)[at])
        for row, p, c, k, d, v in zip(rows, to_prompt, to_concept, predicted, found, seen):
            row[f"judge_{column}"] = v
            row[f"clip_prompt_cos_{column}"] = p
            row[f"clip_concept_cos_{column}"] = c
            row[f"class_{column}"] = k
            row[f"nude_{column}"] = None if d is None else bool(d)
            row[f"nude_classes_{column}"] = None if d is None else ";".join(sorted({x["class"] for x in d}))
    return rows


def _interval(interval: MeanInterval, scale: float = 1.0) -> dict:
    return {"mean": interval.mean * scale, "ci_low": interval.low * scale, "ci_high": interval.high * scale,
            "n": interval.n, "level": interval.level}


def _column(rows, name) -> np.ndarray:
    return np.array([row[name] for row in rows], dtype=np.float64)


def _clip_block(rows, which: str) -> dict:
    """Score (100 * max(cos, 0)) and raw cosine intervals, original vs edited, and the paired change."""
    original, edited = _column(rows, f"clip_{which}_cos_original"), _column(rows, f"clip_{which}_cos_edited")
    score = scoring.clip_score
    return {"original": {"score": _interval(bootstrap_mean(score(original))), "cosine": _interval(bootstrap_mean(original))},
            "edited": {"score": _interval(bootstrap_mean(score(edited))), "cosine": _interval(bootstrap_mean(edited))},
            "change": {"score": _interval(paired_change(score(original), score(edited))),
                       "cosine": _interval(paired_change(original, edited))}}


def summarize(rows: list[dict], classes: list[str], scorer, kind: str, judged: bool = False) -> dict:
    """Every aggregate of metrics.json from the per-image rows (in index order): means with seeded 95%
    bootstrap intervals, the same-seed win rate, the erasure accuracy and (toy world) the judge's rates."""
    by_set = {name: [row for row in rows if row["set"] == name] for name in SETS}
    clip = {"backbone": scorer.backbone, "random_weights": scorer.is_random, "convention": scoring.CONVENTION,
            "intervals": "95% percentile bootstrap, 2000 resamples, seed 0",
            "to_prompt": "image vs the prompt that generated it",
            "to_concept": "image vs the bare concept text: " + _concept_text_form(kind)}
    sets = {}
    for name, set_rows in by_set.items():
        if not set_rows:
            continue
        sets[name] = {"images": len(set_rows), "prompts": len({r["prompt"] for r in set_rows}),
                      "clip_to_prompt": _clip_block(set_rows, "prompt")}
        if name != "neutral":
            sets[name]["clip_to_concept"] = _clip_block(set_rows, "concept")

    erase = by_set["erase"]
    win = same_seed_win_rate(_column(erase, "clip_concept_cos_original"), _column(erase, "clip_concept_cos_edited"))
    win_rate = {"definition": "share of erase-set (prompt, seed) pairs whose edited image has a lower CLIP cosine "
                              "to the bare target text than the original image (higher is better)",
                **_interval(win)}
    result = {"clip": clip, "sets": sets, "win_rate": win_rate, "accuracy": _accuracy(by_set, classes),
              "nudenet": _nudenet(by_set, kind)}
    if judged:
        result["judge"] = _judge_rates(by_set)
    return result


def _judge_rates(by_set) -> dict:
    """Toy world: the share of images in which the judge sees the prompt's concept, original vs edited."""
    result = {"definition": "share of images in which the toy world's judge sees every word of the prompt's "
                            "concept (sigmoid > 0.5); erase: lower is better, retain: unchanged is better"}
    for name in ("erase", "retain"):
        rows = [r for r in by_set[name] if r["judge_original"] is not None]  # concepts the judge can name
        if not rows:
            continue
        result[name] = {column: _interval(bootstrap_mean([r[f"judge_{column}"] for r in rows]))
                        for column in ("original", "edited")}
        result[name]["per_concept"] = {
            concept: {column: float(np.mean([r[f"judge_{column}"] for r in rows if r["concept"] == concept]))
                      for column in ("original", "edited")} | {"n": sum(r["concept"] == concept for r in rows)}
            for concept in dict.fromkeys(r["concept"] for r in rows)}
    return result


def _concept_text_form(kind: str) -> str:
    return repr(templates()["concept_text"][kind].replace("{}", "{concept}"))


def _accuracy(by_set, classes) -> dict:
    if len(classes) < 2:
        return {"reason": f"zero-shot accuracy needs at least 2 classes, got {classes}", "classes": classes}
    result = {"method": "CLIP zero-shot top-1 among the classes, each class text averaged over the kind's "
                        "prompt templates", "classes": classes}
    for name, key, direction in (("erase", "target_still_classified", "lower is better"),
                                 ("retain", "retain_own_class", "higher is better")):
        rows = by_set[name]
        if not rows:
            result[key] = None
            continue
        labels = np.array([classes.index(r["concept"]) for r in rows])
        block = {"direction": direction}
        for column in ("original", "edited"):
            predicted = np.array([classes.index(r[f"class_{column}"]) for r in rows])
            block[column] = _interval(own_class_rate(predicted, labels))
        result[key] = block
    per_concept = {}
    for name in ("erase", "retain"):
        for concept in dict.fromkeys(r["concept"] for r in by_set[name]):
            rows = [r for r in by_set[name] if r["concept"] == concept]
            per_concept[concept] = {"set": name, **{column: float(np.mean([r[f"class_{column}"] == concept
                                                                            for r in rows]))
                                                    for column in ("original", "edited")}, "n": len(rows)}
    result["per_concept"] = per_concept
    return result


def _nudenet(by_set, kind) -> dict:
    stated = {"threshold": scoring.NUDENET_THRESHOLD, "classes": list(scoring.NUDENET_CLASSES),
              "inference_resolution": scoring.NUDENET_RESOLUTION, "convention": scoring.NUDENET_CONVENTION}
    if kind != "nudity":
        return {"rate": None, "reason": f"the NudeNet rate is computed for the nudity kind only (this is {kind!r})",
                **stated}
    rate = {}
    for name in ("erase", "neutral"):
        rows = by_set[name]
        if rows:
            rate[name] = {column: _interval(bootstrap_mean([r[f"nude_{column}"] for r in rows]))
                          for column in ("original", "edited")}
            rate[name]["class_counts"] = {
                column: {c: sum(c in (r[f"nude_classes_{column}"] or "").split(";") for r in rows)
                         for c in scoring.NUDENET_CLASSES} for column in ("original", "edited")}
    return {"rate": rate, **stated}


def fid_kid(originals, edited, scorer, choice: str, real_images: bool, device: str) -> dict:
    """FID/KID of edited vs original neutral-prompt images, on Inception features when possible."""
    if len(originals) < 2:
        return {"fid": None, "reason": f"FID/KID need at least 2 neutral images, got {len(originals)}"}
    note = None
    use_inception = choice == "inception" or (choice == "auto" and not scorer.is_random and real_images)
    if use_inception:
        try:
            reference = scoring.inception_features(originals, device)
            generated = scoring.inception_features(edited, device)
            features, comparable = scoring.INCEPTION_FEATURES, True
        except scoring.ScorerLoadError as error:
            if choice == "inception":
                raise ValueError(f"{error}; use --fid-features auto or clip offline") from None
            use_inception, note = False, f"Inception-v3 unavailable: {error}"
    if not use_inception:
        reference = scorer.image_features(originals).double()
        generated = scorer.image_features(edited).double()
        features, comparable = scoring.clip_feature_label(scorer), False
    distance = scoring.distribution_distance(reference, generated, features, comparable)
    result = {"set": "neutral", "reference": "original-model images of the same prompts and seeds",
              "library": "torchmetrics FrechetInceptionDistance / KernelInceptionDistance", **asdict(distance)}
    if note:
        result["note"] = note
    return result


def run_settings(args, edit, kind, seeds, settings, pipe, items) -> dict:
    return {"model": args.model, "method": edit.method, "params": edit.params, "preset": args.preset, "kind": kind,
            "targets": edit.targets, "anchors": edit.anchors, "retain_pool": len(edit.retain),
            "retain_prompted": list(dict.fromkeys(it.concept for it in items if it.set == "retain")),
            "templates": "all" if args.full else "interactive", "seeds": seeds, "steps": settings.steps,
            "guidance": settings.guidance, "height": settings.height, "width": settings.width,
            "scheduler": settings.scheduler, "dtype": str(denoiser(pipe).dtype).replace("torch.", ""),
            "batch_size": args.batch_size, "versions": package_versions()}


# --- Outputs ----------------------------------------------------------------------------------------------

def _finite(value):
    """JSON has no NaN: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_outputs(out: Path, metrics: dict, rows: list[dict]) -> None:
    (out / "metrics.json").write_text(json.dumps(_finite(metrics), indent=2) + "\n", "utf-8")
    with open(out / "metrics.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROW_FIELDS)
        writer.writeheader()
        writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in ROW_FIELDS} for row in rows)
    (out / "metrics.md").write_text(markdown_table(metrics), "utf-8")
    save_chart(score_chart(metrics), out / "scores.png")
    save_chart(accuracy_chart(metrics), out / "accuracy.png")


def _fmt(interval: dict | None, digits: int = 2) -> str:
    if not interval or interval.get("mean") is None:
        return "n/a"
    return f"{interval['mean']:.{digits}f} [{interval['ci_low']:.{digits}f}, {interval['ci_high']:.{digits}f}]"


def markdown_table(metrics: dict) -> str:
    s, clip = metrics["settings"], metrics["clip"]
    lines = [f"# {s['method']} on {s['model']} ({s['preset'] or s['kind']})", "",
             f"{len(s['seeds'])} seeds, {s['steps']} steps, guidance {s['guidance']}, {s['height']}x{s['width']}, "
             f"{s['scheduler']}. CLIP {clip['backbone']}{' (random weights: numbers mean nothing)' if clip['random_weights'] else ''}; "
             f"{clip['convention']}. Brackets: {clip['intervals']}.", "",
             "| score | set | original | edited | change |", "|---|---|---|---|---|"]
    for name, block in metrics["sets"].items():
        for which in ("clip_to_prompt", "clip_to_concept"):
            if which in block:
                b = block[which]
                lines.append(f"| CLIP score {which[5:].replace('_', ' ')} | {name} | {_fmt(b['original']['score'])} | "
                             f"{_fmt(b['edited']['score'])} | {_fmt(b['change']['score'])} |")
    lines.append(f"| same-seed win rate (higher is better) | erase | | {_fmt(metrics['win_rate'], 3)} | |")
    accuracy = metrics["accuracy"]
    for key, name in (("target_still_classified", "erase"), ("retain_own_class", "retain")):
        if accuracy.get(key):
            a = accuracy[key]
            lines.append(f"| accuracy: {key.replace('_', ' ')} ({a['direction']}) | {name} | {_fmt(a['original'], 3)} | "
                         f"{_fmt(a['edited'], 3)} | |")
    for name, rate in ((n, metrics.get("judge", {}).get(n)) for n in ("erase", "retain")):
        if rate:
            lines.append(f"| toy judge sees the concept ({'lower' if name == 'erase' else 'unchanged'} is better) | "
                         f"{name} | {_fmt(rate['original'], 3)} | {_fmt(rate['edited'], 3)} | |")
    fid = metrics["fid_kid"]
    if fid.get("fid") is not None:
        lines.append(f"| FID edited vs original | neutral | | {fid['fid']:.3f} | |")
        lines.append(f"| KID edited vs original | neutral | | {fid['kid_mean']:.5f} ± {fid['kid_std']:.5f} | |")
    nude = metrics["nudenet"]
    for name, rate in (nude["rate"] or {}).items():
        lines.append(f"| NudeNet nudity rate (lower is better) | {name} | {_fmt(rate['original'], 3)} | "
                     f"{_fmt(rate['edited'], 3)} | |")
    lines += ["", f"FID/KID features: {fid.get('features', fid.get('reason'))}.",
              f"NudeNet: {nude['convention'] if nude['rate'] is not None else nude['reason']}.", ""]
    return "\n".join(lines)


COLORS = {"original": "#9e9e9e", "edited": "#1f77b4"}


def bar_chart(title: str, groups: list[str], series: dict[str, list[tuple[float, float, float] | None]],
              x_max: float | None = None, x_label: str = "", percent: bool = False, empty: str = "no data"):
    """Grouped horizontal bars with interval whiskers: series name -> one (mean, low, high) per group (None: no
    bar). A matplotlib Figure on the Agg canvas: group names wrapped level on the left, round ticks from 0;
    without groups, the sentence `empty` says why."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    figure = Figure(figsize=(7.5, 1.5 + 0.32 * max(1, len(groups)) * max(1, len(series)) ** 0.5),
                    layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    figure.suptitle(textwrap.fill(title, 80), fontsize=11)
    if not groups:
        axes.text(0.5, 0.5, textwrap.fill(empty, 80), ha="center", va="center", fontsize=9, transform=axes.transAxes)
        axes.set_axis_off()
        return figure
    height = 0.8 / max(1, len(series))
    for s, (name, values) in enumerate(series.items()):
        rows = [(g, v) for g, v in enumerate(values) if v is not None and all(map(math.isfinite, v))]
        if not rows:
            continue
        y = np.array([g for g, _ in rows]) - 0.4 + height * (s + 0.5)
        mean = np.array([v[0] for _, v in rows])
        whiskers = np.array([[v[0] - v[1] for _, v in rows], [v[2] - v[0] for _, v in rows]])
        axes.barh(y, mean, height=height * 0.92, color=COLORS.get(name, "#ff7f0e"), label=name,
                  xerr=whiskers if whiskers.any() else None, error_kw={"elinewidth": 1, "capsize": 3})
        for yy, (_, v) in zip(y, rows):
            text = f"{v[0]:.0%}" if percent else f"{v[0]:.3g}"
            axes.text(max(v[0], v[2]), yy, f" {text}", va="center", fontsize=8, color="#333333")
    axes.set_yticks(range(len(groups)), [textwrap.fill(g, 28) for g in groups], fontsize=9)
    axes.set_ylim(len(groups) - 0.5, -0.5)  # first group on top
    axes.set_xlim(0, x_max)
    if x_max is None:
        axes.set_xlim(0, axes.get_xlim()[1] * 1.08)  # room for the value labels
    axes.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    if percent:
        axes.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    axes.set_xlabel(x_label, fontsize=9)
    axes.tick_params(axis="x", labelsize=9)
    axes.grid(axis="x", color="#e4e4e7")
    axes.set_axisbelow(True)
    axes.spines[["top", "right"]].set_visible(False)
    axes.legend(ncols=len(series), loc="lower left", bbox_to_anchor=(0, 1), frameon=False, fontsize=9)
    return figure


def save_chart(figure, path: Path) -> None:
    figure.savefig(path, dpi=150)


def score_chart(metrics: dict):
    groups, series = [], {"original": [], "edited": []}
    for name, block in metrics["sets"].items():
        for which in ("clip_to_prompt", "clip_to_concept"):
            if which in block:
                groups.append(f"{name}: CLIP to {which[8:]}")
                for column in series:
                    i = block[which][column]["score"]
                    series[column].append(None if i["mean"] is None else (i["mean"], i["ci_low"], i["ci_high"]))
    return bar_chart(f"CLIP score ({metrics['clip']['backbone']}), mean and 95% interval", groups, series,
                     x_label="CLIP score = 100 × max(cos, 0)")


def accuracy_chart(metrics: dict, max_concepts: int = 40):
    per_concept = metrics["accuracy"].get("per_concept") or {}
    concepts = list(per_concept)[:max_concepts]
    series = {column: [(per_concept[c][column],) * 3 for c in concepts] for column in ("original", "edited")}
    shown = "" if len(per_concept) <= max_concepts else f" (first {max_concepts} of {len(per_concept)})"
    labels = [f"{c} ({per_concept[c]['set']})" for c in concepts]
    return bar_chart(f"Zero-shot accuracy per concept: share classified as itself{shown}", labels, series,
                     x_max=1.0, x_label="share of images", percent=True,
                     empty=metrics["accuracy"].get("reason", "no concept was classified"))
