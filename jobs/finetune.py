"""Stage 2: instruction fine-tune on multi-turn dialogues (projectors + LM, or projectors + LoRA).

Usage:
    python jobs/finetune.py                                   # tiny demo: outputs/demo/stage1/final -> outputs/demo/stage2
    python jobs/finetune.py --data ROOT model.init=out/s1/final run.output_dir=out/s2 llm=lora
    python jobs/finetune.py --config stage2.yaml --set train.max_steps=2000 run.name=s2
    python jobs/finetune.py run.name=s2 --resume              # continue from the latest checkpoint
    ray job submit --working-dir . -- python jobs/finetune.py --data /abs/data model.init=/abs/out/s1/final \\
        run.output_dir=/abs/out/s2 run.storage_path=/abs/ray_results

Starts from a stage-1 export (``model.init``; its projectors and feature statistics) and refuses
any other phase before a worker starts. Rows: the ``train`` split of ``ROOT/dialogues`` streamed
through Ray Data, joined at read time with ``ROOT/features`` (training/rows.py), rendered and packed
to ``train.context_length``. Writes ``<run.output_dir>/final`` (HF layout, phase "stage2"; what
serve and jobs/evaluate.py load) and ``<run.output_dir>/metrics.jsonl``.
Every key of training/config.py's TrainConfig can be set (``key=value``, or ``--config`` YAML).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import stages


def main(argv: list[str] | None = None) -> dict:
    return stages.main("finetune", argv, __doc__)


if __name__ == "__main__":
    main()
