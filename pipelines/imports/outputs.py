"""What an import writes under ``out``: its dialogues, its errors table (whose metadata names the
source, so a second source of the same name is refused) and its entries in the shared media
manifest, which ``jobs/features.py`` reads."""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmm.schema import ERRORS

from ..storage import join, read_parquet, write_parquet_atomic

if TYPE_CHECKING:
    from .run import ImportConfig

MANIFEST = "import_manifest.parquet"
MANIFEST_SCHEMA = pa.schema([("uri", pa.string()), ("modality", pa.string()), ("imports", pa.list_(pa.string()))])
SOURCE_KEY = b"mmm.import.source"
"""Metadata key of import_errors/NAME.parquet: the source that NAME was imported from."""


def check_name_is_ours(cfg: ImportConfig, name: str) -> None:
    """Two sources with one name (``a/train.json`` and ``b/train.json``) would overwrite each
    other's dialogues: stop unless NAME's outputs came from this very source (a rerun)."""
    fs, root = cfg.storage.filesystem(cfg.out)
    path = join(root, "import_errors", f"{name}.parquet")
    if not fs.exists(path):
        return
    with fs.open(path, "rb") as f:
        owner = (pq.read_schema(f).metadata or {}).get(SOURCE_KEY, b"").decode()
    if owner and owner != cfg.source:
        raise ValueError(f"{cfg.out} already holds the import {name!r}, from {owner}; give {cfg.source} another "
                         f"name=, or delete {name}'s files under dialogues/ and import_errors/ to replace it")


def write_outputs(cfg: ImportConfig, name: str, dialogues: pa.Table, errors: list[dict], media: dict[str, dict]) -> None:
    fs, root = cfg.storage.filesystem(cfg.out)
    write_parquet_atomic(fs, dialogues, join(root, "dialogues", f"part-import-{name}.parquet"))
    base = posixpath.basename(cfg.source)
    rows = [{"uri": f"{base}#row {e['row']}", "stage": e["stage"], "reason": e["reason"], "media_id": None} for e in errors]
    table = pa.Table.from_pylist(rows, schema=ERRORS).replace_schema_metadata({SOURCE_KEY: cfg.source.encode()})
    write_parquet_atomic(fs, table, join(root, "import_errors", f"{name}.parquet"))
    used = used_media(dialogues)
    items = {r["uri"]: r["modality"] for r in media.values() if r["media_id"] in used}
    write_parquet_atomic(fs, merged_manifest(read_parquet(fs, join(root, MANIFEST)), name, items), join(root, MANIFEST))


def used_media(dialogues: pa.Table) -> set[str]:
    return set(pc.unique(pc.list_flatten(dialogues["media_ids"])).to_pylist())


def merged_manifest(old: pa.Table | None, name: str, items: dict[str, str]) -> pa.Table:
    """The manifest with import ``name``'s entries replaced by ``items`` (uri -> modality): a uri
    stays while some import still uses it; a row naming no import is kept, as nothing says whose it is."""
    modality: dict[str, str] = {}
    owners: dict[str, set[str]] = {}
    for r in old.to_pylist() if old is not None else []:
        others = set(r.get("imports") or []) - {name}
        if others or not r.get("imports"):
            modality[r["uri"]], owners[r["uri"]] = r["modality"], others
    for uri, kind in items.items():
        modality[uri] = kind
        owners.setdefault(uri, set()).add(name)
    uris = sorted(modality)
    return pa.table({"uri": uris, "modality": [modality[u] for u in uris], "imports": [sorted(owners[u]) for u in uris]},
                    schema=MANIFEST_SCHEMA)
