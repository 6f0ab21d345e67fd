"""Import instruction dialogues people already have into the DIALOGUES schema (a Ray Data job).

Usage:
    python jobs/import_dialogues.py source=llava_instruct.json format=llava media_root=/data/coco out=outputs/mine
    python jobs/import_dialogues.py source=chat.jsonl format=openai out=s3://bucket/mine storage.endpoint_url=...
    python jobs/import_dialogues.py --help                   # every field with its default

Formats: ``llava`` (JSON array or JSONL; ``image`` / ``audio`` paths and ``<image>`` / ``<audio>``
placeholders), ``sharegpt`` (``conversations`` or ``messages``; ``images`` / ``audios``),
``openai`` (``messages`` with ``image_url`` / ``input_audio`` / path parts) and ``mmm`` (the
project's own ``messages`` with empty spans + ``media`` paths); see pipelines/imports/formats.py.
Media paths resolve against ``media_root`` (local or s3://; default the source's folder; local
paths may use ``~`` and ``file://``); every item is read, hashed (sha256 = media_id) and fully
decoded, as ingest does. A bad record (not JSON, a field of the wrong type, unknown role, empty
turn, broken turn order, placeholder count != media count, a ``lang`` or ``split`` outside
mmm.schema's LANGS / SPLITS, a missing or corrupt file) goes to
``<out>/import_errors/NAME.parquet`` with its reason; the others to
``<out>/dialogues/part-import-NAME.parquet``. NAME is the source's file name without its last
extension (or ``name=``); a rerun of the same source replaces its own files and manifest entries,
and a different source whose NAME is taken stops with an error. The manifest lists absolute local
paths (or s3:// uris), so the next command works from any folder:

    python jobs/features.py source=<out>/import_manifest.parquet out=<out>
    python jobs/finetune.py --data <out> model.init=<a stage-1 checkpoint>

The last output line is JSON: dialogues, media, errors, errors_by_reason, by_kind, ...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import parse, print_summary
from pipelines.imports.run import ImportConfig, run_import
from pipelines.imports.source import check_source
from pipelines.runtime import init_ray


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(ImportConfig, argv, __doc__)
    check_source(cfg.source, cfg.storage)
    started = init_ray(cfg.ray)
    try:
        summary = run_import(cfg)
    finally:
        if started:
            import ray

            ray.shutdown()
    print_summary(f"import ({cfg.format}): {cfg.source} -> {cfg.out}", summary)
    return summary


if __name__ == "__main__":
    main()
