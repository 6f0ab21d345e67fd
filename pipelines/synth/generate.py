"""Dialogue synthesis: two generators behind one interface, one writer, one summary.

A generator has ``prepare()`` (make or load what the dialogues are about; returns a summary
dict) and ``dialogues()`` (a Ray Dataset of DIALOGUES rows). :func:`run_synthesis` picks one,
writes its dialogues to ``<out>/dialogues/`` and summarises them by kind, language and split.

Output layout of the offline generator (the default)::

    <out>/media/image/000123.png   generated pictures (PNG, 24-48 px square)
    <out>/media/audio/000045.wav   generated beeps (WAV, 16 kHz, 0.6-2.5 s)
    <out>/media/image-ood/000012.png, audio-ood/...  the eval items' twins for eval_ood (other
                                   canvas sizes, shades, shape sizes, beep/gap lengths, loudness)
    <out>/media/speech/000007.wav  spoken words (only with espeak-ng and offline.speech=true)
    <out>/manifest.parquet         uri (relative to <out>), modality, caption, transcript, lang,
                                   + media_id, kind, index, split, facts (JSON)
    <out>/dialogues/part-*.parquet DIALOGUES rows

Train media are listed once per language with their caption (stage 1's pairs); eval and eval_ood
media once, without text, so stage 1 never sees them. Then ``jobs/features.py source=<out>/manifest.parquet
out=<out>`` writes ``media.parquet``, ``errors.parquet`` and ``features/`` next to them.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa

from mmm.schema import AUDIO, DIALOGUES, IMAGE, check_columns

from ..runtime import PoolConfig, RayConfig, require
from ..storage import StorageConfig, join, replace_folder, write_parquet_atomic
from .media import SPEECH, MakeMedia, espeak_available
from .offline import SOURCE, DialogueConfig, OfflineDialogues, num_eval, pools_from_manifest, twins_from_manifest
from .words import audio_caption, image_caption

DIALOGUES_DIR = "dialogues"
MANIFEST = "manifest.parquet"


class Generator(Protocol):
    def prepare(self) -> dict: ...

    def dialogues(self): ...


@dataclass
class OfflineConfig:
    num_images: int = 2000
    """Distinct pictures; 36 fact combinations, so each appears ~50 times with different layouts."""
    num_audio: int = 1000
    """Distinct beep clips; 6 fact combinations. Each costs a full Whisper window to encode."""
    speech: bool = False
    """Also speak phrases with espeak-ng (pipelines/synth/speech.py; an error when it is missing).
    Off by default: the tiny preset's random encoder has nothing to learn from them."""
    num_speech: int = 200
    """Spoken-phrase clips, both languages alternating; every eighth of each language is held out."""
    pool: PoolConfig = field(default_factory=lambda: PoolConfig(concurrency=2, batch_size=256, num_cpus=0.25))
    """Media-making actors (Pillow, numpy, file writes)."""


@dataclass
class LLMGenConfig:
    media: str = ""
    """The media table with captions/transcripts (jobs/features.py's media.parquet); default <out>/media.parquet."""
    model: str = "tiny"
    """A preset name (its LM, random for "tiny": nonsense text, real plumbing) or an HF model path."""
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.9
    use_vllm: bool = True
    """Use vLLM when it is importable and a GPU is present; else transformers' generate."""
    check: bool = True
    """Reject malformed replies (no answer, broken turn order, wrong media references, wrong
    language) into <out>/synth_errors/ instead of writing them (pipelines/synth/checks.py)."""
    pool: PoolConfig = field(default_factory=lambda: PoolConfig(concurrency=1, batch_size=16, num_cpus=1.0))
    """LM actors: on a GPU cluster num_gpus=1 and concurrency = number of GPUs."""


