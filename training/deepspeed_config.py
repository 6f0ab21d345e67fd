"""DeepSpeed config, optimizer and lr schedule, all derived from a :class:`TrainConfig`.

Decisions:

* The optimizer is built here and handed to ``deepspeed.initialize`` as a client optimizer, not
  named in the JSON. Without offload that is ``torch.optim.AdamW`` (fused on CUDA), which needs no
  DeepSpeed op; naming "AdamW" in the JSON would make DeepSpeed JIT-build ``fused_adam``.
* With ``offload_optimizer`` the step runs on CPU in ``DeepSpeedCPUAdam`` (ZeRO-Offload refuses a
  plain torch optimizer). That op is JIT-compiled on first use and cached in TORCH_EXTENSIONS_DIR.
* bf16 ``auto`` means bf16 where the worker's device computes it natively (a GPU with bf16, a CPU
  with bf16 instructions: mmm/precision.py) and fp32 elsewhere. fp16 is never used: it needs loss
  scaling and bf16-capable hardware is what the paper trained on.
* The lr schedule is a torch ``LambdaLR`` that DeepSpeed steps once per optimizer step and saves in
  its checkpoints.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from mmm.precision import resolve_bf16
from training.config import TrainConfig


def use_bf16(cfg: TrainConfig) -> bool:
    """Resolve ``deepspeed.bf16`` on this worker's hardware."""
    device = "cuda" if cfg.resources.use_gpu else "cpu"
    return resolve_bf16(cfg.deepspeed.bf16, device, "deepspeed.bf16")


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The ``config`` dict for ``deepspeed.initialize`` (optimizer and scheduler are client objects)."""
    t, ds = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        # Both overlap and contiguous buffers help on GPU; on CPU/gloo they are harmless.
        "overlap_comm": cfg.resources.use_gpu,
        "contiguous_gradients": True,
        "reduce_scatter": True,
    }
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.resources.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.global_batch,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": use_bf16(cfg)},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        # Our own logger reports loss/lr/tokens; DeepSpeed's per-step prints would only duplicate it.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable params in two groups: matrices decay, vectors (biases, norms) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: Iterable[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    t = cfg.train
    kwargs = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-builds cpu_adam the first time

        return DeepSpeedCPUAdam(list(groups), adamw_mode=True, **kwargs)
    fused = cfg.resources.use_gpu and torch.cuda.is_available()
    return torch.optim.AdamW(list(groups), fused=fused or None, **kwargs)


def lr_lambda(cfg: TrainConfig):
    """Multiplier of ``train.lr`` at optimizer step ``s`` (0-based): linear warmup, then the schedule."""
    t = cfg.train

    def f(s: int) -> float:
        if s < t.warmup_steps:
            return (s + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
