"""ZeRO-2 updates the tiny MMM model exactly as plain data parallelism does.

Two gloo processes on 127.0.0.1 take the same three micro-batches each way: once through
``deepspeed.initialize`` with the config training/deepspeed_config.py derives (ZeRO-2: gradients and
optimizer state partitioned across the ranks, clipping over the partitions), once by hand
(all-reduce-averaged gradients, ``clip_grad_norm_``, AdamW, the same schedule). Rank 0 sees only
image dialogues and rank 1 only audio ones, so each rank leaves one projector unused in its own
forward. Without this check, a worse score from the chain could be blamed on ZeRO-2 (it was once,
on two runs); with it, differences between runs are the data order's.
"""

from __future__ import annotations

import socket

import pytest
import torch

STEPS = 3


def _samples(model, rank: int, n: int = 6) -> list[dict]:
    """Rank 0: one or two images per dialogue; rank 1: one audio clip. Random frozen features."""
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for i in range(n):
        if rank == 0:
            items = [torch.randn(16, model.vision.hidden_size, generator=g) for _ in range(1 + i % 2)]
            marks = "<image></image>" * len(items)
        else:
            items = [torch.randn(50 + 10 * i, model.audio.hidden_size, generator=g)]
            marks = "<audio></audio>"
        msgs = [{"role": "user", "content": f"{marks} what colour is it{' now' * i}?"},
                {"role": "assistant", "content": ["red", "blue", "high", "low"][(i + rank) % 4]}]
        r = model.render(msgs, items)
        key = "image_features" if rank == 0 else "audio_features"
        out.append({"input_ids": r.input_ids, "labels": r.labels, "image_features": [], "audio_features": [],
                    key: items})
    return out


def _fresh():
    """The tiny model as stage 2 trains it, the same weights on every call and every rank."""
    from mmm.config import preset
    from mmm.model import MMMModel

    torch.manual_seed(0)
    model = MMMModel.build(preset("tiny"))
    model.set_trainable(projectors=True, llm=True)
    return model.train()


def _trainable(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


def _batches(model, rank: int) -> list[dict]:
    from mmm.packing import collate_packed, model_inputs

    samples = _samples(model, rank)
    per = len(samples) // STEPS
    pad = model.tokenizer.pad_token_id
    return [model_inputs(collate_packed(samples[s * per:(s + 1) * per], 256, pad)) for s in range(STEPS)]


def _by_hand(model, cfg, batches) -> dict[str, torch.Tensor]:
    from training.deepspeed_config import build_optimizer, build_scheduler, param_groups

    opt = build_optimizer(param_groups(model, cfg.train.weight_decay), cfg)
    sched = build_scheduler(opt, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for batch in batches:
        opt.zero_grad()
        model(**batch).loss.backward()
        for p in trainable:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.distributed.all_reduce(grad)
            p.grad = grad / torch.distributed.get_world_size()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip)
        opt.step()
        sched.step()
    return _trainable(model)


def _zero2(model, cfg, batches) -> dict[str, torch.Tensor]:
    import deepspeed

    from training.deepspeed_config import build_optimizer, build_scheduler, deepspeed_config, param_groups

    opt = build_optimizer(param_groups(model, cfg.train.weight_decay), cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg),
                                      lr_scheduler=build_scheduler(opt, cfg))
    assert engine.zero_optimization_stage() == 2
    for batch in batches:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    return _trainable(engine.module)


def _worker(rank: int, port: int, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    from training.config import load_config
    from training.compat import skip_shm_comm_build

    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config("finetune", overrides=[
        "deepspeed.zero_stage=2", "deepspeed.bf16=false", "resources.num_workers=2", "train.micro_batch_size=1",
        "train.grad_accum=1", "train.lr=1e-3", "train.warmup_steps=1", "train.schedule=cosine",
        f"train.max_steps={STEPS}", "train.grad_clip=0.5"])
    model = _fresh()
    batches, init = _batches(model, rank), _trainable(model)
    reference, zero2 = _by_hand(model, cfg, batches), _zero2(_fresh(), cfg, batches)
    if rank == 0:
        torch.save({"init": init, "reference": reference, "zero2": zero2}, out)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_zero2_matches_plain_data_parallel(tmp_path):
    out = str(tmp_path / "weights.pt")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), out), nprocs=2)
    w = torch.load(out)
    moved = {k for k in w["init"] if not torch.equal(w["init"][k], w["reference"][k])}
    assert any("vision_projector" in k for k in moved) and any("audio_projector" in k for k in moved)
    assert any(k.startswith("llm.") for k in moved)
    for k in w["reference"]:
        step = (w["reference"][k] - w["init"][k]).abs().max()
        torch.testing.assert_close(w["zero2"][k], w["reference"][k], atol=1e-6 + 1e-3 * float(step), rtol=0,
                                   msg=lambda m, k=k: f"{k}: {m}")
