"""The studio's reports and tables: what an edit, a comparison, a probe run and a background job are, in the words
and tables the app shows and the CLI prints. Plain strings and pandas tables; no Gradio."""

from __future__ import annotations

import math
import re
import time

import pandas as pd

from erasure.engine.presets import prompt_templates
from erasure.evaluation.compare import GROUPS, ORIGINAL
from erasure.evaluation.generate import Settings
from erasure.evaluation.probes import PROBE_TITLES, PROBES, recovery_table


def short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def job_progress(job) -> str:
    if job.state == "waiting":
        return f"**{job.label}**: waiting for another session's background job to finish..."
    seconds = f"{time.monotonic() - job.started:.0f} s"
    if job.kind == "probes":
        return f"**Probes**: {job.message or 'starting...'} · {seconds}"
    loss = f" · loss {job.loss:.4g}" if job.done else ""
    return f"**{job.label}**: step {job.done} of {job.total or '?'}{loss} · {seconds}"


def job_outcome(job) -> str:
    """A finished job's status line: done (in how long, with its final loss or its size), cancelled or failed."""
    title = "Probes" if job.kind == "probes" else job.label
    if job.state == "cancelled":
        return f"**{title}**: cancelled; nothing was kept."
    if job.state == "failed":
        return f"**{title}**: failed: {job.error}"
    seconds = f"{(job.ended or time.monotonic()) - job.started:.0f} s"
    if job.kind == "probes":
        return (f"**Probes**: done in {seconds} ({len(job.result)} edit(s) × "
                f"{len(job.result[0]['report']['probes'])} probe(s)).")
    return f"**{job.label}**: done in {seconds} (final loss {job.loss:.4g})."


def default_probe_prompts(edit, kind: str) -> list[str]:
    """What an empty prompt box probes with: the kind's interactive templates with the edit's first target (as
    `python -m erasure probe` does)."""
    return [form.format(edit.targets[0]) for form in prompt_templates(kind)]


def probe_table(results: list[dict]) -> pd.DataFrame:
    """Edits × probes: each cell the share of the probe's images that show the target. Rows are named by the
    session's labels (two edits of one method and target stay apart); with no results, every probe's column."""
    rows = [{**row, "edit": result["label"]}
            for result, row in zip(results, recovery_table([r["report"] for r in results]))]
    columns = ["edit", *(rows[0] if rows else (PROBE_TITLES.get(name, name) for name in PROBES))]
    return pd.DataFrame(rows, columns=list(dict.fromkeys(columns)))


def probe_column_widths(table: pd.DataFrame) -> list[str]:
    """Probe columns share the width equally, so that nine or more fit the page (their cells wrap) instead of the
    widest text pushing the last ones out of sight."""
    probes = max(1, len(table.columns) - 1)
    return ["12%", *[f"{88 / probes:.2f}%"] * probes]


def own_samplers(report: dict, settings: Settings) -> str:
    """' (noise-based: ddim (η, v))' for the probes that sample their own way; '' when none does."""
    own = [f"{PROBE_TITLES.get(name, name)}: {result['settings']['scheduler']}"
           for name, result in report["probes"].items()
           if result.get("settings", {}).get("scheduler", settings.scheduler) != settings.scheduler]
    return f" ({'; '.join(own)})" if own else ""


def probe_note(results: list[dict], settings: Settings) -> str:
    """What the table's numbers rest on: the judge, N per probe, prompts, seeds and sampler settings, and the
    diagnostic's verdicts in full."""
    first = results[0]["report"]
    judges = "; ".join(dict.fromkeys(r["report"]["judge"] for r in results))
    by_n: dict[int, list[str]] = {}
    for name, result in first["probes"].items():
        if "N" in result:
            by_n.setdefault(result["N"], []).append(PROBE_TITLES.get(name, name))
    ns = "; ".join(f"{', '.join(titles)}: N = {n}" for n, titles in sorted(by_n.items()))
    seeds = first["seeds"]
    lines = [f"**Protocol**: {first['protocol']} ({first['protocol_summary']}).",
             f"**Judge**: {judges}. A cell is the share of the probe's images in which the judge finds the target; "
             f"best of N counts a (prompt, seed) as recovered when any of its N images shows it ({ns})." if ns
             else f"**Judge**: {judges}.",
             f"{len(first['prompts'])} prompt(s) × {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); "
             f"{first['steps']} steps, guidance {settings.guidance:g}, {settings.width} px, {settings.scheduler} "
             f"sampler{own_samplers(first, settings)}."]
    for result in results:
        verdict = result["report"]["probes"].get("diagnostic", {}).get("verdict")
        if verdict:
            lines.append(f"Avoidance vs destruction, {result['label']}: {verdict}.")
    return "  \n".join(lines)


