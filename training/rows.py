"""Training rows: dialogues joined with their frozen-encoder features AT READ TIME.

    ds = train_dataset(cfg)                       # driver: a Ray Dataset of dialogue rows (no tensors)
    batches = packed_batches(model, cfg, rows)    # worker: rows -> features -> render -> collate_packed

The driver reads the split's dialogues (or, for stage 1, the media table's caption/transcript pairs
as one-turn dialogues), shuffles them whole, and Ray Data splits them between the workers. Each
worker loads once the features its split needs into an in-memory ``media_id -> tensor`` index
(fp16, as stored; the projector's FeatureNorm standardises in fp32) and renders every row with
``model.render(messages, features)``.

Why a join at read time and not a materialized "assembled" table: the dialogues reuse media
(stage 2's 18 000 train dialogues of the demo data use 2 700 train media, 1.8 items per dialogue,
so each item ~12 times), and a table with the tensors copied into every row costs that factor in
bytes, must be rewritten whenever either side changes, and streams those bytes every epoch.
Measured on the demo data (``join_cost``; jobs/synthesize.py + jobs/features.py defaults, tiny
preset, fp16 features: 16 x 64 per image, ~75 x 64 per clip):

    stage 2   per-worker index (2 700 train media)    12.4 MB, loaded once per worker in ~0.5 s
              materialized rows (18 000 dialogues)   189.7 MB  (15.3x the index)
              dialogue rows streamed (text only)       7.1 MB per epoch
    stage 1   index 12.4 MB vs materialized 24.8 MB (5 400 caption rows: each item in 2 languages)

So each worker holds 15x fewer feature bytes than one assembled copy, nothing is rewritten when
features or dialogues change, and an epoch streams only text. The price: every worker holds the
index of the whole train split in memory -- fine up to a few GB of features; beyond that, shard
the index by media_id (workers then read only their shard's features) or materialize.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from training.config import TrainConfig
from mmm.packing import pack_stream
from mmm.schema import AUDIO, DIALOGUES, IMAGE, check_columns

log = logging.getLogger(__name__)

ROW_COLUMNS = ("dialogue_id", "kind", "lang", "media_ids", "messages")
"""What a training row carries (a DIALOGUES subset); stage 1's caption pairs are shaped the same."""


# ---- driver side: the rows ------------------------------------------------------------------


def _storage(cfg: TrainConfig):
    from pipelines.storage import StorageConfig

    return StorageConfig(endpoint_url=cfg.run.s3_endpoint)


def caption_rows(media: pa.Table) -> list[dict]:
    """Stage 1: the media table's caption/transcript pairs as one-turn dialogue rows."""
    from pipelines.captions import caption_pairs

    return [
        {"dialogue_id": f"caption-{i}", "kind": p["modality"], "lang": p["lang"], "media_ids": [p["media_id"]],
         "messages": p["messages"]}
        for i, p in enumerate(caption_pairs(media))
    ]


def read_media(cfg: TrainConfig) -> pa.Table:
    return _read_table(
        cfg, cfg.data.media, "stage 1 reads caption/transcript pairs from the media table: set data.media=ROOT/media.parquet",
        f"data.media {cfg.data.media} does not exist (run jobs/features.py first)")


def read_dialogues(cfg: TrainConfig, split: str, columns: list[str] | None = None) -> pa.Table:
    """The dialogue rows of one split, read on the driver (eval and the index's id list)."""
    table = _read_table(cfg, cfg.data.dialogues, "set data.dialogues=ROOT/dialogues (jobs/synthesize.py writes it)",
                        f"data.dialogues {cfg.data.dialogues} has no Parquet files")
    check_columns(table, DIALOGUES, cfg.data.dialogues)
    table = table.filter(pc.equal(table["split"], split))
    return table if columns is None else table.select(columns)


def _read_table(cfg: TrainConfig, uri: str | None, unset: str, missing: str) -> pa.Table:
    """A whole Parquet table (local or s3://), or an error saying which setting is unset or empty."""
    from pipelines.storage import read_parquet

    if not uri:
        raise ValueError(unset)
    fs, path = _storage(cfg).filesystem(uri)
    table = read_parquet(fs, path)
    if table is None:
        raise FileNotFoundError(missing)
    return table


def train_rows(cfg: TrainConfig) -> pa.Table:
    """Every training row of the stage as one table (small: text only, no tensors), shuffled over
    the whole split with ``train.seed``. Files arrive in name order and a user's own data is often
    sorted (an import keeps its source's order, a LLaVA mix is concatenated by source), and a
    worker's local shuffle buffer only reorders a few hundred neighbouring rows."""
    rng = np.random.default_rng(cfg.train.seed)
    if cfg.stage == "pretrain":
        # an item's caption or transcript in each language stay side by side, so the steps that align
        # its features do so with both languages' text (docs/DATA.md, "Training order")
        rows = pa.Table.from_pylist(stage1_pairs(cfg, "stage 1 trains on them"))
        return rows.take(permutation_of_groups(pc.list_element(rows["media_ids"], 0), rng))
    rows = read_dialogues(cfg, cfg.data.split).select(list(ROW_COLUMNS))
    if cfg.data.replay > 0:
        rows = pa.concat_tables([rows, replayed_pairs(rows, cfg, rng)])
    return rows.take(rng.permutation(rows.num_rows))


