"""Where a small-real stage-2 step's time goes on one GPU (bf16, DeepSpeed ZeRO-2, LoRA r8).

Run by ``bench/gpu_checks.sh profile`` on a lent GPU machine. Prints steps/s at 1, 16 and 64
dialogues a step (flat means the step is bound by per-op overhead, not by the GPU's arithmetic),
with the packed attention per sample and as one varlen call a layer, side by side; then the
profiler's top ops of one 16-dialogue step (varlen) and its count of CUDA kernel launches.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def engine_for(model):
    import deepspeed

    from training.config import load_config
    from training.deepspeed_config import build_optimizer, build_scheduler, deepspeed_config, param_groups

    cfg = load_config("finetune", overrides=["model.preset=small-real", "resources.use_gpu=true", "resources.num_workers=1",
                                             "deepspeed.bf16=true", "train.micro_batch_size=1", "train.grad_accum=1"])
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False,
                               init_method=f"file://{tempfile.mkdtemp()}/pg", rank=0, world_size=1)
    opt = build_optimizer(param_groups(model, 0.0), cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg),
                                      lr_scheduler=build_scheduler(opt, cfg))
    return engine


def steps_per_second(engine, batch, steps: int = 10) -> float:
    from test_gpu import _step

    _step(engine, batch)
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(steps):
        _step(engine, batch)
    torch.cuda.synchronize()
    return steps / (time.time() - t)


def main() -> None:
    from test_gpu import _cuda_batch, _step

    from mmm import attention
    from mmm.config import preset
    from mmm.lora import LoraSettings
    from mmm.model import MMMModel

    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    model = MMMModel.build(preset("small-real")).cuda()
    model.set_trainable(projectors=True, llm=LoraSettings(r=8, alpha=16))
    engine = engine_for(model)
    for copies in (1, 16, 64):
        batch = _cuda_batch(model, copies)
        tokens = int((batch["labels"] != -100).sum())
        rates = {}
        for varlen in (False, True, False, True):  # alternated: the machine's clocks drift
            attention.VARLEN_ON_CUDA = varlen
            rates.setdefault(varlen, []).append(steps_per_second(engine, batch))
        print(f"{copies:3d} dialogues a step ({tuple(batch['input_ids'].shape)} ids, {tokens} answer tokens): "
              f"per-sample SDPA {max(rates[False]):.2f} steps/s, varlen {max(rates[True]):.2f} steps/s")
    batch = _cuda_batch(model, 16)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _step(engine, batch)
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    print(f"one 16-dialogue step: {launches} kernel launches")
    print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48))
    print(events.table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=48))


if __name__ == "__main__":
    main()