def edit_report(edit, uploaded: str | None = None) -> str:
    stats = edit.stats
    source = f"Loaded `{uploaded}`: " if uploaded else ""
    anchors = ", ".join(repr(a) if a else "the empty prompt" for a in dict.fromkeys(edit.anchors))
    lines = [f"{source}**{edit.method.upper()}** maps {short(', '.join(edit.targets), 80)} → {anchors}, "
             f"keeping {len(edit.retain)} retain concept(s); "
             f"{len(edit.modules())} modules changed."]
    if "solve_seconds" in stats and "encode_seconds" in stats:
        lines.append(f"Computed in **{stats['encode_seconds'] + stats['solve_seconds']:.2f} s** "
                     f"({stats['encode_seconds']:.2f} s text encoding + {stats['solve_seconds']:.2f} s solve).")
    if "train_seconds" in stats:
        lines.append(f"Trained in **{stats['train_seconds']:.1f} s**; loss {stats['loss_first']:.4g} → "
                     f"{stats['loss_last']:.4g} (means of the first and last steps).")
    if "sparsity" in stats:
        lines.append(f"Masks: **{stats['units_off']} of {stats['units']} units off** (sparsity "
                     f"{stats['sparsity']:.2%}); erasure loss {stats['concept_loss_all_on']:.4g} with every unit "
                     f"on → {stats['concept_loss']:.4g}; retain error {stats['retain_relative_error']:.2%} of the "
                     f"retain latents' mean square.")
    return "  \n".join(lines)


LAYER_COLUMNS = ["layer", "relative change", "target residual", "retain drift"]
SUMMARY_COLUMNS = ["prompts", "column", "n", "CLIP to prompt", "95% CI", "Δ vs original", "CLIP to target"]
UNET_ATTENTION = re.compile(r"(down|mid|up)_blocks?\.(?:(\d+)\.)?attentions\.(\d+)\.transformer_blocks\.(\d+)\.(.+)")


def short_layer_name(module: str) -> str:
    """'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v' -> 'down 1.0 · attn2.to_v' (block, attention
    and, when not the first, transformer index); any other module path is kept whole."""
    match = UNET_ATTENTION.fullmatch(module)
    if not match:
        return module
    side, block, attention, transformer, rest = match.groups()
    where = f"{side} {block}.{attention}" if block is not None else f"{side} {attention}"
    if transformer != "0":
        where += f" block {transformer}"
    return f"{where} · {rest}"


def layer_table(edit=None) -> pd.DataFrame:
    """One row per edited module: its short name and its statistics to 3 significant digits."""
    layers = edit.stats.get("layers", {}) if edit is not None else {}
    names = [short_layer_name(module) for module in layers]
    if len(set(names)) < len(names):  # a model whose short names collide: show the full paths
        names = list(layers)
    rows = [[name, *(float(f"{s.get(key, float('nan')):.3g}") for key in
                     ("relative_change", "target_residual", "retain_drift"))]
            for name, s in zip(names, layers.values())]
    return pd.DataFrame(rows, columns=LAYER_COLUMNS)


def summary_table(summary: list[dict]) -> pd.DataFrame:
    rows = [[r["group"], r["column"], r["n"], round(r["mean"], 2), f"{r['ci_low']:.2f}–{r['ci_high']:.2f}",
             round(r["change"], 2), round(r["target_mean"], 2)] for r in summary]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def summary_bars(summary: list[dict]) -> tuple[pd.DataFrame, dict[str, str], float]:
    """The summary chart: one bar per (prompt group, column), labelled short enough to read level ('erase: #1'),
    a colour per column named in full in the legend (original grey, as in the evaluation charts), and the axis's
    round end."""
    group_key = {title: key for key, title in GROUPS.items()}
    bars = pd.DataFrame([{"bar": f"{group_key[r['group']]}: {r['column'].split(' ')[0]}",
                          "column": r["column"], "mean CLIP to prompt": r["mean"]} for r in summary],
                        columns=["bar", "column", "mean CLIP to prompt"])
    edits = [c for c in dict.fromkeys(bars["column"]) if c != ORIGINAL]
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    colors = {ORIGINAL: "#9e9e9e", **{c: palette[i % len(palette)] for i, c in enumerate(edits)}}
    return bars, colors, axis_end(bars["mean CLIP to prompt"].max() if len(bars) else 0.0)


def axis_end(value: float) -> float:
    """The smallest round number (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 × 10^k) >= `value`: bars start at 0 and
    the axis ends on a tick."""
    if not value > 0:
        return 1.0
    scale = 10.0 ** math.floor(math.log10(value))
    return next(m * scale for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * scale >= value * (1 - 1e-12))




def probe_result_lines(report: dict) -> list[str]:
    """One line per probe of a `run_probes` report (the CLI prints them): its rate, the matrix or the verdict."""
    lines = []
    for name, result in report["probes"].items():
        if "recovery_rate" in result:
            baseline = f"; the same prompt unprobed: {result['baseline_rate']:.0%}" if "baseline_rate" in result else ""
            lines.append(f"{name}: recovered in {result['recovery_rate']:.0%} of {result['images']} images "
                  f"(best of N = {result['N']}: {result['best_of_N_rate']:.0%}{baseline})")
        elif "matrix" in result:
            for target, cells in result["matrix"].items():
                lines.append(f"{name}: {target} -> " + ", ".join(
                    f"{n} {c['original']:.0%}->{c['edited']:.0%}" for n, c in cells.items()))
        else:
            lines.append(f"{name}: {result['verdict']}")
    return lines
