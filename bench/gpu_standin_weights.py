"""Write small-real's weight folders with RANDOM weights in the real shapes, for a GPU machine.

A lent GPU machine has no package registry and takes at most 64 MiB of files, so the 800 MB of
materialised small-real weights cannot reach it. The GPU checks (tests/test_gpu.py) test
mechanics, not answers: a bf16 ZeRO-2 step, CUDA greedy decoding equal to the CPU's, encoder
throughput. Those hold for any weights of the real shapes, so this builds them from the real
folders' configs, tokenizers and chat template (carried, a few MB) with random weights.

    python bench/gpu_standin_weights.py SRC DST

``SRC`` holds ``whisper-base/`` and ``smollm2-135m-instruct/`` without their ``model.safetensors``
(``bench/gpu_checks.sh prepare`` copies them); ``DST`` becomes an ``MMM_WEIGHTS_DIR``. Each
folder's SOURCE.json is kept and marked ``"stand_in"`` so nobody mistakes it for the real one.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

STAND_IN = "random weights in the real shapes (bench/gpu_standin_weights.py), not the pretrained ones"


def build(folder: Path):
    from transformers import AutoConfig, LlamaForCausalLM, WhisperForConditionalGeneration

    config = AutoConfig.from_pretrained(folder)
    cls = WhisperForConditionalGeneration if config.model_type == "whisper" else LlamaForCausalLM
    torch.manual_seed(0)
    return cls(config)


def stand_in(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("whisper-base", "smollm2-135m-instruct"):
        out = dst / name
        shutil.copytree(src / name, out, dirs_exist_ok=True)
        build(src / name).save_pretrained(out)
        source = json.loads((src / name / "SOURCE.json").read_text())
        (out / "SOURCE.json").write_text(json.dumps({**source, "stand_in": STAND_IN}, indent=2))
        print(f"{name}: {STAND_IN} -> {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    stand_in(Path(sys.argv[1]), Path(sys.argv[2]))
