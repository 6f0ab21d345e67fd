"""Ingest: a folder, an ``s3://`` prefix or a manifest -> bytes -> validated media rows or errors.

Sources (:func:`read_source`):

- a manifest, ``*.parquet``, ``*.jsonl`` or ``*.json`` (JSON Lines or a JSON array of objects):
  a ``uri`` column plus optional ``caption``, ``transcript``, ``lang`` and ``modality``; a uri may
  appear once per language (bilingual captions); relative uris are resolved against the
  manifest's folder, so a synthesized root can be copied anywhere, local or S3; ``~`` and
  ``file://`` uris are local paths;
- anything else is a folder or prefix: every visible file under it, with no text.

Stages (Ray Data, one class each): :class:`ReadBytes` (uri -> bytes, ``media_id`` = sha256) and
:class:`Decode` (full decode with :mod:`mmm.media`, which is the validation; size, duration, the
reason on failure; and the encoder's input, so nothing is decoded twice). Rows that fail keep
flowing with ``error`` and ``stage`` set, so one pass yields the media table, the errors table
and (after :mod:`pipelines.features`) the features.
"""

from __future__ import annotations

import codecs
import json
import os
import posixpath
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmm import pixels
from mmm.config import SAMPLE_RATE, ModelConfig
from mmm.media import MiB, MediaError, MediaLimits, decode_audio, decode_image, media_id, sniff_modality
from mmm.schema import AUDIO, ERRORS, IMAGE, LANGS, MEDIA

from .runtime import require
from .storage import StorageConfig, is_remote, join, list_files, local_path, uri_of

TEXT_COLUMNS = ("caption", "transcript", "lang")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
AUDIO_EXT = (".wav", ".mp3", ".flac", ".ogg")

# The row that flows through ingest and features: what decoding learned, or why it failed.
ROW = pa.schema(
    [
        ("uri", pa.string()),
        ("modality", pa.string()),
        ("media_id", pa.string()),
        ("bytes", pa.binary()),
        ("num_bytes", pa.int64()),
        # After Decode: the encoder's input as raw array bytes (images: uint8 (H, W, 3) already
        # resized for the vision encoder; audio: float32 16 kHz mono samples), and its shape.
        ("input", pa.binary()),
        ("input_shape", pa.list_(pa.int32())),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("duration_s", pa.float32()),
        ("error", pa.string()),
        ("stage", pa.string()),
    ]
)


def read_source(source: str, storage: StorageConfig) -> pa.Table:
    """Rows of ``uri, modality, caption, transcript, lang`` for a manifest, folder or prefix."""
    fs, path = storage.filesystem(source)
    if path.endswith((".parquet", ".jsonl", ".json")):
        table = _read_manifest(fs, path)
        base = uri_of(fs, posixpath.dirname(path), source)
        uris = [_resolve(u, base) if u else f"{NO_URI}{source}#{i}" for i, u in enumerate(table["uri"].to_pylist())]
        table = table.set_column(table.column_names.index("uri"), "uri", pa.array(uris, pa.string()))
    else:
        if not fs.isdir(path):
            raise FileNotFoundError(f"source {source!r} is neither a manifest (.parquet/.jsonl) nor a folder")
        table = pa.table({"uri": [uri_of(fs, p, source) for p in list_files(fs, path)]})
    for name in ("modality",) + TEXT_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(len(table), pa.string()))
    table = table.select(["uri", "modality", *TEXT_COLUMNS]).cast(
        pa.schema([(n, pa.string()) for n in ("uri", "modality", *TEXT_COLUMNS)])
    )
    return table.set_column(table.column_names.index("lang"), "lang", pa.array(languages(table["lang"].to_pylist(), source), pa.string()))


LANG_ALIASES = {"eng": "en", "english": "en", "msa": "ms", "may": "ms", "zsm": "ms", "malay": "ms", "melayu": "ms"}
"""ISO 639-2/3 codes and names of the two languages, as other datasets write them."""


