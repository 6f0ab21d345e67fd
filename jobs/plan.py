"""What a preset needs at full scale: parameters, media tokens and GPU memory per GPU, in seconds.

Usage:
    python jobs/plan.py --preset mistral --gpus 8 --context 8192
    python jobs/plan.py --preset tinyllama --gpus 4 --context 2048 --micro-batch 2 --gradient-checkpointing
    python jobs/plan.py --preset mistral --gpus 8 --context 8192 --stage stage1

The model is built on the meta device from the configs kept in mmm/model_configs/ (no weights, no
hub; see mmm/meta.py). It prints parameters per part (vision tower, audio encoder, projectors, LM,
total) and trainable per stage, LM tokens per 384 px image and per 30 s clip, and GiB per GPU for
ZeRO-2, ZeRO-2 with optimizer offload, and ZeRO-3 at that GPU count, context and micro-batch, for
``--stage`` (default: stage 2, full fine-tune) with or without gradient checkpointing; a table of
every stage and checkpointing choice follows. The memory model is written down in mmm/plan.py.
The training jobs do not turn gradient checkpointing on today (jobs/train_loop.py): the
"checkpointed" figures say what ``llm.gradient_checkpointing_enable()`` there would save.
A context beyond the LM's positions is refused, naming both numbers (exit status 2). The last line
is one JSON object: ``params``, ``tokens_per_image``, ``tokens_per_30s_audio``, ``gib_per_gpu``, ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # planning never downloads

from mmm.config import PRESETS, preset  # noqa: E402

STAGES = ("stage1", "stage2_full", "stage2_lora")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs (ZeRO partitions over them)")
    p.add_argument("--context", type=int, default=None, help="tokens per packed row (default: the preset's llm.max_context)")
    p.add_argument("--micro-batch", type=int, default=1, help="packed rows per GPU per step")
    p.add_argument("--stage", choices=STAGES, default="stage2_full", help="what trains (gib_per_gpu is for this)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each LM layer in the backward pass")
    return p.parse_args(argv)


def show(r: dict) -> None:
    print(f"== plan: {r['preset']}, {r['gpus']} GPUs, context {r['context']}, micro-batch {r['micro_batch']} ==")
    for part, n in r["params"].items():
        print(f"  params {part:22s} {n:>15,}")
    for stage, n in r["trainable"].items():
        print(f"  trainable {stage:19s} {n:>15,}" if isinstance(n, int) else f"  trainable {stage}: {n}")
    print(f"  tokens per image {r['tokens_per_image']}, per 30 s audio {r['tokens_per_30s_audio']}; "
          f"LM positions {r['lm']['max_positions']}")
    print(f"  GiB per GPU ({r['stage']}, gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}):")
    for mode, parts in r["breakdown_gib"].items():
        print(f"    {mode:14s} {parts['total']:8.1f}   " + ", ".join(f"{k} {v}" for k, v in parts.items() if k != "total"))
    print("  GiB per GPU, every case (zero2 / zero2_offload / zero3):")
    for case, m in r["gib_per_gpu_by_case"].items():
        print(f"    {case:36s} " + " / ".join(f"{m[k]:.1f}" for k in ("zero2", "zero2_offload", "zero3")))


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from mmm.meta import build_meta
    from mmm.plan import plan

    cfg = preset(args.preset)
    cfg.llm.max_context = args.context or cfg.llm.max_context  # the model refuses more than its positions
    try:
        model = build_meta(cfg)
        result = plan(model, args.gpus, cfg.llm.max_context, args.micro_batch, args.gradient_checkpointing, args.stage)
    except ValueError as e:
        sys.exit(f"plan: {e}")
    show(result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
