"""Model sources that need no hub: the random-weight models ("tiny", ...) and the toy world ("toy"). Each registers
its loader and profile with the engine (`erasure.engine.pipeline.register_source`) when imported."""

from erasure.worlds import tiny, toy  # noqa: F401  (each registers itself)