def lang_code(value: str) -> str:
    """A language tag as MMM's code where it names English or Malay ("ms-MY", "EN_us", "zsm"), else
    its lower-cased primary subtag."""
    primary = re.split(r"[-_]", value.strip().lower())[0]
    return LANG_ALIASES.get(primary, primary)


def languages(values: list[str | None], source: str) -> list[str | None]:
    """A manifest's ``lang`` values as MMM's codes: BCP 47 tags by their primary subtag, any case
    ("ms-MY", "EN_us" -> "ms", "en"), and the aliases above. Another language stops the job before
    any work, naming it: its captions would otherwise train under English prompts."""
    out, unknown = [], {}
    for i, value in enumerate(values):
        if value is None or not value.strip():
            out.append(None)
            continue
        code = lang_code(value)
        if code not in LANGS:
            unknown.setdefault(value, i)
        out.append(code)
    if unknown:
        named = ", ".join(f"{v!r} (row {i + 1})" for v, i in list(unknown.items())[:5])
        raise ValueError(f"{source}: lang {named} is not one of {list(LANGS)} (BCP 47 tags such as ms-MY are read "
                         "by their language); drop those rows or give them one of these")
    return out


NO_URI = "no-uri:"
"""The uri given to a manifest row that has none (``no-uri:<manifest>#<row>``): it becomes an error row."""


def _resolve(uri: str, base: str) -> str:
    """A manifest's uri: remote uris and absolute paths as they are, ``~`` and ``file://`` as local
    paths, anything else relative to the manifest's folder ``base``."""
    path = local_path(uri)
    return path if is_remote(path) or path.startswith("/") else join(base, path)


def _read_manifest(fs, path: str) -> pa.Table:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path, filesystem=fs)
    else:
        with fs.open(path, "rb") as f:
            table = _json_manifest(f.read(), path)
    require(table, ("uri",), f"manifest {path}")
    return table


def _json_manifest(data: bytes, path: str) -> pa.Table:
    """A JSON array of objects (what ``json.dump(rows)`` writes) or JSON Lines, one object a line."""
    from pyarrow import json as pajson

    expected = "a JSON array of objects or JSON Lines (one object a line), UTF-8"
    body = data.removeprefix(codecs.BOM_UTF8)
    try:
        if not re.match(rb"\s*\[", body):
            return pajson.read_json(pa.BufferReader(body))
        rows = json.loads(body)
        if not all(isinstance(r, dict) for r in rows):
            raise ValueError("an item of the array is not an object")
        return pa.Table.from_pylist(rows)
    except (ValueError, pa.ArrowException) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"manifest {path} is not {expected}: {e}") from None


def unique_uris(source: pa.Table) -> pa.Table:
    """One row per uri (a bilingual manifest lists a file once per language): read it once."""
    grouped = source.group_by("uri", use_threads=False).aggregate([("modality", "max")])
    return grouped.rename_columns(["uri", "modality"]).sort_by("uri")


