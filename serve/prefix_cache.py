"""A bounded LRU store of prompts' KV caches, so a request reuses the longest prefix already
computed, within a batch's lifetime and across requests.

The OpenAI API is stateless: every turn of a conversation re-sends the whole history, and without
this each turn re-runs the prefill of everything before it. An entry is one computed sequence (a
prompt, or a prompt and its reply) with its per-layer KV. A lookup compares the request's *keys*
with every entry's and returns the longest common prefix: a key is the token id, except inside a
media span, where every placeholder token's key is derived from the item's content hash, so two
prompts with the same ids but different images part at the first placeholder of the first
differing item. An entry whose keys another entry extends is dropped (the longer one answers every
lookup it would). Bounded in bytes (KV of long chats is MBs), least recently used first out.

    cache = PrefixCache(max_bytes=256 << 20)
    keys = prompt_keys(ids, media_hashes, pad_ids)
    past = cache.lookup(keys)          # mmm.generation.Past or None; at most len(keys) - 1 tokens
    cache.store(keys, layers)          # layers: per layer (keys, values) of shape (1, H, len(keys), D)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from mmm.generation import Past


def prompt_keys(ids: list[int], media_hashes: list[str], pad_ids: Iterable[int]) -> np.ndarray:
    """(L,) int64 keys: token ids, with each media span's placeholders replaced by a negative key
    from its item's content hash (``media_hashes[k]``: sha256 hex of the k-th item in order)."""
    arr = np.asarray(ids, dtype=np.int64)
    pad = np.zeros(len(arr), dtype=bool)
    for pad_id in pad_ids:  # two ids: cheaper than np.isin's table over the id range
        pad |= arr == pad_id
    if not pad.any():
        return arr
    first = pad & ~np.concatenate([[False], pad[:-1]])
    span = np.cumsum(first) - 1  # index of the span each placeholder belongs to
    if int(span[pad].max()) >= len(media_hashes):
        raise ValueError(f"the prompt has {int(first.sum())} media spans but {len(media_hashes)} hashes were given")
    codes = np.array([-1 - (int(h[:15], 16)) for h in media_hashes], dtype=np.int64)  # 60 bits, always < 0
    out = arr.copy()
    out[pad] = codes[span[pad]]
    return out


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


@dataclass
class _Entry:
    keys: np.ndarray
    layers: list
    nbytes: int


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"prefix cache max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._next = 0
        self._bytes = 0
        self.hits = self.misses = self.evictions = self.reused_tokens = self.lookup_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, keys: np.ndarray) -> Past | None:
        """The longest stored prefix of ``keys``, leaving at least one token to compute (the
        next-token logits come from it); None on a miss."""
        with self._lock:
            self.lookup_tokens += len(keys)
            best, best_n = None, 0
            for eid, entry in self._entries.items():
                n = common_prefix(entry.keys, keys)
                if n > best_n:
                    best, best_n = eid, n
            best_n = min(best_n, len(keys) - 1)
            if best is None or best_n <= 0:
                self.misses += 1
                return None
            self._entries.move_to_end(best)
            self.hits += 1
            self.reused_tokens += best_n
            return Past(self._entries[best].layers, best_n)

    def store(self, keys: np.ndarray, layers: list) -> None:
        size = sum(k.element_size() * k.nelement() + v.element_size() * v.nelement() for k, v in layers)
        with self._lock:
            if size > self.max_bytes:
                return
            for eid, entry in list(self._entries.items()):
                n = common_prefix(entry.keys, keys)
                if n == len(keys):  # already held by a longer (or equal) entry
                    self._entries.move_to_end(eid)
                    return
                if n == len(entry.keys):  # the new one extends it
                    self._drop(eid)
            self._entries[self._next] = _Entry(keys, layers, size)
            self._next += 1
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self.evictions += 1

    def _drop(self, eid: int) -> None:
        self._bytes -= self._entries.pop(eid).nbytes

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "reused_tokens": self.reused_tokens, "lookup_tokens": self.lookup_tokens,
                    "hit_rate": round(self.reused_tokens / self.lookup_tokens, 4) if self.lookup_tokens else 0.0,
                    "entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes}