def permutation_of_groups(keys: pa.Array, rng: np.random.Generator) -> np.ndarray:
    """Row indices in a random order of the distinct ``keys``, the rows of one key together."""
    _, group = np.unique(keys.to_numpy(zero_copy_only=False), return_inverse=True)
    rank = rng.permutation(group.max() + 1 if len(group) else 0)
    return np.argsort(rank[group], kind="stable")


def stage1_pairs(cfg: TrainConfig, needed_because: str) -> list[dict]:
    pairs = caption_rows(read_media(cfg))
    if not pairs:
        raise ValueError(f"{cfg.data.media} has no caption or transcript, and {needed_because}")
    return pairs


def replayed_pairs(dialogues: pa.Table, cfg: TrainConfig, rng: np.random.Generator) -> pa.Table:
    """``data.replay`` x as many stage-1 pairs as ``dialogues``, drawn without replacement."""
    pairs = stage1_pairs(cfg, f"data.replay={cfg.data.replay} replays them")
    wanted = round(cfg.data.replay * dialogues.num_rows)
    count = min(len(pairs), wanted)
    if count < wanted:
        log.warning("data.replay=%s asks for %d stage-1 pairs, the data has %d: all of them are replayed (%.2f a dialogue)",
                    cfg.data.replay, wanted, count, count / dialogues.num_rows)
    return pa.Table.from_pylist([pairs[i] for i in rng.choice(len(pairs), count, replace=False)], schema=dialogues.schema)


def train_dataset(cfg: TrainConfig):
    """The Ray Dataset handed to ``fit``: the shuffled rows of :func:`train_rows`, split between the
    workers by Ray Train. The driver reads them whole anyway, to check their media have features."""
    import ray

    return ray.data.from_arrow(train_rows(cfg))


# ---- worker side: the feature index ---------------------------------------------------------


class FeatureIndex:
    """``media_id -> (frames, dim)`` fp16 tensors of the configured encoders, loaded once."""

    def __init__(self, tensors: dict[str, torch.Tensor], modality: dict[str, str]):
        self.tensors, self.modality = tensors, modality

    def __getitem__(self, media_id: str) -> torch.Tensor:
        try:
            return self.tensors[media_id]
        except KeyError:
            raise KeyError(f"media {media_id} has no features for this model's encoders (run jobs/features.py "
                           "with the same preset)") from None

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def of(self, modality: str) -> list[torch.Tensor]:
        return [t for m, t in self.tensors.items() if self.modality[m] == modality]


def load_index(features_uri: str, encoders: Iterable[str], media_ids: Iterable[str] | None, storage) -> FeatureIndex:
    """Read the feature store's rows for ``encoders`` (and ``media_ids``, if given) into an index."""
    from pipelines.store import FeatureStore

    store = FeatureStore(features_uri, storage)
    tensors, modality = {}, {}
    wanted = None if media_ids is None else pa.array(sorted(set(media_ids)), pa.string())
    for encoder in encoders:
        table = store.table(encoder)
        if wanted is not None:
            table = table.filter(pc.is_in(table["media_id"], wanted))
        for mid, mod, shape, dtype, data in zip(*(table[c].to_pylist() for c in ("media_id", "modality", "shape", "dtype", "data"))):
            arr = np.frombuffer(data, dtype=dtype).reshape(shape).copy()
            tensors[mid], modality[mid] = torch.from_numpy(arr), mod
    return FeatureIndex(tensors, modality)


def check_features(cfg: TrainConfig) -> None:
    """On the driver, before any worker starts: every training item has features in the store
    (for some encoder; the workers check theirs). Imported dialogues, for one, need jobs/features.py
    run on their manifest first, and without this a worker would fail on the first such item."""
    from pipelines.store import FeatureStore

    if not cfg.data.features:
        raise ValueError("set data.features=ROOT/features (jobs/features.py writes it)")
    stored = set(FeatureStore(cfg.data.features, _storage(cfg)).index()["media_id"].to_pylist())
    missing = train_media_ids(cfg) - stored
    if missing:
        raise ValueError(f"{len(missing)} media items of the {cfg.stage} rows have no features in {cfg.data.features} "
                         f"(e.g. {sorted(missing)[0]}): run jobs/features.py on their media first (for imported "
                         "dialogues: source=<out>/import_manifest.parquet)")


def train_media_ids(cfg: TrainConfig) -> set[str]:
    return {m for ids in train_rows(cfg)["media_ids"].to_pylist() for m in ids}


@functools.lru_cache(maxsize=2)
def _cached_index(cfg_key: str, encoders: tuple[str, ...]) -> FeatureIndex:
    cfg = TrainConfig.from_dict(json.loads(cfg_key))
    return load_index(cfg.data.features, encoders, train_media_ids(cfg), _storage(cfg))


