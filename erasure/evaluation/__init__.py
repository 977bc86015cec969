"""Evaluation: same-seed generation and its cache, comparisons, CLIP scores, the evaluation protocol, probes and
benchmarks. Reads the engine; knows no model by name (the profile gives the judge and the scorer)."""
