"""Synthesize bilingual (English + Malay) multimodal dialogues in the DIALOGUES schema.

Usage:
    python jobs/synthesize.py out=outputs/data                       # offline: media + dialogues
    python jobs/synthesize.py out=outputs/data dialogues.num_dialogues=100000 offline.num_images=5000
    python jobs/synthesize.py generator=llm out=outputs/real llm.model=TinyLlama/TinyLlama-1.1B-Chat-v1.0 \
        llm.pool.num_gpus=1 llm.pool.concurrency=4                   # real captions + an LM
    ray job submit --working-dir . -- python jobs/synthesize.py out=s3://bucket/mmm storage.endpoint_url=...

offline (the default) draws its own media with known facts and asks checkable questions about
them, all five kinds, 1-4 turns, English and Malay, train/eval split by media:

    <out>/media/{image,audio}/     generated PNG / WAV files
    <out>/manifest.parquet         input for jobs/features.py (train items carry en+ms captions)
    <out>/dialogues/part-*.parquet DIALOGUES rows

llm reads ``<out>/media.parquet`` (from jobs/features.py; or ``llm.media=...``), prompts the LM
with the paper's templates over captions/transcripts, and writes ``<out>/dialogues/``.
Then: ``python jobs/features.py source=<out>/manifest.parquet out=<out>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import parse, print_summary
from pipelines.runtime import init_ray
from pipelines.synth.generate import SynthesizeConfig, run_synthesis


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(SynthesizeConfig, argv, __doc__)
    started = init_ray(cfg.ray)
    try:
        summary = run_synthesis(cfg)
    finally:
        if started:
            import ray

            ray.shutdown()
    print_summary(f"synthesize ({cfg.generator}) -> {cfg.out}", summary)
    return summary


if __name__ == "__main__":
    main()