def worker_index(model, cfg: TrainConfig) -> FeatureIndex:
    """This process's index of the stage's training media: built on first use, then reused every
    epoch (a per-process cache; Ray Train runs one worker per process)."""
    if not cfg.data.features:
        raise ValueError("set data.features=ROOT/features (jobs/features.py writes it)")
    key = {"stage": cfg.stage, "llm": cfg.llm, "data": dataclasses.asdict(cfg.data), "run": {"s3_endpoint": cfg.run.s3_endpoint}}
    return _cached_index(json.dumps(key, sort_keys=True), (model.vision.name, model.audio.name))


def feature_stats(tensors: list[torch.Tensor], positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(position, channel) mean and std over ``tensors`` ((T_i, D) each; frame t is position
    t mod ``positions``, as FeatureNorm reads it). Positions no item reaches keep mean 0, std 1."""
    dim = tensors[0].shape[1]
    total = torch.zeros(positions, dim, dtype=torch.float64)
    sq = torch.zeros(positions, dim, dtype=torch.float64)
    count = torch.zeros(positions, 1, dtype=torch.float64)
    for t in tensors:
        x = t.double()  # (T, D)
        idx = torch.arange(x.shape[0]) % positions
        total.index_add_(0, idx, x)
        sq.index_add_(0, idx, x * x)
        count.index_add_(0, idx, torch.ones(x.shape[0], 1, dtype=torch.float64))
    seen = count > 1
    mean = torch.where(seen, total / count.clamp_min(1), torch.zeros_like(total))
    var = (sq / count.clamp_min(1) - mean * mean).clamp_min(0)
    std = torch.where(seen, var.sqrt(), torch.ones_like(var))
    return mean.float(), std.float()


def set_feature_stats(model, index: FeatureIndex) -> dict[str, int]:
    """Stage 1: standardise each projector's input with the training features' statistics."""
    used = {}
    for modality, proj in ((IMAGE, model.vision_projector), (AUDIO, model.audio_projector)):
        tensors = index.of(modality)
        if tensors:
            proj.norm.set_stats(*feature_stats(tensors, proj.norm.positions))
        used[modality] = len(tensors)
    return used


# ---- worker side: rows -> micro-batches -----------------------------------------------------


def render_row(model, row: dict, index: FeatureIndex) -> dict:
    """One dialogue row -> a packing sample (ids, labels, per-item features in order)."""
    feats = [index[m] for m in row["media_ids"]]
    r = model.render(row["messages"], feats)
    return {
        "input_ids": r.input_ids, "labels": r.labels,
        "image_features": [f for m, f in zip(r.modalities, feats) if m == IMAGE],
        "audio_features": [f for m, f in zip(r.modalities, feats) if m == AUDIO],
    }


class TooLong:
    """Counts the rows ``samples`` skips because they do not fit the context, for the batches to report."""

    def __init__(self):
        self.count = 0

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


def samples(model, cfg: TrainConfig, rows: Iterable[dict], index: FeatureIndex, too_long: TooLong | None = None) -> Iterator[dict]:
    """Rendered samples; rows longer than the context are skipped (never truncated): warned about and
    counted in ``too_long``."""
    for row in rows:
        s = render_row(model, row, index)
        if len(s["input_ids"]) > cfg.train.context_length:
            log.warning("skipping %s: %d tokens > train.context_length %d", row.get("dialogue_id"),
                        len(s["input_ids"]), cfg.train.context_length)
            if too_long is not None:
                too_long.count += 1
            continue
        yield s


def packed_batches(model, cfg: TrainConfig, rows: Iterable[dict]) -> Iterator[dict[str, Any]]:
    """TrainHooks.make_batches: one epoch of this worker's rows -> micro-batches of
    ``train.micro_batch_size`` packed rows of ``train.context_length`` (leftovers carried over, so
    rows stay full). Each batch's ``skipped_rows`` counts the rows skipped as too long since the
    batch before (the training loop logs their sum)."""
    index = worker_index(model, cfg)
    too_long = TooLong()
    for batch in pack_stream(samples(model, cfg, rows, index, too_long), cfg.train.context_length,
                             cfg.train.micro_batch_size, model.tokenizer.pad_token_id):
        batch["skipped_rows"] = too_long.take()
        yield batch


def join_cost(dialogues: pa.Table, index: FeatureIndex) -> dict[str, float]:
    """Bytes of the per-worker index vs. a materialized table holding each row's tensors (fp16)."""
    per_item = {m: t.numel() * t.element_size() for m, t in index.tensors.items()}
    rows = dialogues["media_ids"].to_pylist()
    materialized = sum(per_item[m] for ids in rows for m in ids)
    return {"dialogues": len(rows), "media": len(index), "index_mb": index.nbytes / 1e6,
            "materialized_mb": materialized / 1e6, "text_mb": dialogues.nbytes / 1e6,
            "ratio": materialized / max(1, index.nbytes)}
