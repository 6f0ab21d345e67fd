"""jobs/plan.py builds the paper's presets at full size on the meta device (no weights, no hub) and
says what they need; a context beyond the LM's positions is refused wherever a model is built."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs import plan as plan_job  # noqa: E402

# The public models' parameter counts (hub model cards / safetensors index), without MMM's added rows.
PUBLIC_LM = {"tinyllama": 1_100_048_384, "mistral": 7_241_732_096}
HIDDEN = {"tinyllama": 2048, "mistral": 4096}


def check(result: dict, preset: str) -> None:
    params = result["params"]
    base = params["llm"] - params["llm_added_token_rows"]
    assert abs(base - PUBLIC_LM[preset]) <= 0.01 * PUBLIC_LM[preset], (base, PUBLIC_LM[preset])
    assert base == PUBLIC_LM[preset]  # the kept configs are the public ones exactly
    assert params["llm_added_token_rows"] == 9 * HIDDEN[preset] * 2  # 6 media + 2 turn + pad, untied
    assert params["total"] == sum(params[k] for k in ("vision_tower", "audio_encoder", "projectors", "llm"))
    assert 92e6 < params["vision_tower"] < 94e6 and 87e6 < params["audio_encoder"] < 89e6  # SigLIP-B, Whisper-small enc
    assert (result["tokens_per_image"], result["tokens_per_30s_audio"]) == (576, 375)
    t = result["trainable"]
    assert t["stage1"] == params["projectors"] and t["stage2_full"] == params["projectors"] + params["llm"]
    assert params["projectors"] < t["stage2_lora"] < t["stage2_full"]
    gib = result["gib_per_gpu"]
    assert set(gib) == {"zero2", "zero2_offload", "zero3"} and all(v > 0 for v in gib.values())
    assert gib["zero2_offload"] < gib["zero2"] and gib["zero3"] < gib["zero2"]  # each saving shows


def test_plan_mistral_through_the_command_line():
    out = subprocess.run([sys.executable, "jobs/plan.py", "--preset", "mistral", "--gpus", "8", "--context", "8192"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    check(result, "mistral")
    assert result["lm"]["max_positions"] == 32768 and result["context"] == 8192


def test_plan_tinyllama_and_memory_scales(capsys):
    result = plan_job.main(["--preset", "tinyllama", "--gpus", "4", "--context", "2048"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    check(result, "tinyllama")
    more = plan_job.main(["--preset", "tinyllama", "--gpus", "8", "--context", "2048", "--micro-batch", "2",
                          "--gradient-checkpointing"])
    w = result["breakdown_gib"]
    m = more["breakdown_gib"]
    assert m["zero2"]["weights"] == w["zero2"]["weights"]  # ZeRO-2 keeps weights whole
    assert m["zero2"]["optimizer"] == pytest.approx(w["zero2"]["optimizer"] / 2, abs=0.01)  # partitioned over GPUs
    assert m["zero3"]["weights"] < w["zero3"]["weights"]
    assert m["zero2"]["activations"] < w["zero2"]["activations"]  # checkpointing beats a doubled batch


def test_plan_refuses_a_context_beyond_the_positions():
    with pytest.raises(SystemExit) as e:
        plan_job.main(["--preset", "tinyllama", "--context", "8192"])
    assert "8192" in str(e.value.code) and "2048" in str(e.value.code), e.value.code


def test_model_refuses_max_context_beyond_positions():
    """Checked when a model is built or loaded (MMMModel construction), naming both numbers."""
    from mmm.config import preset
    from mmm.meta import build_meta

    assert preset("tinyllama").llm.max_context <= 2048  # TinyLlama's config.json: 2048 positions
    cfg = preset("tinyllama")
    cfg.llm.max_context = 8192
    with pytest.raises(ValueError, match=r"max_context 8192 .*max_position_embeddings 2048"):
        build_meta(cfg)
    tiny = preset("tiny")
    tiny.llm.max_context = tiny.llm.max_position_embeddings + 1
    with pytest.raises(ValueError, match=f"max_context {tiny.llm.max_context} .*{tiny.llm.max_position_embeddings}"):
        build_meta(tiny)
