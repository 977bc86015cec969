"""The probes' table: methods × probes, each cell the probe's rate, verdict or largest fall."""

from __future__ import annotations

from typing import Sequence

from erasure.evaluation.probes.registry import PROBE_TITLES


def recovery_table(reports: Sequence[dict]) -> list[dict]:
    """Methods × probes: one row per report (an edit's run), one column per probe with its recovery rate (best of
    N beside it when N > 1) or the diagnostic's verdict word."""
    rows = []
    for report in reports:
        row = {"edit": f"{report['method']}: {report['target']}"}
        for name, result in report["probes"].items():
            title = PROBE_TITLES.get(name, name)
            if "recovery_rate" in result:
                cell = f"{result['recovery_rate']:.0%}"
                if result["N"] > 1:
                    cell += f" (best of {result['N']}: {result['best_of_N_rate']:.0%})"
                row[title] = cell + f" of {result['images']}"
                if "baseline_rate" in result:
                    row[title] += f" (unprobed: {result['baseline_rate']:.0%})"
            elif "verdict" in result:
                row[title] = result["verdict"].split(":")[0]
            elif "matrix" in result:
                changes = [(cell["edited"] - cell["original"], neighbour)
                           for cells in result["matrix"].values() for neighbour, cell in cells.items()]
                if changes:
                    change, neighbour = min(changes)
                    row[title] = f"{neighbour} {change * 100:+.0f} pts (largest fall of {len(changes)})"
        rows.append(row)
    return rows
