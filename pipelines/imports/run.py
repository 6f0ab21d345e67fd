"""Import dialogues people already have (LLaVA, ShareGPT, OpenAI messages, the project's own).

One pass, Ray Data stages as classes::

    records -> ParseRecords (format -> messages with empty spans + media refs; inline bytes into
               <out>/media/imported/) -> unique media uris -> [ReadBytes -> Decode] (ingest's own
               stages: read, sha256, full decode = the validation) -> driver: join -> write

Under ``out`` (local or s3://) it writes, for an import NAME (the source file's name without its
last extension, or ``name=``):

    dialogues/part-import-NAME.parquet   DIALOGUES rows (media_ids = sha256 of the bytes)
    import_errors/NAME.parquet           ERRORS rows: uri = "FILE#row N", stage (parse | read |
                                         decode), reason; its metadata names the source
    import_manifest.parquet              uri + modality of every imported item (the union over
                                         imports) + the imports that use it: the input of
                                         ``jobs/features.py``

File names depend only on the source, so a rerun replaces its own outputs, and its own manifest
entries, and nothing else: idempotent. A second source whose name is taken stops with an error
(``name=`` picks another) rather than overwrite the first. Local paths (``source``, ``out``,
``media_root``, media paths; ``~`` and ``file://`` allowed) are made absolute before anything
runs, so the manifest's uris hold wherever ``jobs/features.py`` runs from and wherever the media
are, whatever the folder the import ran in.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from mmm.media import MediaLimits, media_id
from mmm.schema import AUDIO, DIALOGUES, IMAGE, LANGS, SPLITS

from ..ingest import Decode, ReadBytes
from ..runtime import Chain, PoolConfig, RayConfig, require
from ..storage import StorageConfig, is_remote, join, local_path
from .formats import FORMATS, RecordError, parse_record
from .ids import DialogueIds
from .outputs import MANIFEST, check_name_is_ours, used_media, write_outputs
from .source import read_records

PARSED = pa.schema([("row", pa.int64()), ("record", pa.string()), ("error", pa.string())])
BATCH = 4096
"""Records the driver holds as Python objects at once, after parsing."""


@dataclass
class ImportConfig:
    source: str = ""
    """A JSON array or JSONL file (local or s3://) of dialogue records."""
    format: str = "llava"
    """llava | sharegpt | openai | mmm (see pipelines/imports/formats.py)."""
    media_root: str = ""
    """Folder or s3:// prefix relative media paths resolve against; default: the source's folder.
    Local paths may use ``~`` and ``file://``."""
    out: str = "outputs/imported"
    """Data root for dialogues/, import_errors/, import_manifest.parquet (then features/ via jobs/features.py)."""
    name: str = ""
    """Name of this import's output files; default: the source file's name without its last extension."""
    lang: str = "en"
    """Language of records that do not say (``lang`` field); one of mmm.schema.LANGS."""
    split: str = "train"
    """Split of records that do not say (``split`` field); one of mmm.schema.SPLITS."""
    parse: PoolConfig = field(default_factory=lambda: PoolConfig(concurrency=1, batch_size=256, num_cpus=0.25))
    """Record parsing: pure Python and JSON, so one light actor and large batches."""
    ingest: PoolConfig = field(default_factory=lambda: PoolConfig(concurrency=1, batch_size=64, num_cpus=0.25))
    """Read + hash + decode, ingest's stages chained in one light actor."""
    limits: MediaLimits = field(default_factory=MediaLimits)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("import needs source=FILE (a JSON array or JSONL of dialogue records)")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got {self.format!r}")
        if self.lang not in LANGS:
            raise ValueError(f"lang must be one of {list(LANGS)}, got {self.lang!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {self.split!r}")
        self.source, self.out = absolute(self.source), absolute(self.out)
        self.media_root = absolute(self.media_root) if self.media_root else ""


def absolute(uri: str) -> str:
    """A local path (``~`` and ``file://`` allowed) as an absolute path; s3:// uris stay as they are.

    The manifest's uris are absolute because they point wherever the media are (a media root
    far from ``out``, or ``out/media/imported``): features.py reads them from any folder, and a
    path relative to the folder the import ran in would mean nothing there."""
    return uri if is_remote(uri) else os.path.abspath(local_path(uri))


class ParseRecords:
    """(row, text) -> (row, record, error): the normal form as JSON (messages, media uris, lang,
    split, kind, id), or the reason. Inline media (data: URLs, base64 audio) are written to
    ``<out>/media/imported/<sha256>.<ext>`` and referred to by that uri."""

    NEEDS = ("row", "text")

    def __init__(self, fmt: str, media_root: str, out: str, storage: StorageConfig):
        self.fmt, self.media_root, self.out, self.storage = fmt, media_root, out, storage
        self.fs = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        require(batch, self.NEEDS, type(self).__name__)
        rows, records, errors = batch["row"].to_pylist(), [], []
        for text in batch["text"].to_pylist():
            record, error = self._parse_or_reason(text)
            records.append(record)
            errors.append(error)
        return pa.table({"row": rows, "record": records, "error": errors}, schema=PARSED)

    def _parse_or_reason(self, text: str) -> tuple[str | None, str | None]:
        try:
            return json.dumps(self._parse(json.loads(text))), None
        except RecordError as e:
            return None, str(e)
        except Exception as e:  # a shape formats.py does not check for: this record fails, not the import
            return None, f"unexpected record shape: {type(e).__name__}: {e}"

    def _parse(self, raw) -> dict:
        rec = parse_record(self.fmt, raw)
        media = [{"modality": m.modality, "uri": self._uri(m)} for m in rec.media]
        return {"id": rec.id, "messages": rec.messages, "media": media, "lang": rec.lang, "split": rec.split,
                "kind": rec.kind}

    def _uri(self, ref) -> str:
        if ref.data is not None:
            if self.fs is None:
                self.fs, _ = self.storage.filesystem(self.out)
            ext = {"jpeg": "jpg", "x-wav": "wav", "mpeg": "mp3"}.get(ref.ext.lower(), ref.ext.lower()) or "bin"
            uri = join(self.out, "media", "imported", f"{media_id(ref.data)}.{ext}")
            self.fs.pipe_file(self.storage.filesystem(uri)[1], ref.data)
            return uri
        return resolve(ref.path, self.media_root)


def resolve(path: str, root: str) -> str:
    """A media path against the (absolute) media root: uris and absolute paths stay as they are,
    ``~`` and ``file://`` paths become absolute local paths."""
    if is_remote(path):
        return path
    if path.startswith(("/", "~", "file://")):
        return absolute(path)
    return join(root, path) if is_remote(root) else absolute(join(root, path))


def kind_of(modalities: list[str]) -> str:
    """The dialogue kinds of the schema, from what a conversation shows; "text" when nothing."""
    images, audio = modalities.count(IMAGE), modalities.count(AUDIO)
    if images and audio:
        return "image_audio"
    if images:
        return "visual_context" if images == 1 else "multi_image"
    if audio:
        return "audio_instruction" if audio == 1 else "multi_audio"
    return "text"


def import_name(cfg: ImportConfig) -> str:
    """``name=``, else the source's file name without its last extension only: ``shard.part1.json``
    and ``shard.part2.json`` are two imports, ``llava_v1.5_mix665k.json`` stays itself. A leading
    ``.`` or ``_`` goes: readers skip such files as hidden."""
    stem = cfg.name or posixpath.splitext(posixpath.basename(cfg.source.rstrip("/")))[0]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).lstrip("._")
    return safe or "import"