class ReadBytes:
    """uri -> ``bytes`` and ``media_id`` (sha256); an unreadable uri becomes an error row."""

    NEEDS = ("uri", "modality")

    def __init__(self, storage: StorageConfig, limits: MediaLimits = MediaLimits()):
        self.storage = storage
        # a file larger than any item may be is refused from its size, before it is read into memory
        self.max_bytes = max(limits.max_image_bytes, limits.max_audio_bytes)
        self.filesystems: dict[bool, tuple] = {}

    def _filesystem(self, uri: str):
        remote = uri.startswith("s3://")
        if remote not in self.filesystems:
            self.filesystems[remote] = self.storage.filesystem(uri)[0]
        return self.filesystems[remote]

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Column-wise, as Decode and EncodeMedia: no per-row dicts.
        require(batch, self.NEEDS, type(self).__name__)
        uris = batch["uri"].to_pylist()
        got = self._read_all(uris)
        data = [g if isinstance(g, bytes) else None for g in got]
        errors = [None if isinstance(g, bytes) else f"cannot read: {type(g).__name__}: {g}" for g in got]
        cols = {
            "uri": uris, "modality": batch["modality"].to_pylist(), "bytes": data, "error": errors,
            "media_id": [media_id(d) if d is not None else None for d in data],
            "num_bytes": [len(d) if d is not None else None for d in data],
            "stage": ["read" if e is not None else None for e in errors],
        }
        return _row_table(cols, len(uris))

    def _read_all(self, uris: list[str]) -> list[bytes | Exception]:
        """Each uri's bytes, or why it could not be read (missing file, permissions, network: the
        run goes on). Local files are opened one by one; remote ones are fetched together, a single
        ranged GET each, which s3fs sends concurrently, so a batch waits out S3's round trip about
        once instead of twice an item (docs/DATA.md, "Reading from S3")."""
        got: list[bytes | Exception | None] = [None] * len(uris)
        remote: dict[bool, list[int]] = {}
        for i, uri in enumerate(uris):
            if uri.startswith(NO_URI):
                got[i] = ValueError("the manifest row has no uri")
            elif "://" in uri:
                remote.setdefault(uri.startswith("s3://"), []).append(i)
            else:
                got[i] = _or_error(self._read_local, uri)
        for rows in remote.values():
            for i, g in zip(rows, self._read_remote([uris[i] for i in rows])):
                got[i] = g
        return got

    def _read_local(self, uri: str) -> bytes:
        # plain open, without fsspec's per-call overhead
        self._check_size(os.path.getsize(uri))
        with open(uri, "rb") as f:
            return f.read()

    def _read_remote(self, uris: list[str]) -> list[bytes | Exception]:
        """One ranged read of ``max_bytes + 1`` per object: a longer answer means a file too large,
        found without reading the rest. An object the ranged read failed on (an empty one cannot
        be addressed by a range) is read again the plain way, for an error that says what it is."""
        fs = self._filesystem(uris[0])
        paths = [_path(u) for u in uris]
        got = fs.cat_ranges(paths, [0] * len(paths), [self.max_bytes + 1] * len(paths), on_error="return")
        out: list[bytes | Exception] = []
        for path, g in zip(paths, got):
            if isinstance(g, bytes) and len(g) > self.max_bytes:
                g = ValueError(f"more than {self.max_bytes / MiB:g} MiB, larger than any media item may be")
            elif isinstance(g, Exception) and not isinstance(g, FileNotFoundError):
                g = _or_error(self._read_whole, fs, path)
            out.append(g)
        return out

    def _read_whole(self, fs, path: str) -> bytes:
        self._check_size(fs.size(path))
        return fs.cat_file(path)

    def _check_size(self, size: int | None) -> None:
        if size is not None and size > self.max_bytes:
            raise ValueError(f"{size / MiB:.1f} MiB is larger than any media item may be ({self.max_bytes / MiB:.0f} MiB)")


def _or_error(read, *args) -> bytes | Exception:
    try:
        return read(*args)
    except Exception as e:  # noqa: BLE001 -- the item becomes an error row, the run goes on
        return e


def _row_table(cols: dict[str, list], n: int, rest: pa.Table | None = None) -> pa.Table:
    """A ROW table of ``n`` rows: the columns in ``cols``, else ``rest``'s, else nulls."""
    arrays = []
    for f in ROW:
        if f.name in cols:
            arrays.append(pa.array(cols[f.name], f.type))
        elif rest is not None and f.name in rest.column_names:
            arrays.append(rest[f.name].cast(f.type))
        else:
            arrays.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=ROW)


def _path(uri: str) -> str:
    return uri[len("s3://") :] if uri.startswith("s3://") else uri


def guess_modality(uri: str, data: bytes, hint: str | None) -> str | None:
    """The manifest's word, else the extension, else the magic bytes."""
    if hint in (IMAGE, AUDIO):
        return hint
    lower = uri.lower()
    if lower.endswith(IMAGE_EXT):
        return IMAGE
    if lower.endswith(AUDIO_EXT):
        return AUDIO
    return sniff_modality(data)


