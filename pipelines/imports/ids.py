"""Dialogue ids of one import, stable across reruns of the same file."""

from __future__ import annotations

import hashlib
import json


class DialogueIds:
    """``NAME-ID`` from a record's id, ``NAME-ID#2``, ``#3``... for later records with the same id
    (LLaVA's ids are image ids, and one image has several conversations), ``NAME-row0000007`` for a
    record without one. A record with the same turns and media as an earlier one is a duplicate."""

    def __init__(self, name: str):
        self.name, self.used, self.first_rows = name, set(), {}

    def duplicate_of(self, row: int, messages: list[dict], media_ids: list[str]) -> int | None:
        """The earlier row with these turns and media, else None (and this row is remembered)."""
        # a digest, not the text: the text of every dialogue would keep the whole import in memory
        key = hashlib.sha256(json.dumps([messages, media_ids], sort_keys=True).encode()).digest()
        first = self.first_rows.setdefault(key, row)
        return first if first != row else None

    def assign(self, record_id: str | None, row: int) -> str:
        base = f"{self.name}-{record_id}" if record_id is not None else f"{self.name}-row{row:07d}"
        did, n = base, 1
        while did in self.used:
            n += 1
            did = f"{base}#{n}"
        self.used.add(did)
        return did
