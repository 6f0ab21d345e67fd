"""The feature store: a folder (local or ``s3://``) of Parquet parts in the FEATURES schema.

Layout: ``<root>/features/part-<hash>.parquet``. A part appears only once written completely
(:func:`~pipelines.storage.write_parquet_atomic`), and its name is a hash of the encoder and the
ids it holds, so a retried Ray task rewrites the same file instead of adding a duplicate.
A crashed run therefore leaves only whole parts behind; the rerun skips the ids they hold
(per encoder name) and writes the rest. Anything under ``_tmp/`` is an unfinished write that
readers ignore.

Reading for training: ``FeatureStore(root_uri, storage).load(ids, encoder)`` gives float32
arrays, or read the folder with ``pyarrow.parquet.read_table`` and
:func:`mmm.schema.decode_tensor` each row.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmm.schema import FEATURES, check_columns, decode_tensor

from .storage import StorageConfig, join, read_parquet, write_parquet_atomic

FEATURES_DIR = "features"


def part_name(encoders: list[str], media_ids: list[str]) -> str:
    """Deterministic name for a part holding these rows (retries overwrite, never duplicate)."""
    digest = hashlib.sha256("\n".join(sorted(set(encoders)) + sorted(media_ids)).encode()).hexdigest()
    return f"part-{digest[:24]}.parquet"


class FeatureStore:
    def __init__(self, uri: str, storage: StorageConfig):
        """``uri`` is the features folder itself (``<root>/features``)."""
        self.uri = uri
        self.fs, self.path = storage.filesystem(uri)

    def write_part(self, table: pa.Table) -> str:
        """Commit one part atomically; returns its file name."""
        check_columns(table, FEATURES, "a feature part")
        table = table.select(FEATURES.names).cast(FEATURES)
        name = part_name(table["encoder"].to_pylist(), table["media_id"].to_pylist())
        write_parquet_atomic(self.fs, table, join(self.path, name))
        return name

    def index(self) -> pa.Table:
        """(media_id, modality, encoder) of every stored row; empty when the store is new."""
        cols = ["media_id", "modality", "encoder"]
        table = read_parquet(self.fs, self.path, columns=cols)
        if table is None:
            return pa.table({c: pa.array([], pa.string()) for c in cols})
        return table

    def ids(self, encoder: str) -> set[str]:
        """media_ids already stored for ``encoder`` (a rerun skips these)."""
        index = self.index()
        return set(index.filter(pc.equal(index["encoder"], encoder))["media_id"].to_pylist())

    def table(self, encoder: str | None = None) -> pa.Table:
        """Every row (duplicates from concurrent runs dropped), optionally for one encoder."""
        table = read_parquet(self.fs, self.path, schema=FEATURES)
        if table is None:
            return FEATURES.empty_table()
        if encoder is not None:
            table = table.filter(pc.equal(table["encoder"], encoder))
        keys = [f"{e}\x00{m}" for e, m in zip(table["encoder"].to_pylist(), table["media_id"].to_pylist())]
        first = sorted({k: i for i, k in reversed(list(enumerate(keys)))}.values())
        return table.take(pa.array(first, pa.int64()))

    def load(self, media_ids=None, encoder: str | None = None) -> dict[str, np.ndarray]:
        """media_id -> float32 array (frames, dim); all stored ids when ``media_ids`` is None."""
        table = self.table(encoder)
        if media_ids is not None:
            table = table.filter(pc.is_in(table["media_id"], pa.array(list(media_ids), pa.string())))
        out = {}
        for row in table.to_pylist():
            out[row["media_id"]] = decode_tensor(row["shape"], row["dtype"], row["data"])
        return out
