"""A small thread-safe LRU map, bounded by entry count and, when given a size function, by bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterator, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """Least-recently-used map. `max_items` caps entries; `max_bytes` caps the sum of `size(value)`.
    The newest entry is always kept, even when it alone is over `max_bytes`."""

    def __init__(self, max_items: int | None = None, max_bytes: int | None = None,
                 size: Callable[[V], int] | None = None):
        if max_bytes is not None and size is None:
            raise ValueError("an LRU bounded in bytes needs a size function")
        self.max_items, self.max_bytes, self._size = max_items, max_bytes, size
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, default: V | None = None) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return default
            self._entries.move_to_end(key)
            return entry[0]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __getitem__(self, key: Hashable) -> V:
        with self._lock:
            self._entries.move_to_end(key)
            return self._entries[key][0]

    def __setitem__(self, key: Hashable, value: V) -> None:
        nbytes = self._size(value) if self._size else 0
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            while len(self._entries) > 1 and (
                    (self.max_items is not None and len(self._entries) > self.max_items)
                    or (self.max_bytes is not None and self._bytes > self.max_bytes)):
                _, (_, freed) = self._entries.popitem(last=False)
                self._bytes -= freed

    def pop(self, key: Hashable, default: V | None = None) -> V | None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return default
            self._bytes -= entry[1]
            return entry[0]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[Hashable, V]]:
        """A snapshot of (key, value), oldest first, that leaves recency as it is."""
        with self._lock:
            return [(key, value) for key, (value, _) in self._entries.items()]

    def __iter__(self) -> Iterator[Hashable]:
        with self._lock:
            return iter(list(self._entries))

    @property
    def nbytes(self) -> int:
        return self._bytes


def tensor_bytes(*tensors) -> int:
    """Bytes held by tensors (the size function of tensor-valued caches)."""
    return sum(t.numel() * t.element_size() for t in tensors)
