"""The built-in methods, one file each; importing this package registers them in `erasure.engine.registry`."""

from erasure.engine.registry import (METHODS, ConceptRows, LowRankDelta, Method, closed_forms,
                                     concept_rows, get_method, param, register, train_size_param)
from erasure.methods import esd, minimalist, scapre, speed, uce  # noqa: F401  (each registers itself)

__all__ = ["ConceptRows", "LowRankDelta", "METHODS", "Method", "closed_forms", "concept_rows", "get_method", "param",
           "register",
           "train_size_param"]
