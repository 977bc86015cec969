"""Erasure Studio: closed-form concept erasure for Stable Diffusion pipelines.

    pipe = erasure.load_pipeline("CompVis/stable-diffusion-v1-4")   # or "tiny" offline
    edit = erasure.erase(pipe, "speed", targets=["Snoopy"], anchors=[""], retain=[...])
    with erasure.applied(pipe, edit):
        image = pipe("a photo of Snoopy", generator=torch.Generator().manual_seed(0)).images[0]
"""

from .apply import applied, check_applicable, restore, write_edit
from .compute import erase
from .edit import Edit, EditFileError, EditMismatchError, Patch
from .methods import METHODS, get_method
from .pipeline import DEFAULT_MODEL, ModelLoadError, load_pipeline
from .presets import Preset, load_preset, presets
from .training import TrainingCancelled


def methods():
    """name -> Method (summary, paper, `schema()` of parameters with defaults)."""
    return dict(METHODS)


__all__ = ["DEFAULT_MODEL", "Edit", "EditFileError", "EditMismatchError", "ModelLoadError", "Patch", "Preset",
           "applied", "check_applicable", "erase", "get_method", "load_pipeline", "load_preset", "methods", "presets",
           "restore", "TrainingCancelled", "write_edit"]
