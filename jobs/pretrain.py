"""Stage 1: align the projectors on caption/transcript pairs (encoders and LM frozen).

Usage:
    python jobs/pretrain.py                                   # tiny demo: outputs/data -> outputs/demo/stage1
    python jobs/pretrain.py --data ROOT run.output_dir=out/s1 train.max_steps=500
    python jobs/pretrain.py --config stage1.yaml --set train.lr=1e-3 run.name=s1
    python jobs/pretrain.py run.name=s1 --resume              # continue from the latest checkpoint
    ray job submit --working-dir . -- python jobs/pretrain.py --data /abs/data run.output_dir=/abs/out/s1 \\
        run.storage_path=/abs/ray_results                    # or s3:// paths; relative ones land in the job's copy

Rows: every media item of ``ROOT/media.parquet`` with a caption or transcript, as a one-turn chat
(a short instruction in the item's language -> the caption), joined at read time with
``ROOT/features`` (training/rows.py). Before training, each worker computes the FeatureNorm
statistics (per position and channel) of the training features and stores them in the model.
Writes ``<run.output_dir>/final`` (HF layout, phase "stage1"; jobs/finetune.py starts from it)
and ``<run.output_dir>/metrics.jsonl``; Ray Train checkpoints go to ``run.storage_path``.
Every key of training/config.py's TrainConfig can be set (``key=value``, or ``--config`` YAML).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import stages


def main(argv: list[str] | None = None) -> dict:
    return stages.main("pretrain", argv, __doc__)


if __name__ == "__main__":
    main()
