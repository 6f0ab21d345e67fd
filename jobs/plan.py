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
The training jobs run ZeRO stages 0-2 only (training/config.py): the ZeRO-3 figure is what ZeRO-3
would need, for comparison. Gradient checkpointing is the training key
``train.gradient_checkpointing`` (training/stages.py turns it on for the LM): the "checkpointed"
figures are what it saves. A context beyond the LM's positions, or a --gpus, --context or
--micro-batch below 1, is refused on stderr, naming the numbers (exit status 2). The last line is
one JSON object: ``params``, ``tokens_per_image``, ``tokens_per_30s_audio``, ``gib_per_gpu``
(``zero2``, ``zero2_offload``, ``zero3``), ``training_supports``, ...
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


def at_least_one(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse then exits 2 naming the option and the value)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--gpus", type=at_least_one, default=8, help="data-parallel GPUs (ZeRO partitions over them)")
    p.add_argument("--context", type=at_least_one, default=None,
                   help="tokens per packed row, >= 1 (default: the preset's llm.max_context)")
    p.add_argument("--micro-batch", type=at_least_one, default=1, help="packed rows per GPU per step")
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
        label = f"{mode} (would need)" if mode not in r["training_supports"] else mode
        print(f"    {label:19s} {parts['total']:8.1f}   " + ", ".join(f"{k} {v}" for k, v in parts.items() if k != "total"))
    print(f"  ({r['zero3_note']})")
    print("  GiB per GPU, every case (zero2 / zero2_offload / zero3 would need):")
    for case, m in r["gib_per_gpu_by_case"].items():
        print(f"    {case:36s} " + " / ".join(f"{m[k]:.1f}" for k in ("zero2", "zero2_offload", "zero3")))


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from mmm.meta import build_meta
    from mmm.plan import plan

    cfg = preset(args.preset)
    if args.context is not None:
        cfg.llm.max_context = args.context  # the model refuses more than its positions
    try:
        model = build_meta(cfg)
        result = plan(model, args.gpus, cfg.llm.max_context, args.micro_batch, args.gradient_checkpointing, args.stage)
    except ValueError as e:
        print(f"plan: {e}", file=sys.stderr)
        sys.exit(2)
    show(result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
