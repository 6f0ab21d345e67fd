"""A bounded, thread-safe LRU cache of encoder features keyed by (media_id, encoder name).

A client re-sends every image and clip of a conversation with each turn (the OpenAI API is
stateless), so without this each turn re-decodes and re-encodes the whole history. Keys are
content hashes, so the same bytes hit whoever sends them; the encoder name is part of the key so
two models (or a retrained encoder) never share features. Bounded in bytes, not entries: a 2 s
beep and a 2 min recording differ 60x in size.

    cache = FeatureCache(max_bytes=512 << 20)
    feats = cache.get((mid, "siglip-tiny"))      # None on a miss
    cache.put((mid, "siglip-tiny"), feats)       # evicts least recently used entries to fit
    cache.stats()                                # {"hits", "misses", "evictions", "bytes", ...}
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable


def nbytes(value: Any) -> int:
    """Size of a cached value: a tensor/array, or a list/tuple of them."""
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "element_size"):  # torch.Tensor
        return value.element_size() * value.nelement()
    return int(getattr(value, "nbytes", 0))


class FeatureCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0
        self.hits = self.misses = self.evictions = self.rejected = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = nbytes(value)
        with self._lock:
            if size > self.max_bytes:  # would evict everything and still not fit
                self.rejected += 1
                return
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
                self.evictions += 1

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            lookups = self.hits + self.misses
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "rejected": self.rejected,
                "entries": len(self._items),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hit_rate": self.hits / lookups if lookups else 0.0,
            }