class Decode:
    """Decode every item fully (the validation: what the encoders will see); record size/duration
    or the reason; hand on the encoder's input in place of the file's bytes.

    Decoding once here, on a CPU stage, and sending the encoder its input is the batch-inference
    shape a GPU cluster wants: the encoder actors only normalise and run the tower, and images
    travel already resized (a 12-megapixel photo becomes SigLIP's 384 x 384 x 3 bytes)."""

    NEEDS = ("uri", "modality", "bytes", "error")

    def __init__(self, limits: MediaLimits, model: ModelConfig | None):
        """``model`` None: validate only, hand on no encoder input (dialogue import checks media so,
        without the image processor, which loads transformers and torch in every actor)."""
        self.limits = limits
        self.processor = None
        if model is not None:
            from mmm.encoders import image_processor

            self.processor = image_processor(model.vision)

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Column-wise, so the bytes are never copied into Python rows and back (see EncodeMedia).
        require(batch, self.NEEDS, type(self).__name__)
        n = len(batch)
        cols = {c: batch[c].to_pylist() if c in batch.column_names else [None] * n
                for c in ("uri", "modality", "error", "stage", "width", "height", "duration_s")}
        cols["input"], cols["input_shape"] = [None] * n, [None] * n
        data = batch["bytes"]
        for i, uri in enumerate(cols["uri"]):
            if cols["error"][i] is None:
                self._decode(cols, i, uri, data[i].as_py())
        cols["bytes"] = [None] * n  # the input replaces them: no file travels on to the encoders
        return _row_table(cols, n, batch)

    def _decode(self, cols: dict, i: int, uri: str, data: bytes) -> None:
        """Decode item ``i``, filling its columns, or record why it failed."""
        modality = guess_modality(uri, data, cols["modality"][i])
        cols["modality"][i] = modality
        try:
            if modality == IMAGE:
                image = decode_image(data, self.limits, uri)
                cols["width"][i], cols["height"][i] = image.size
                value = pixels.resize_one(self.processor, image) if self.processor else None
            elif modality == AUDIO:
                value = decode_audio(data, self.limits, uri)
                cols["duration_s"][i] = len(value) / SAMPLE_RATE
            else:
                raise MediaError(uri, "unknown media type (not an image or audio format we decode)")
        except MediaError as e:
            cols["error"][i], cols["stage"][i] = e.reason, "decode"
            return
        if self.processor:
            cols["input"][i], cols["input_shape"][i] = value.tobytes(), list(value.shape)


def encoder_inputs(batch: pa.Table, rows: list[int], modality: str):
    """Decode's ``input`` of ``rows``: a (B, H, W, 3) uint8 array for images, else a list of waves."""
    data, shapes = batch["input"], batch["input_shape"]
    dtype = np.uint8 if modality == IMAGE else np.float32
    arrays = [np.frombuffer(data[i].as_py(), dtype).reshape(shapes[i].as_py()) for i in rows]
    return np.stack(arrays) if modality == IMAGE else arrays


def media_table(results: pa.Table, source: pa.Table) -> pa.Table:
    """MEDIA rows: every decoded item once per caption language of its uri."""
    ok = results.filter(pc.is_null(results["error"])).select(
        ["uri", "media_id", "modality", "num_bytes", "width", "height", "duration_s"]
    )
    texts = source.select(["uri", *TEXT_COLUMNS])
    joined = ok.join(texts, keys="uri", join_type="left outer")
    table = joined.select(MEDIA.names).cast(MEDIA)
    return table.sort_by([("media_id", "ascending"), ("uri", "ascending"), ("lang", "ascending")])


def errors_table(results: pa.Table) -> pa.Table:
    """ERRORS rows: uri, stage, reason (and media_id when the bytes were read)."""
    bad = results.filter(pc.is_valid(results["error"]))
    table = pa.table(
        {"uri": bad["uri"], "stage": bad["stage"], "reason": bad["error"], "media_id": bad["media_id"]}
    )
    return table.cast(ERRORS).sort_by("uri")
