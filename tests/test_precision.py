"""bf16 where the device computes it natively: the CPU flag check, the configs that follow it, and
the packed attention that keeps fp32 kernels under a bf16 model on a CPU."""

import numpy as np
import pytest
import torch

from mmm import precision

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
NEOVERSE_V1 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpu_flags_name_native_bf16():
    assert precision.cpu_flags_have_bf16(ZEN4)
    assert precision.cpu_flags_have_bf16(NEOVERSE_V1)
    assert not precision.cpu_flags_have_bf16(SKYLAKE)
    assert not precision.cpu_flags_have_bf16("model name\t: bf16 in a name is not a flag\n")


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu_and_explicit_values_win(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native)
    assert precision.resolve_bf16("auto", "cpu", "x") is native
    assert precision.resolve_bf16(False, "cpu", "x") is False
    assert precision.resolve_bf16(True, "cpu", "x") is True  # emulated where not native: slow, but it runs
    with pytest.raises(ValueError, match="deepspeed.bf16 must be auto, true or false, got 'yes'"):
        precision.resolve_bf16("yes", "cpu", "deepspeed.bf16")


@pytest.mark.parametrize("native", [True, False])
def test_training_precision_follows_the_cpu_except_where_a_preset_fixes_it(monkeypatch, native):
    from training.config import load_config
    from training.deepspeed_config import deepspeed_config

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native)
    real = load_config("pretrain", overrides=["model.preset=small-real"])
    assert deepspeed_config(real)["bf16"]["enabled"] is native
    tiny = load_config("finetune")  # the tiny recipe's figures are fp32's
    assert deepspeed_config(tiny)["bf16"]["enabled"] is False


def test_features_run_the_encoders_in_bf16_when_asked(tmp_path):
    from mmm.config import preset
    from mmm.encoders import build_encoders
    from pipelines.features import EncodeMedia
    from pipelines.storage import StorageConfig

    cfg = preset("tiny")
    cfg.encoders_bf16 = True
    actor = EncodeMedia(cfg, str(tmp_path / "features"), StorageConfig(), num_cpus=1)
    fp32_vision, _ = build_encoders(preset("tiny"))
    assert all(p.dtype == torch.bfloat16 for enc in actor.encoders.values() for p in enc.parameters())
    pixels = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    got, want = actor.encoders["image"].encode_pixels(pixels), fp32_vision.encode_pixels(pixels)
    assert all(g.dtype == torch.float32 for g in got)
    for g, w in zip(got, want):
        assert torch.nn.functional.cosine_similarity(g, w, dim=-1).min() > 0.99


def test_packed_attention_computes_in_fp32_under_a_bf16_model_on_cpu():
    """SDPA's bf16 CPU kernels are slower than fp32's (backward ~4x): the packed path upcasts, so a
    bf16 call returns exactly the fp32 result rounded to bf16, and gradients come back in bf16."""
    from mmm.attention import packed_sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 12, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])  # two packed samples
    out, _ = packed_sdpa(None, q, k, v, None, position_ids=positions)
    with torch.no_grad():
        reference, _ = packed_sdpa(None, q.float(), k.float(), v.float(), None, position_ids=positions.clone())
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference.bfloat16())
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_a_cpu_run_exports_fp32_after_training_in_bf16(tmp_path):
    """DeepSpeed trains a bf16 copy; CPU evaluation, stage 2 and serving read the export in fp32."""
    from mmm.config import preset
    from mmm.model import MMMModel
    from training.config import load_config
    from training.stages import FINAL, export

    model = MMMModel.build(preset("tiny")).to(torch.bfloat16)
    export(model, str(tmp_path / "model"), load_config("pretrain", overrides=["deepspeed.bf16=true"]))
    loaded = MMMModel.from_pretrained(str(tmp_path / FINAL))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
