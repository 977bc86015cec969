"""What produced a result: package versions recorded in the app's run JSON and in evaluate's metrics."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("erasure-studio", "torch", "diffusers", "transformers", "open_clip_torch", "torchmetrics", "nudenet",
            "accelerate", "gradio")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out