@dataclass
class SynthesizeConfig:
    out: str = "outputs/data"
    """Root folder (local or s3://) for media/, manifest.parquet and dialogues/."""
    generator: str = "offline"
    """offline (media with known facts, checkable answers) or llm (real captions + an LM)."""
    seed: int = 0
    dialogues: DialogueConfig = field(default_factory=DialogueConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    llm: LLMGenConfig = field(default_factory=LLMGenConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.generator not in ("offline", "llm"):
            raise ValueError(f"generator must be 'offline' or 'llm', got {self.generator!r}")


def _blocks(column: str, values: list, step: int) -> list[pa.Table]:
    """Input rows as many small blocks, so every actor of a pool gets work."""
    return [pa.table({column: values[i : i + step]}) for i in range(0, len(values), step)] or [pa.table({column: []})]


class OfflineGenerator:
    def __init__(self, cfg: SynthesizeConfig):
        self.cfg = cfg
        self.pools: dict | None = None
        self.twins: dict[str, str] = {}

    def _kinds(self) -> dict[str, int]:
        o = self.cfg.offline
        kinds = {IMAGE: o.num_images, AUDIO: o.num_audio}
        if o.speech:
            if not espeak_available():
                raise RuntimeError("offline.speech=true needs espeak-ng (apt-get install espeak-ng)")
            kinds[SPEECH] = o.num_speech
        return kinds

    def prepare(self) -> dict:
        import ray

        kinds = self._kinds()
        n_eval = self._num_eval(kinds)
        items = [(k, i, "train") for k, n in kinds.items() for i in range(n)]
        # the eval items' twins; speech holds out phrases of its own, spoken by the training voices (synth/speech.py)
        items += [(k, i, "ood") for k, n in n_eval.items() if k != SPEECH for i in range(n)]
        step = self.cfg.offline.pool.batch_size
        blocks = [pa.table({c: [it[j] for it in items[i : i + step]] for j, c in enumerate(("kind", "index", "style"))})
                  for i in range(0, len(items), step)]
        ds = ray.data.from_arrow(blocks).map_batches(
            MakeMedia, fn_constructor_kwargs={"root": self.cfg.out, "storage": self.cfg.storage, "seed": self.cfg.seed},
            batch_format="pyarrow", **self.cfg.offline.pool.options(),
        )
        rows = ds.take_all()
        rows = self._split(rows, n_eval)
        fs, root = self.cfg.storage.filesystem(self.cfg.out)
        write_parquet_atomic(fs, manifest_table(rows), join(root, MANIFEST))
        self.pools, self.twins = pools_from_manifest(rows), twins_from_manifest(rows)
        counts = Counter((r["kind"], r["split"]) for r in rows)
        speech = "on" if SPEECH in kinds else "off"
        return {"media": {f"{k}/{s}": n for (k, s), n in sorted(counts.items())}, "speech": speech}

    def _num_eval(self, kinds: dict[str, int]) -> dict[str, int]:
        frac = self.cfg.dialogues.eval_fraction
        return {k: max(3, round(n * frac)) if frac > 0 else 0 for k, n in kinds.items()}

    @staticmethod
    def _split(rows: list[dict], n_eval: dict[str, int]) -> list[dict]:
        """Eval = the first indices of each kind, eval_ood = their twins drawn out of the training
        ranges; drop byte-identical repeats (one id, one split)."""
        seen, out = set(), []
        for r in sorted(rows, key=lambda r: (r["style"] != "train", r["kind"], r["index"])):
            if r["media_id"] in seen:
                continue
            seen.add(r["media_id"])
            facts_split = json.loads(r["facts"]).get("split")  # speech is split by phrase (synth/speech.py)
            split = "eval_ood" if r["style"] != "train" else facts_split or ("eval" if r["index"] < n_eval[r["kind"]] else "train")
            out.append(dict(r, split=split))
        return out

    def dialogues(self):
        import ray

        d = self.cfg.dialogues
        need = {"train": 1, "eval": 1 if num_eval(d.num_dialogues, d.eval_fraction) else 0}
        for split, n in need.items():
            for kind in (IMAGE, AUDIO):
                if n and len(self.pools[split].get(kind, [])) < 2:
                    raise ValueError(f"the {split} split has fewer than 2 {kind} items; make more media")
        ds = ray.data.from_arrow(_blocks("index", list(range(d.num_dialogues)), d.pool.batch_size))
        return ds.map_batches(
            OfflineDialogues, fn_constructor_kwargs={"pools": self.pools, "cfg": d, "seed": self.cfg.seed, "twins": self.twins},
            batch_format="pyarrow", **d.pool.options(),
        )


def manifest_table(rows: list[dict]) -> pa.Table:
    """Ingest's manifest: train items once per language with text, eval items once without."""
    out = []
    for r in rows:
        facts = json.loads(r["facts"])
        base = {k: r[k] for k in ("uri", "modality", "media_id", "kind", "index", "split", "facts")}
        texts = [(None, None, None)]
        if r["split"] == "train":
            if r["kind"] == IMAGE:
                texts = [(image_caption(facts, lg), None, lg) for lg in ("en", "ms")]
            elif r["kind"] == AUDIO:
                texts = [(audio_caption(facts, lg), None, lg) for lg in ("en", "ms")]
            else:
                texts = [(None, facts["phrase"], facts["lang"])]
        out += [dict(base, caption=c, transcript=t, lang=lg) for c, t, lg in texts]
    names = ["uri", "modality", "caption", "transcript", "lang", "media_id", "kind", "index", "split", "facts"]
    types = [pa.string()] * 7 + [pa.int64(), pa.string(), pa.string()]
    return pa.Table.from_pylist(out, schema=pa.schema(list(zip(names, types))))


class WriteDialogues:
    """Write each batch as one Parquet part under a staging folder; pass on kind/lang/split."""

    NEEDS = tuple(DIALOGUES.names)

    def __init__(self, folder: str, storage: StorageConfig):
        self.fs, self.folder = storage.filesystem(folder)

    def __call__(self, batch: pa.Table) -> pa.Table:
        require(batch, self.NEEDS, type(self).__name__)
        check_columns(batch, DIALOGUES, "a dialogue batch")
        first = batch["dialogue_id"][0].as_py()
        write_parquet_atomic(self.fs, batch.select(DIALOGUES.names).cast(DIALOGUES), join(self.folder, f"part-{first}.parquet"))
        turns = [len(m) // 2 for m in batch["messages"].to_pylist()]
        return pa.table({"kind": batch["kind"], "lang": batch["lang"], "split": batch["split"], "turns": turns})


def write_dialogues(ds, cfg: SynthesizeConfig) -> pa.Table:
    """Stage every part, then swap the staging folder in for ``<out>/dialogues`` (old parts go)."""
    fs, root = cfg.storage.filesystem(cfg.out)
    staging = join(root, "_staging", f"{DIALOGUES_DIR}-{int(time.time() * 1000)}")
    staging_uri = join(cfg.out, "_staging", staging.rsplit("/", 1)[1])
    out = ds.map_batches(WriteDialogues, fn_constructor_kwargs={"folder": staging_uri, "storage": cfg.storage},
                         batch_format="pyarrow", **PoolConfig(concurrency=1, batch_size=None, num_cpus=0.25).options())
    stats = [b for b in out.iter_batches(batch_format="pyarrow", batch_size=None)]
    replace_folder(fs, staging, join(root, DIALOGUES_DIR))
    return pa.concat_tables(stats) if stats else pa.table({"kind": [], "lang": [], "split": [], "turns": []})


def build_generator(cfg: SynthesizeConfig) -> Generator:
    if cfg.generator == "offline":
        return OfflineGenerator(cfg)
    from .llm import LLMGenerator

    return LLMGenerator(cfg)


def run_synthesis(cfg: SynthesizeConfig) -> dict:
    start = time.time()
    gen = build_generator(cfg)
    prepared = gen.prepare()
    stats = write_dialogues(gen.dialogues(), cfg)
    rows = stats.to_pylist()
    extra = gen.report() if hasattr(gen, "report") else {}
    return {
        "generator": cfg.generator,
        **prepared,
        "dialogues": len(rows),
        "by_kind_lang": {f"{k}/{lg}": n for (k, lg), n in sorted(Counter((r["kind"], r["lang"]) for r in rows).items())},
        "by_split": dict(sorted(Counter(r["split"] for r in rows).items())),
        "by_turns": dict(sorted(Counter(r["turns"] for r in rows).items())),
        **extra,
        "seconds": round(time.time() - start, 1),
    }


__all__ = ["SOURCE", "SynthesizeConfig", "run_synthesis", "build_generator", "write_dialogues"]
