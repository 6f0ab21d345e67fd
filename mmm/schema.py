"""The Parquet schemas: the single source of truth for column names and types.

Every pipeline stage, job and test names columns through this module. Tables:

- ``media``: one row per media item and caption language (``media_id`` is the sha256 of its
  bytes; an item captioned in English and Malay has two rows, one per ``lang``).
- ``errors``: items that failed a stage, with the reason; the rest of a run is still written.
- ``features``: frozen-encoder outputs, half precision, keyed by ``media_id`` + ``encoder``.
- ``dialogues``: multi-turn conversations whose text marks media with empty
  ``<image></image>`` / ``<audio></audio>`` spans; ``media_ids`` lists the items in the order
  their spans appear.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .config import AUDIO, IMAGE, MODALITIES  # noqa: F401 (the values of every ``modality`` column)

KINDS = ("audio_instruction", "visual_context", "multi_image", "multi_audio", "image_audio")
LANGS = ("en", "ms")
SPLITS = ("train", "eval", "eval_ood")
"""eval_ood: the eval dialogues again, about twin media drawn outside the training ranges (offline generator)."""

MEDIA = pa.schema(
    [
        pa.field("media_id", pa.string(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("transcript", pa.string()),
        pa.field("lang", pa.string()),
        pa.field("num_bytes", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("duration_s", pa.float32()),
    ]
)

ERRORS = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("media_id", pa.string()),
    ]
)

FEATURES = pa.schema(
    [
        pa.field("media_id", pa.string(), nullable=False),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("encoder", pa.string(), nullable=False),
        pa.field("shape", pa.list_(pa.int32()), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("data", pa.binary(), nullable=False),
    ]
)

MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])

DIALOGUES = pa.schema(
    [
        pa.field("dialogue_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("lang", pa.string(), nullable=False),
        pa.field("media_ids", pa.list_(pa.string()), nullable=False),
        pa.field("messages", pa.list_(MESSAGE), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
)

FEATURE_DTYPE = "float16"
"""Features are stored in half precision: half the bytes, and the frozen encoders' outputs lose
nothing a projector can use (standardise them first if an encoder's variation is tiny)."""


def encode_tensor(array: np.ndarray) -> dict:
    """The ``shape`` / ``dtype`` / ``data`` columns for one feature tensor."""
    arr = np.ascontiguousarray(array, dtype=FEATURE_DTYPE)
    return {"shape": list(arr.shape), "dtype": FEATURE_DTYPE, "data": arr.tobytes()}


def decode_tensor(shape, dtype: str, data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_tensor`; returns float32 for compute."""
    return np.frombuffer(data, dtype=dtype).reshape(tuple(int(s) for s in shape)).astype(np.float32)


def check_columns(table_or_names, schema: pa.Schema, what: str) -> None:
    """Raise naming every column of ``schema`` that is missing."""
    names = table_or_names.column_names if hasattr(table_or_names, "column_names") else list(table_or_names)
    missing = [n for n in schema.names if n not in names]
    if missing:
        raise ValueError(f"{what} is missing columns {missing}; it has {sorted(names)}")
