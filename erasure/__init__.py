"""Erasure Studio: closed-form concept erasure for Stable Diffusion pipelines.

    pipe = erasure.load_pipeline("CompVis/stable-diffusion-v1-4")   # or "tiny" offline
    edit = erasure.erase(pipe, "speed", targets=["Snoopy"], anchors=[""], retain=[...])
    with erasure.applied(pipe, edit):
        image = pipe("a photo of Snoopy", generator=torch.Generator().manual_seed(0)).images[0]
"""

from erasure import worlds  # noqa: F401  (registers the offline models: the toy world, the random-weight ones)
from erasure.engine.apply import applied, check_applicable, restore, write_edit
from erasure.engine.compute import erase
from erasure.engine.edit import Edit, EditFileError, EditMismatchError, Patch
from erasure.engine.pipeline import DEFAULT_MODEL, ModelLoadError, load_pipeline
from erasure.engine.presets import Preset, load_preset, presets
from erasure.engine.progress import Cancelled, Progress
from erasure.engine.training import TrainingCancelled
from erasure.methods import METHODS, get_method  # importing the package registers the built-in methods


def methods():
    """name -> Method (summary, paper, `schema()` of parameters with defaults)."""
    return dict(METHODS)


__all__ = ["DEFAULT_MODEL", "Edit", "EditFileError", "EditMismatchError", "ModelLoadError", "Patch", "Preset",
           "applied", "check_applicable", "erase", "get_method", "load_pipeline", "load_preset", "methods", "presets",
           "restore", "TrainingCancelled", "write_edit", "Cancelled", "Progress"]
