"""Ingest media and compute frozen-encoder features into a Parquet store (idempotent).

Usage:
    python jobs/features.py source=outputs/data/manifest.parquet out=outputs/data
    python jobs/features.py --config job.yaml encode.concurrency=4 encode.num_gpus=1
    ray job submit --working-dir . -- python jobs/features.py source=s3://bucket/raw/ out=s3://bucket/mmm \
        storage.endpoint_url=http://127.0.0.1:9000
    python jobs/features.py source=... out=... model.preset=tinyllama \
        model.overrides.audio.pretrained=/ckpt/whisper-small model.overrides.vision.pretrained=/ckpt/siglip

``source`` is a manifest (.parquet or .jsonl: uri + optional caption/transcript/lang; relative
uris are relative to the manifest), a folder, or an s3:// prefix. Under ``out`` it writes:

    media.parquet     MEDIA rows: one per decoded item and caption language (sha256 media_id)
    errors.parquet    ERRORS rows: uri, stage (read/decode/encode), reason
    features/         FEATURES parts (part-<hash>.parquet), keyed by media_id + encoder name

``model`` picks the encoders: a preset plus nested ModelConfig overrides, e.g. a local checkpoint
folder in ``model.overrides.audio.pretrained`` (see pipelines/features.py). A rerun skips ids
already in the store for those encoders (named by a digest of their config, not by their path); a
crashed run leaves only whole parts, and the rerun completes it. With RAY_ADDRESS set (``ray job submit`` sets it) the
job joins that cluster; otherwise it starts a local one.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import parse, print_summary
from pipelines.features import FeaturesConfig, run_features
from pipelines.runtime import init_ray


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(FeaturesConfig, argv, __doc__)
    started = init_ray(cfg.ray)
    try:
        summary = run_features(cfg)
    finally:
        if started:
            import ray

            ray.shutdown()
    print_summary(f"features: {cfg.source} -> {cfg.out}", summary)
    return summary


if __name__ == "__main__":
    main()
