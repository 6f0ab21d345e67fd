"""Features: ingest -> frozen encoders (a batched actor pool) -> the Parquet feature store.

One streaming Ray Data pass::

    uris -> [ReadBytes -> Decode] -> EncodeMedia (actors, CPU or GPU) -> WriteFeatures -> results

The encoders are those of ``model``: a preset plus nested ``ModelConfig`` overrides, the same
shape as the training jobs' ``model`` section (:class:`FeatureModel`). A local checkpoint folder
or a hub name goes in ``model.overrides.<vision|audio>.pretrained``; local paths are made
absolute, so actors load the same folder wherever they run. The store keys features by encoder
name, a digest of the loaded checkpoint's config (mmm/encoders.py): a hub name and a local copy
of the same checkpoint find each other's features.

Decode runs on CPU actors and hands the encoders their input (resized uint8 pixels, 16 kHz
samples), so each file is decoded once and the encoder actors only normalise and run the towers.

The small per-item results (no bytes, no tensors) come back to the driver, which writes
``<out>/media.parquet`` (MEDIA) and ``<out>/errors.parquet`` (ERRORS); features go to
``<out>/features/`` part by part as they are computed (see :mod:`pipelines.store`), so a crash
loses at most the batches in flight and a rerun encodes only what is missing.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmm.config import ModelConfig
from mmm.media import MediaLimits
from mmm.schema import AUDIO, IMAGE, encode_tensor

from .ingest import ROW, Decode, ReadBytes, encoder_inputs, errors_table, media_table, read_source, unique_uris
from .runtime import Chain, PoolConfig, RayConfig, require, set_torch_threads
from .storage import StorageConfig, join, read_parquet, write_parquet_atomic
from .store import FEATURES_DIR, FeatureStore

# What EncodeMedia emits: the ingest row without its bytes or input, plus the feature columns.
ENCODED = pa.schema(
    [f for f in ROW if f.name not in ("bytes", "input", "input_shape")]
    + [
        ("status", pa.string()),
        ("encoder", pa.string()),
        ("shape", pa.list_(pa.int32())),
        ("dtype", pa.string()),
        ("data", pa.binary()),
    ]
)
RESULT = pa.schema([f for f in ENCODED if f.name != "data"] + [("part", pa.string())])


@dataclass
class FeatureModel:
    """Which frozen encoders make the features: ``model.preset=tiny`` plus overrides such as
    ``model.overrides.audio.pretrained=/ckpt/whisper-base`` (YAML: ``model: {preset: ..., overrides:
    {audio: {pretrained: ...}}}``)."""

    preset: str = "tiny"
    """Model preset (mmm.config.preset) whose frozen encoders make the features."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields over the preset, nested (``{"audio": {"pretrained": "/ckpt/whisper"}}``);
    checked when the job starts, so a misspelt field is an error that names it."""

    def __post_init__(self) -> None:
        from mmm.precision import check_bf16

        # fail at parse time, not in an actor
        check_bf16(self.config().encoders_bf16, "model.overrides.encoders_bf16")

    def config(self) -> ModelConfig:
        """The preset with the overrides; a ``pretrained`` that is an existing local path made absolute."""
        from mmm.config_io import model_config

        cfg = model_config(self.preset, self.overrides)
        for part in (cfg.vision, cfg.audio):
            if part.pretrained and os.path.exists(part.pretrained):
                part.pretrained = os.path.abspath(part.pretrained)
        return cfg


@dataclass
class FeaturesConfig:
    source: str = ""
    """A manifest (.parquet/.jsonl with uri + optional caption/transcript/lang), a folder or an s3:// prefix."""
    out: str = "outputs/data"
    """Root for media.parquet, errors.parquet and features/ (local path or s3://bucket/prefix)."""
    model: FeatureModel = field(default_factory=FeatureModel)
    """The encoders (a preset and overrides); their names key the store."""
    ingest: PoolConfig = field(default_factory=lambda: PoolConfig(concurrency=1, batch_size=64, num_cpus=0.25))
    """Read + hash + decode (+ resize images for the encoder), chained in one light CPU actor."""
    encode: PoolConfig = field(default_factory=lambda: PoolConfig(concurrency=2, batch_size=64, num_cpus=0.5))
    """The encoder pool: on a GPU cluster set num_gpus=1 and concurrency = number of GPUs."""
    write: PoolConfig = field(default_factory=lambda: PoolConfig(concurrency=1, batch_size=512, num_cpus=0.25))
    """batch_size here is rows per Parquet part: fewer, larger files than the encoder's batches."""
    limits: MediaLimits = field(default_factory=MediaLimits)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("features needs a source: a manifest, a folder or an s3:// prefix")


