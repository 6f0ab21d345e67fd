"""A bounded LRU store of prompts' KV caches, so a request reuses the longest prefix already
computed, within a batch's lifetime and across requests.

The OpenAI API is stateless: every turn of a conversation re-sends the whole history, and without
this each turn re-runs the prefill of everything before it. An entry is one computed sequence (a
prompt, or a prompt and its reply) with its per-layer KV. A lookup returns the longest common
prefix of the request's *keys* and an entry's, found through an index of 16-key blocks (so its cost
does not grow with the number of entries) and checked key by key: a key is the token id, except inside a
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


BLOCK = 16
"""Keys per indexed block: a lookup hashes a prompt's full blocks and compares it only with entries
that share its deepest one, so its cost does not grow with the number of entries."""
CANDIDATES = 32
"""The newest entries sharing a prompt's deepest block that a lookup compares it with, key by key."""


def block_chain(keys: np.ndarray) -> list:
    """Index keys of ``keys``' prefixes: element 0 names its first key, element i the first i full
    blocks (a chained hash; every match it suggests is checked key by key)."""
    chain = [("first", int(keys[0]))] if len(keys) else []
    data, width = keys.tobytes(), BLOCK * keys.itemsize
    for i in range(len(keys) // BLOCK):
        chain.append(hash((chain[-1], data[i * width : (i + 1) * width])))
    return chain


@dataclass
class _Entry:
    keys: np.ndarray
    layers: list
    nbytes: int
    chain: list


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"prefix cache max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._holding: dict = {}
        """Chain element -> ids of the entries whose keys have that prefix (insertion-ordered)."""
        self._ending: dict = {}
        """Chain element -> ids of the entries whose last chain element it is."""
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
        chain = block_chain(keys)
        with self._lock:
            self.lookup_tokens += len(keys)
            best, best_n = self._longest(keys, chain)
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
        chain = block_chain(keys)
        with self._lock:
            if size > self.max_bytes or not chain:
                return
            held, n = self._longest(keys, chain)
            if held is not None and n == len(keys):  # already held by a longer (or equal) entry
                self._entries.move_to_end(held)
                return
            for element in chain:  # entries the new one extends
                for eid in _newest(self._ending.get(element, {})):
                    if common_prefix(self._entries[eid].keys, keys) == len(self._entries[eid].keys):
                        self._drop(eid)
            eid, self._next = self._next, self._next + 1
            self._entries[eid] = _Entry(keys, layers, size, chain)
            for element in chain:
                self._holding.setdefault(element, {})[eid] = None
            self._ending.setdefault(chain[-1], {})[eid] = None
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self.evictions += 1

    def _longest(self, keys: np.ndarray, chain: list) -> tuple[int | None, int]:
        """(entry id, common prefix length) of the best match among the newest entries that share
        ``keys``' deepest indexed prefix; (None, 0) when none shares its first key."""
        depth = 0
        while depth < len(chain) and chain[depth] in self._holding:
            depth += 1
        if depth == 0:
            return None, 0
        best, best_n = None, 0
        for eid in _newest(self._holding[chain[depth - 1]]):
            n = common_prefix(self._entries[eid].keys, keys)
            if n > best_n:
                best, best_n = eid, n
        return best, best_n

    def _drop(self, eid: int) -> None:
        entry = self._entries.pop(eid)
        self._bytes -= entry.nbytes
        for element in entry.chain:
            _discard(self._holding, element, eid)
        _discard(self._ending, entry.chain[-1], eid)

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "reused_tokens": self.reused_tokens, "lookup_tokens": self.lookup_tokens,
                    "hit_rate": round(self.reused_tokens / self.lookup_tokens, 4) if self.lookup_tokens else 0.0,
                    "entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes}


def _newest(ids: dict) -> list[int]:
    """The last CANDIDATES ids of an insertion-ordered id set, newest first."""
    out = []
    for eid in reversed(ids):
        out.append(eid)
        if len(out) == CANDIDATES:
            break
    return out


def _discard(index: dict, element, eid: int) -> None:
    ids = index[element]
    del ids[eid]
    if not ids:
        del index[element]
