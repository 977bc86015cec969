"""The method registry, read by the engine and filled by `erasure.methods`: name -> Method (summary, parameter
schema with defaults, and how it computes).

A method never touches the pipeline. There are two kinds:

- closed forms (`solve`): `prepare` turns concept texts into token rows through an encoder callable (the
  token conventions are the method's own), `solve` maps original weights and rows to new weights;
- trained methods (`train`): `train(job, concepts, params)` optimises its own copy of the parameters it
  changes against a private, frozen copy of the denoiser (`training.TrainingJob`), reports progress and
  checks for cancellation through the job, and returns patches.

All are plain functions; the app's dropdown, the CLI's choices and the tests read `METHODS`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class ConceptRows:
    """Token rows a closed-form method works on (float64, [n, d] each)."""
    targets: list[torch.Tensor]  # per target concept: [k, d] (k = 1 last subject token, 76 all tokens)
    anchors: list[torch.Tensor]  # paired with targets, same shapes
    retain: torch.Tensor  # [m, d]
    null: torch.Tensor  # [77, d]: every row of the empty prompt, BOS first (T5: its EOS first)
    start: int = 1  # the first content row of a prompt: 1 after CLIP's BOS, 0 on T5 (which has no start token)

    def to(self, device) -> "ConceptRows":
        return ConceptRows([t.to(device) for t in self.targets], [a.to(device) for a in self.anchors],
                           self.retain.to(device), self.null.to(device), self.start)


@dataclass(frozen=True)
class LowRankDelta:
    """A closed form's change W′ − W = up @ down of rank r (up [d_out, r], down [r, d_in], float64): what a
    solve returns when its change is low-rank by construction, so the edit stores factors, not matrices."""
    up: torch.Tensor
    down: torch.Tensor

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def saves_memory(self) -> bool:
        """Whether the factors hold fewer numbers than the matrix they multiply to."""
        (d_out, rank), d_in = self.up.shape, self.down.shape[1]
        return rank * (d_out + d_in) < d_out * d_in

    def dense(self) -> torch.Tensor:
        return self.up @ self.down


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    paper: str
    params: type  # a frozen dataclass whose fields are the parameters (defaults = the paper's)
    edits: Callable[[Any], tuple[str, ...]]  # params -> module suffixes it rewrites, e.g. ("attn2.to_v",)
    prepare: Callable | None = None  # closed forms: (Concepts, params, Encoder) -> ConceptRows
    # closed forms: (weights: {name: W float64}, ConceptRows, params) -> {name: W' or LowRankDelta}
    solve: Callable | None = None
    train: Callable | None = None  # trained: (TrainingJob, Concepts, params) -> ({key: Patch}, stats)
    uses_retain: bool = True  # False: retain concepts are ignored (and not recorded in the edit)

    def __post_init__(self):
        if (self.train is None) == (self.solve is None or self.prepare is None):
            raise ValueError(f"method {self.name!r} needs either prepare and solve (a closed form) or train")

    @property
    def trains(self) -> bool:
        """True for methods that optimise (seconds to minutes, with progress and cancel), False for closed forms."""
        return self.train is not None

    def schema(self) -> dict[str, dict]:
        """name -> {default, type, help, choices?, min?, max?}: what the app's Advanced panel is built from."""
        out = {}
        for f in dataclasses.fields(self.params):
            entry = {"default": f.default, "type": type(f.default).__name__, **f.metadata}
            out[f.name] = entry
        return out

    def parse_params(self, given: dict[str, Any]) -> Any:
        """Validate user parameters against the schema; a ValueError names the offending one."""
        schema = self.schema()
        unknown = sorted(set(given) - set(schema))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for method {self.name!r}; valid: {sorted(schema)}")
        values = {}
        for name, spec in schema.items():
            value = given.get(name, spec["default"])
            values[name] = _check_value(self.name, name, value, spec)
        return self.params(**values)


def _check_value(method: str, name: str, value: Any, spec: dict) -> Any:
    kind = spec["type"]
    where = f"{method} parameter {name!r}"
    if kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if kind in ("int", "float"):
        if isinstance(value, bool):
            raise ValueError(f"{where} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        if kind == "int":
            if number != int(number):
                raise ValueError(f"{where} must be a whole number, got {value!r}")
            number = int(number)
        if "min" in spec and number < spec["min"]:
            raise ValueError(f"{where} must be >= {spec['min']}, got {value!r}")
        if "max" in spec and number > spec["max"]:
            raise ValueError(f"{where} must be <= {spec['max']}, got {value!r}")
        if "multiple" in spec and number % spec["multiple"]:
            raise ValueError(f"{where} must be a multiple of {spec['multiple']}, got {value!r}")
        return number
    value = str(value)
    if "choices" in spec and value not in spec["choices"]:
        raise ValueError(f"{where} must be one of {spec['choices']}, got {value!r}")
    return value


def param(default, help: str, **limits):
    """A dataclass field carrying its schema: help text and min/max/multiple/choices."""
    return dataclasses.field(default=default, metadata={"help": help, **limits})


def train_size_param():
    """The image size a trained method trains at (a parameter of each)."""
    # A multiple of 8: the VAE's latent grid (and the UNet's down-sampling) needs it; 33 would fail minutes later.
    return param(0, "image side in pixels training samples at (0: the model's native size, 512 on SD-1.x; a "
                    "multiple of 8)", min=0, max=2048, multiple=8)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def closed_forms() -> list[str]:
    """The registered closed-form methods, by name (the others train)."""
    return sorted(name for name, method in METHODS.items() if not method.trains)


def get_method(name: str) -> Method:
    key = str(name).strip().lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[key]


def concept_rows(concepts, encode, all_tokens: bool = False, retain_texts=None) -> ConceptRows:
    """Rows by the reference conventions: last subject token per concept (or every row after the start token of
    each target/anchor prompt when `all_tokens`), retain concepts' last subject tokens, and the empty prompt.
    Texts are encoded in one batched pass per padding length."""
    retain_texts = list(concepts.retain if retain_texts is None else retain_texts)
    pairs = [*concepts.targets, *concepts.anchors]
    full = encode([*pairs, ""] if all_tokens else [""], True)
    short = encode(retain_texts if all_tokens else [*pairs, *retain_texts], False)
    null = full[-1].rows.double()
    if all_tokens:
        per_concept = [e.rows[e.start:].double() for e in full[:-1]]
    else:
        per_concept, short = [e.subject_row[None].double() for e in short[: len(pairs)]], short[len(pairs):]
    retain = torch.stack([e.subject_row for e in short]).double() if short else null.new_zeros(0, null.shape[1])
    n = len(concepts.targets)
    return ConceptRows(per_concept[:n], per_concept[n:], retain, null, full[-1].start)