class EncodeMedia:
    """Frozen encoders, loaded once per actor; skips ids the store already holds for them."""

    NEEDS = ("uri", "modality", "media_id", "input", "input_shape", "error")

    def __init__(self, model: ModelConfig, store_uri: str, storage: StorageConfig, num_cpus: float):
        import torch

        from mmm.encoders import build_encoders
        from mmm.precision import resolve_bf16

        set_torch_threads(num_cpus)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        bf16 = resolve_bf16(model.encoders_bf16, device, "model.overrides.encoders_bf16")
        dtype = torch.bfloat16 if bf16 else torch.float32
        vision, audio = build_encoders(model)
        self.encoders = {IMAGE: vision.to(device, dtype), AUDIO: audio.to(device, dtype)}
        index = FeatureStore(store_uri, storage).index()
        self.done = {
            m: set(index.filter(pc.equal(index["encoder"], enc.name))["media_id"].to_pylist())
            for m, enc in self.encoders.items()
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        # Column-wise: a whole-batch to_pylist/from_pylist round trip costs more than encoding a
        # tiny image (docs/PERFORMANCE.md, "Feature store batches"), so only the small columns become lists.
        require(batch, self.NEEDS, type(self).__name__)
        n, errors = len(batch), batch["error"].to_pylist()
        out = {"status": ["error" if e is not None else None for e in errors], "stage": batch["stage"].to_pylist(),
               "error": errors, "encoder": [None] * n, "shape": [None] * n, "dtype": [None] * n, "data": [None] * n}
        modalities, ids = batch["modality"].to_pylist(), batch["media_id"].to_pylist()
        for modality, encoder in self.encoders.items():
            todo: dict[str, int] = {}
            for i in range(n):
                if out["status"][i] is None and modalities[i] == modality:
                    if ids[i] in self.done[modality] or ids[i] in todo:
                        out["status"][i] = "skipped"  # in the store, or twice in this batch
                    else:
                        todo[ids[i]] = i
            self._encode(encoder, modality, batch, list(todo.values()), out)
            self.done[modality].update(ids[i] for i in todo.values() if out["status"][i] == "encoded")
        table = batch.drop_columns([c for c in out if c in batch.column_names])  # select() drops the rest
        for name, values in out.items():
            table = table.append_column(ENCODED.field(name), pa.array(values, ENCODED.field(name).type))
        return table.select(ENCODED.names).cast(ENCODED)

    def _encode(self, encoder, modality: str, batch: pa.Table, rows: list[int], out: dict) -> None:
        if not rows:
            return
        inputs = encoder_inputs(batch, rows, modality)
        run = encoder.encode_pixels if modality == IMAGE else encoder.encode
        try:
            feats = run(inputs)
        except Exception:  # isolate the item that breaks the batch; the others still get encoded
            feats = [self._encode_one(run, inputs[k : k + 1], i, out) for k, i in enumerate(rows)]
        for i, feat in zip(rows, feats):
            if feat is None:
                continue
            tensor = encode_tensor(feat.numpy())
            out["shape"][i], out["dtype"][i], out["data"][i] = tensor["shape"], tensor["dtype"], tensor["data"]
            out["encoder"][i], out["status"][i] = encoder.name, "encoded"

    @staticmethod
    def _encode_one(run, one_input, i: int, out: dict):
        try:
            return run(one_input)[0]
        except Exception as e:
            out["status"][i], out["stage"][i], out["error"][i] = "error", "encode", f"{type(e).__name__}: {e}"
            return None


class WriteFeatures:
    """Commit the batch's new features as one Parquet part; pass the small results on."""

    NEEDS = ("media_id", "modality", "encoder", "shape", "dtype", "data", "status")

    def __init__(self, store_uri: str, storage: StorageConfig):
        self.store = FeatureStore(store_uri, storage)

    def __call__(self, batch: pa.Table) -> pa.Table:
        require(batch, self.NEEDS, type(self).__name__)
        new = batch.filter(pc.equal(batch["status"], "encoded"))
        part = self.store.write_part(new) if len(new) else None
        parts = pa.array([part if s == "encoded" else None for s in batch["status"].to_pylist()], pa.string())
        return batch.drop_columns(["data"]).append_column("part", parts).cast(RESULT)


def build_pipeline(cfg: FeaturesConfig, uris: pa.Table, model: ModelConfig):
    """The Ray Data dataset for one features run (lazy until consumed)."""
    import ray

    store_uri = join(cfg.out, FEATURES_DIR)
    # Small inputs are cut finer, so every encoder actor gets a share of a short run.
    step = max(1, min(cfg.ingest.batch_size, -(-len(uris) // (2 * cfg.encode.concurrency))))
    blocks = [uris.slice(i, step) for i in range(0, len(uris), step)] or [uris]
    common = {"batch_format": "pyarrow", "zero_copy_batch": True}
    ds = ray.data.from_arrow(blocks)
    ingest = [(ReadBytes, {"storage": cfg.storage, "limits": cfg.limits}), (Decode, {"limits": cfg.limits, "model": model})]
    ds = ds.map_batches(Chain, fn_constructor_kwargs={"stages": ingest}, **common, **cfg.ingest.options())
    encode_kwargs = dict(model=model, store_uri=store_uri, storage=cfg.storage, num_cpus=cfg.encode.num_cpus)
    ds = ds.map_batches(EncodeMedia, fn_constructor_kwargs=encode_kwargs, **common, **cfg.encode.options())
    write_kwargs = {"store_uri": store_uri, "storage": cfg.storage}
    return ds.map_batches(WriteFeatures, fn_constructor_kwargs=write_kwargs, **common, **cfg.write.options())


def run_features(cfg: FeaturesConfig) -> dict:
    """Ingest + encode ``cfg.source`` into ``cfg.out``; returns the run's summary."""
    start = time.time()
    source = read_source(cfg.source, cfg.storage)
    uris = unique_uris(source)
    ds = build_pipeline(cfg, uris, cfg.model.config())
    parts = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    results = pa.concat_tables(parts) if parts else RESULT.empty_table()
    fs, root = cfg.storage.filesystem(cfg.out)
    media, errors = media_table(results, source), errors_table(results)
    done = uris["uri"].combine_chunks()
    for name, rows in (("media.parquet", media), ("errors.parquet", errors)):
        path = join(root, name)
        write_parquet_atomic(fs, beside_earlier(fs, path, rows, done), path)
    return summarize(results, media, errors, time.time() - start)


def beside_earlier(fs, path: str, rows: pa.Table, uris: pa.Array) -> pa.Table:
    """``rows`` with the rows an earlier run wrote to ``path`` about other uris: runs over other
    sources into the same root add up, and a rerun over the same source replaces its own rows."""
    earlier = read_parquet(fs, path)
    if earlier is None:
        return rows
    kept = earlier.filter(pc.invert(pc.is_in(earlier["uri"], value_set=uris)))
    return pa.concat_tables([kept.select(rows.column_names).cast(rows.schema), rows])


def summarize(results: pa.Table, media: pa.Table, errors: pa.Table, seconds: float) -> dict:
    status = results["status"].to_pylist()
    encoded = [(m, s) for m, s in zip(results["modality"].to_pylist(), status) if s == "encoded"]
    shapes = {}
    for m, shape, s in zip(results["modality"].to_pylist(), results["shape"].to_pylist(), status):
        if s == "encoded":
            shapes.setdefault(m, []).append(shape[0])
    return {
        "items": len(results),
        "media_rows": len(media),
        "errors": len(errors),
        "errors_by_stage": dict(Counter(errors["stage"].to_pylist())),
        "encoded": {m: sum(1 for e, _ in encoded if e == m) for m in (IMAGE, AUDIO)},
        "skipped": status.count("skipped"),
        "frames_per_item": {m: round(float(np.mean(v)), 1) for m, v in shapes.items()},
        "parts_written": len({p for p in results["part"].to_pylist() if p}),
        "seconds": round(seconds, 1),
        "items_per_s": round(len(results) / max(seconds, 1e-9), 1),
    }
