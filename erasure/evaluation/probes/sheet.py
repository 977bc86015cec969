"""Image sheets of a probe run: one row per (prompt, seed), one column per variant."""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from erasure.evaluation.generate import comparison_grid
from erasure.evaluation.probes.registry import ProbeImages


def probe_sheet(rendered: Sequence[ProbeImages], cell: int = 128):
    """One row per (prompt, seed), one column per probe variant."""

    columns, titles = [], []
    rows = list(dict.fromkeys(row for images in rendered for row in zip(images.prompts, images.seeds)))
    for images in rendered:
        for variant in dict.fromkeys(images.variants):
            picked = {(p, s): im for im, v, p, s in zip(images.images, images.variants, images.prompts, images.seeds)
                      if v == variant}
            blank = Image.new("RGB", next(iter(picked.values())).size, (255, 255, 255))
            columns.append([picked.get(row, blank) for row in rows])  # e.g. the attack runs on one prompt
            titles.append(variant if images.probe != "standard" else "standard")
    return comparison_grid([f"{p} · seed {s}" for p, s in rows], titles, columns, cell=cell)
