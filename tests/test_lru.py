"""The one LRU helper: bounded by entries and by bytes, as the text-embedding cache uses it."""

import torch

from erasure.engine.lru import LRU, tensor_bytes
from erasure.engine.pipeline import TEXT_CACHE_BYTES, pipeline_state
from erasure.engine.text import encode_texts


def test_lru_evicts_least_recently_used_entries_past_its_byte_cap():
    cache = LRU(max_bytes=10, size=len)
    cache["a"], cache["b"] = "xxxx", "yyyy"
    assert cache.get("a") == "xxxx"  # a is now the most recently used
    cache["c"] = "zzzz"  # 12 bytes > 10: the least recently used (b) goes
    assert "b" not in cache and "a" in cache and "c" in cache and cache.nbytes == 8
    cache["big"] = "w" * 50  # the newest entry stays even when it alone is over the cap
    assert list(cache) == ["big"] and cache.nbytes == 50


def test_items_is_a_snapshot_that_leaves_recency_alone():
    cache = LRU(max_items=2)
    cache["a"], cache["b"] = 1, 2
    assert cache.items() == [("a", 1), ("b", 2)]
    cache["c"] = 3  # "a" is still the oldest, so it goes
    assert list(cache) == ["b", "c"]


def test_lru_count_cap_and_pop():
    cache = LRU(max_items=2)
    for key in "abc":
        cache[key] = key
    assert list(cache) == ["b", "c"] and cache.pop("b") == "b" and len(cache) == 1


def test_text_cache_is_bounded_in_bytes_not_entries(pipe):
    state = pipeline_state(pipe)
    assert state.text_cache.max_bytes == TEXT_CACHE_BYTES and state.text_cache.max_items is None
    original = state.text_cache
    state.text_cache = LRU(max_bytes=200_000, size=lambda e: tensor_bytes(e.rows))  # room for ~8 long concepts
    try:
        encode_texts(pipe, [f"a long retain concept number {i} with many words in it" for i in range(64)])
        assert 0 < state.text_cache.nbytes <= 200_000 and len(state.text_cache) < 64
    finally:
        state.text_cache = original
