"""A reader for CTranslate2's ``model.bin`` (binary format version 6), numpy only.

The layout, all little-endian: ``u32`` format version, a string (the spec's name, e.g.
``WhisperSpec``), ``u32`` spec revision, ``u32`` variable count, then per variable a string name,
``u8`` rank, ``u32`` per dimension, ``u8`` dtype id, ``u32`` byte count and the raw bytes; last a
``u32`` alias count and (alias, target) string pairs. A string is ``u16`` length (with the
terminating NUL) + UTF-8 bytes + NUL. Reading it here keeps the ctranslate2 package (and its
native library) out of the dependencies.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

SUPPORTED_VERSION = 6
# CTranslate2's DataType enum, in order: FLOAT32, INT8, INT16, INT32, FLOAT16, BFLOAT16.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BFLOAT16 = 5


class CT2FormatError(ValueError):
    """The bytes are not a CTranslate2 model this reader understands."""


@dataclass
class CT2Model:
    spec: str
    """The model spec's name (``WhisperSpec`` for Whisper)."""
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]
    """Variables stored once under another name (e.g. the output projection tied to the embeddings)."""

    def get(self, name: str) -> np.ndarray:
        return self.variables[self.aliases.get(name, name)]


class _Cursor:
    def __init__(self, buf: bytes | memoryview):
        self.buf, self.at = memoryview(buf), 0

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.at + size > len(self.buf):
            raise CT2FormatError(f"truncated CTranslate2 model: needs {size} bytes at offset {self.at}, has {len(self.buf) - self.at}")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.at)
        self.at += size
        return value

    def raw(self, n: int) -> memoryview:
        if self.at + n > len(self.buf):
            raise CT2FormatError(f"truncated CTranslate2 model: a variable needs {n} bytes at offset {self.at}")
        out = self.buf[self.at : self.at + n]
        self.at += n
        return out

    def string(self) -> str:
        n = self.take("H")
        return bytes(self.raw(n))[:-1].decode("utf-8")


def _variable(cur: _Cursor) -> tuple[str, np.ndarray]:
    name = cur.string()
    shape = tuple(cur.take("I") for _ in range(cur.take("B")))
    dtype_id, nbytes = cur.take("B"), cur.take("I")
    data = cur.raw(nbytes)
    if dtype_id == _BFLOAT16:  # numpy has no bfloat16: widen the 16 bits into float32's high half
        array = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif dtype_id in _DTYPES:
        array = np.frombuffer(data, _DTYPES[dtype_id])
    else:
        raise CT2FormatError(f"variable {name!r} has unknown dtype id {dtype_id}")
    if array.size != int(np.prod(shape, dtype=np.int64)):
        raise CT2FormatError(f"variable {name!r}: {array.size} values for shape {shape}")
    return name, array.reshape(shape)


def parse(buf: bytes | memoryview) -> CT2Model:
    """Parse a whole ``model.bin``; arrays are read-only views into ``buf`` (copy what you keep)."""
    cur = _Cursor(buf)
    version = cur.take("I")
    if version != SUPPORTED_VERSION:
        raise CT2FormatError(f"CTranslate2 binary format version {version}; this reader supports {SUPPORTED_VERSION}")
    spec, revision = cur.string(), cur.take("I")
    variables = dict(_variable(cur) for _ in range(cur.take("I")))
    aliases = {}
    for _ in range(cur.take("I")):
        alias = cur.string()
        aliases[alias] = cur.string()
    if cur.at != len(cur.buf):
        raise CT2FormatError(f"{len(cur.buf) - cur.at} trailing bytes after the CTranslate2 model")
    return CT2Model(spec=spec, revision=revision, variables=variables, aliases=aliases)
