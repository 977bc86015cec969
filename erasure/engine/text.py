"""Prompts -> the token rows the denoiser sees for them, batched and cached per pipeline.

How rows are computed is the model family's (families.py): CLIP's last hidden state on SD-1.x/2.x, both
encoders' penultimate states concatenated on SDXL, T5's last hidden state at the pipeline's sequence length
on FLUX. Token conventions (shared by UCE and SPEED's reference code): a concept is represented by its *last
subject token*, index `attention_mask.sum() - 2`; for the empty prompt that is BOS, which is the same
for every prompt because the CLIP text encoder is causal. SPEED's all-token mode uses rows 1..76 (on T5,
which has no start token, every row).
On T5 (no BOS, "a cat" -> [a, cat, </s>]) the same index is the last subject token; "" is row 0, its EOS.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from erasure.engine.limits import MAX_RETAIN, check_concept_counts
from erasure.engine.pipeline import pipeline_state

# Every encoder call has a fixed shape (see encode_texts): concept names of one token count in calls of 16,
# full-length prompts (77 tokens) in calls of 8. Cost is about proportional to tokens encoded, padding and
# repeats included: on SD-1.4's encoder, 2 CPU cores, 600 names take ~4.7 s (vs ~3.5 s padded to each
# batch's longest, which made rows depend on the batch).
SHORT_BATCH = 16
FULL_BATCH = 8


@dataclass(frozen=True)
class EncodedText:
    rows: torch.Tensor  # [L, d]: L = tokens up to EOS, or the full 77 when encoded at full length
    subject: int  # index of the last subject token (0 = BOS for "")
    start: int = 1  # the first content row: 1 after a start token (CLIP's BOS), 0 without one (T5)

    @property
    def subject_row(self) -> torch.Tensor:
        return self.rows[self.subject]


Encoder = Callable[[Sequence[str], bool], list[EncodedText]]


@dataclass(frozen=True)
class Concepts:
    """Validated concept lists; `anchors` has one entry per target."""
    targets: tuple[str, ...]
    anchors: tuple[str, ...]
    retain: tuple[str, ...]


def split_concepts(text: str) -> list[str]:
    """One concept per line; a single line is split on commas. So 'Snoopy, Mickey' -> ['Snoopy', 'Mickey'],
    while a list with one name per line keeps names that contain commas ('Huey, Dewey and Louie').
    The app's fields and the CLI's --targets/--retain share this rule."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if len(lines) == 1:
        lines = lines[0].split(",")
    return [part.strip() for part in lines if part.strip()]


def validate_concepts(targets: Sequence[str], anchors: Sequence[str], retain: Sequence[str], tokenizer,
                      max_concepts: int) -> Concepts:
    """Check concept lists, with a specific ValueError for each way they can be wrong."""
    if isinstance(targets, str) or isinstance(anchors, str) or isinstance(retain, str):
        raise ValueError("targets, anchors and retain must be lists of strings, e.g. targets=['Snoopy']")
    targets = [str(t) for t in targets]
    if not targets:
        raise ValueError("no target concept given: name at least one concept to erase")
    for i, target in enumerate(targets):
        if not target.strip():
            raise ValueError(f"target concept #{i + 1} is empty; every target needs some text")
    targets = [t.strip() for t in targets]
    seen: dict[str, str] = {}
    for target in targets:
        if target.lower() in seen:
            raise ValueError(f"target concept {target!r} is given twice; list each concept once")
        seen[target.lower()] = target
    check_concept_counts(len(targets), 0, max_targets=max_concepts)
    anchors = [str(a).strip() for a in anchors]
    if len(anchors) == 1:
        anchors = anchors * len(targets)
    if len(anchors) != len(targets):
        raise ValueError(f"got {len(anchors)} anchors for {len(targets)} targets; give one anchor for all targets or "
                         f"one per target ('' is the empty prompt)")
    retain_clean, dropped = [], []
    for concept in (str(r).strip() for r in retain):
        if concept.lower() in seen:
            dropped.append(concept)
        elif concept not in retain_clean:
            retain_clean.append(concept)
    if dropped:
        warnings.warn(f"retain concepts {dropped} are also targets and were left out of the retain set")
    check_concept_counts(len(targets), len(retain_clean), max_targets=max_concepts, max_retain=MAX_RETAIN)
    texts = targets + anchors + retain_clean
    special = len(tokenizer("").input_ids)  # BOS + EOS for CLIP, EOS alone for T5
    for concept, ids in zip(texts, tokenizer(texts, truncation=False).input_ids):
        n_tokens = len(ids)
        if n_tokens > tokenizer.model_max_length:
            warnings.warn(f"concept {concept[:40]!r}... is {n_tokens - special} tokens; the text encoder keeps "
                          f"{tokenizer.model_max_length - special}, so it is truncated")
    return Concepts(tuple(targets), tuple(anchors), tuple(retain_clean))


@torch.no_grad()
def encode_texts(pipe, texts: Sequence[str], full_length: bool = False, progress: bool = False) -> list[EncodedText]:
    """Encode texts with the pipeline's text encoder, in batches, cached per (text, full_length).

    A text's rows are a function of the text alone, bitwise, whatever was encoded before or beside it:
    texts are grouped by token count (nothing is padded unless `full_length`) and every encoder call has a
    fixed number of sequences (the last chunk of a group is filled with repeats), so each row is computed
    by the same kernels on the same shapes. Short concept names encode ~10x faster than at 77.
    """

    state = pipeline_state(pipe)
    with state.text_lock:
        return _encode_cached(pipe, state.text_cache, texts, full_length, progress)


def content_start(tokenizer) -> int:
    """1 when the tokenizer puts a start token before the text (CLIP's BOS), 0 when it does not (T5)."""
    ids = tokenizer("").input_ids
    return int(bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)


def _encode_cached(pipe, cache, texts, full_length, progress):
    from tqdm.auto import tqdm

    family = pipeline_state(pipe).family
    tokenizer = family.tokenizer(pipe)
    found = {t: e for t in dict.fromkeys(texts) if (e := cache.get((t, full_length))) is not None}
    todo = [t for t in dict.fromkeys(texts) if t not in found]
    if not todo:
        return [found[text] for text in texts]
    limit = family.sequence_length(pipe)
    # A non-causal encoder (T5) sees the padding: rows are only the pipeline's own at its full length.
    padded = full_length or not family.causal
    counts = [limit] * len(todo) if padded else map(len, tokenizer(todo, truncation=True).input_ids)
    by_length: dict[int, list[str]] = {}
    for text, count in zip(todo, counts):
        by_length.setdefault(count, []).append(text)
    batch_size = FULL_BATCH if padded else SHORT_BATCH
    start = content_start(tokenizer)
    chunks = [(length, group[start:start + batch_size]) for length, group in sorted(by_length.items())
              for start in range(0, len(group), batch_size)]
    for length, chunk in tqdm(chunks, desc="encoding concepts", unit="batch",
                              disable=not progress or len(chunks) < 2):
        batch = chunk + chunk[-1:] * (batch_size - len(chunk))
        hidden, lengths = family.encode(pipe, batch, length)
        for i, text in enumerate(chunk):
            keep = length if full_length else int(lengths[i])
            # T5 has no BOS: "" is one EOS token, whose row is the empty prompt's subject row.
            subject = max(int(lengths[i]) - 2, 0)
            found[text] = cache[(text, full_length)] = EncodedText(hidden[i, :keep].clone(), subject, start)
    return [found[text] for text in texts]