def parse_all(cfg: ImportConfig, records: pa.Table) -> pa.Table:
    """PARSED rows of every record, in no particular order."""
    import ray

    step = max(1, cfg.parse.batch_size or 256)
    blocks = [records.slice(i, step) for i in range(0, records.num_rows, step)] or [records]
    kwargs = {"fmt": cfg.format, "media_root": media_root(cfg), "out": cfg.out, "storage": cfg.storage}
    ds = ray.data.from_arrow(blocks).map_batches(ParseRecords, fn_constructor_kwargs=kwargs, batch_format="pyarrow",
                                                 **cfg.parse.options())
    return pa.concat_tables([b.cast(PARSED) for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)] or [PARSED.empty_table()])


def parsed_records(parsed: pa.Table):
    """Each PARSED row in row order as a dict, its record decoded (None where parsing failed). A
    batch at a time is taken in order, rather than the whole table sorted: one copy less."""
    order = pc.sort_indices(parsed["row"])
    for at in range(0, len(order), BATCH):
        for p in parsed.take(order[at : at + BATCH]).to_pylist():
            yield dict(p, record=json.loads(p["record"]) if p["record"] else None)


def modality_hints(parsed: pa.Table) -> dict[str, str | None]:
    """uri -> the modality every record uses it as; None where records disagree, so the file's own
    extension or bytes decide and only the records that misuse it fail (not every record naming it)."""
    uses: dict[str, set[str]] = {}
    for chunk in parsed["record"].chunks:  # any order does: no sort, unlike parsed_records
        for record in chunk.to_pylist():
            for m in json.loads(record)["media"] if record else []:
                uses.setdefault(m["uri"], set()).add(m["modality"])
    return {uri: next(iter(kinds)) if len(kinds) == 1 else None for uri, kinds in uses.items()}


def check_media(cfg: ImportConfig, refs: dict[str, str | None]) -> dict[str, dict]:
    """uri -> ingest's result (media_id, modality, error, stage) for every referenced item."""
    import ray

    if not refs:
        return {}
    uris = sorted(refs)
    step = max(1, min(cfg.ingest.batch_size or 64, -(-len(uris) // 2)))
    blocks = [pa.table({"uri": uris[i : i + step], "modality": [refs[u] for u in uris[i : i + step]]})
              for i in range(0, len(uris), step)]
    stages = [(ReadBytes, {"storage": cfg.storage}), (Decode, {"limits": cfg.limits, "model": None})]
    ds = ray.data.from_arrow(blocks).map_batches(Chain, fn_constructor_kwargs={"stages": stages}, batch_format="pyarrow",
                                                 **cfg.ingest.options())
    cols = ("uri", "modality", "media_id", "error", "stage")
    out = {}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.select(list(cols)).to_pylist():
            out[row["uri"]] = row
    return out


def media_root(cfg: ImportConfig) -> str:
    return cfg.media_root or posixpath.dirname(cfg.source)


def assemble(cfg: ImportConfig, name: str, parsed: pa.Table, media: dict[str, dict]) -> tuple[pa.Table, list[dict]]:
    """DIALOGUES rows for the records whose media all read and decode; an error row for the rest.
    Dialogues become Arrow a batch at a time: as Python objects they take ~5x their JSON."""
    chunks, batch, errors, ids = [], [], [], DialogueIds(name)
    for p in parsed_records(parsed):
        dialogue = _dialogue(cfg, name, p, media, ids)
        if "reason" in dialogue:
            errors.append(dialogue)
            continue
        batch.append(dialogue)
        if len(batch) == BATCH:
            chunks.append(pa.Table.from_pylist(batch, schema=DIALOGUES))
            batch = []
    chunks.append(pa.Table.from_pylist(batch, schema=DIALOGUES))
    return pa.concat_tables(chunks), errors


def _dialogue(cfg: ImportConfig, name: str, p: dict, media: dict[str, dict], ids: DialogueIds) -> dict:
    """One parsed record's DIALOGUES row, or its error row (row, stage, reason)."""
    if p["error"]:
        return {"row": p["row"], "stage": "parse", "reason": p["error"]}
    rec = p["record"]
    bad = _media_problem(rec["media"], media)
    media_ids = [] if bad else [media[m["uri"]]["media_id"] for m in rec["media"]]
    earlier = None if bad else ids.duplicate_of(p["row"], rec["messages"], media_ids)
    if earlier is not None:
        bad = ("parse", f"duplicate record: the same turns and media as row {earlier}")
    if bad:
        return {"row": p["row"], "stage": bad[0], "reason": bad[1]}
    return {
        "dialogue_id": ids.assign(rec["id"], p["row"]),
        "kind": rec["kind"] or kind_of([m["modality"] for m in rec["media"]]),
        "lang": rec["lang"] or cfg.lang, "media_ids": media_ids,
        "messages": rec["messages"], "split": rec["split"] or cfg.split, "source": f"import:{cfg.format}:{name}",
    }


def _media_problem(refs: list[dict], media: dict[str, dict]) -> tuple[str, str] | None:
    for ref in refs:
        got = media[ref["uri"]]
        if got["error"]:
            what = "missing or unreadable file" if got["stage"] == "read" else "corrupt media"
            return got["stage"], f"{what} {ref['uri']}: {got['error']}"
        if got["modality"] != ref["modality"]:
            return "decode", f"{ref['uri']} is {got['modality']}, used as {ref['modality']}"
    return None


def reason_class(reason: str) -> str:
    """A short name for counting errors by reason."""
    for key, words in (("duplicate_record", "duplicate record"), ("missing_file", "missing or unreadable"), ("corrupt_media", "corrupt media"),
                       ("placeholder_count", "placeholders but"), ("span_count", "spans"),
                       ("unknown_role", "unknown role"), ("empty_turn", "is empty"), ("turn_order", "turn order"),
                       ("no_answer", "no assistant turn"), ("not_json", "not JSON"), ("remote_url", "remote URL"),
                       ("modality", ", used as "), ("unknown_lang", "unknown lang"),
                       ("unknown_split", "unknown split"), ("not_unicode", "not valid Unicode"),
                       ("unexpected_shape", "unexpected record shape"), ("wrong_type", " is not a"),
                       ("reserved_token", "a control token"), ("bad_data_url", "data URL"), ("bad_base64", "not base64"),
                       ("unknown_part", "unknown part type"), ("wrong_type", "content is neither"),
                       ("unsupported_modality", "not supported")):
        if words in reason:
            return key
    return "other"


def run_import(cfg: ImportConfig) -> dict:
    start = time.time()
    name = import_name(cfg)
    check_name_is_ours(cfg, name)
    records, unreadable = read_records(cfg.source, cfg.storage)
    if not records.num_rows and not unreadable:
        raise ValueError(f"source {cfg.source} holds no records (an empty file, an empty array or blank lines)")
    unparsed = pa.table({"row": [e["row"] for e in unreadable], "record": [None] * len(unreadable),
                         "error": [e["reason"] for e in unreadable]}, schema=PARSED)
    parsed = pa.concat_tables([parse_all(cfg, records), unparsed])
    del records
    media = check_media(cfg, modality_hints(parsed))
    dialogues, errors = assemble(cfg, name, parsed, media)
    del parsed
    write_outputs(cfg, name, dialogues, errors, media)
    good = used_media(dialogues)
    return {
        "dialogues": dialogues.num_rows,
        "media": len(good),
        "errors": len(errors),
        "errors_by_reason": dict(sorted(Counter(reason_class(e["reason"]) for e in errors).items())),
        "by_kind": dict(sorted(Counter(dialogues["kind"].to_pylist()).items())),
        "records": dialogues.num_rows + len(errors),
        "out": cfg.out,
        "next": f"python jobs/features.py source={join(cfg.out, MANIFEST)} out={cfg.out}",
        "seconds": round(time.time() - start, 1),
    }
