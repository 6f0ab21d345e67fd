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
    assert params["llm_added_token_rows"] == 8 * HIDDEN[preset] * 2  # 6 media + 2 turn, untied; <unk> is the pad
    assert params["total"] == sum(params[k] for k in ("vision_tower", "audio_encoder", "projectors", "llm"))
    assert 92e6 < params["vision_tower"] < 94e6 and 87e6 < params["audio_encoder"] < 89e6  # SigLIP-B, Whisper-small enc
    assert (result["tokens_per_image"], result["tokens_per_30s_audio"]) == (576, 375)
    t = result["trainable"]
    assert t["stage1"] == params["projectors"] and t["stage2_full"] == params["projectors"] + params["llm"]
    assert params["projectors"] < t["stage2_lora"] < t["stage2_full"]
    gib = result["gib_per_gpu"]
    assert set(gib) == {"zero2", "zero2_offload", "zero3"} and all(v > 0 for v in gib.values())
    assert gib["zero2_offload"] < gib["zero2"] and gib["zero3"] < gib["zero2"]  # each saving shows
    assert result["training_supports"] == ["zero2", "zero2_offload"] and "0-2" in result["zero3_note"]


def test_plan_mistral_through_the_command_line():
    out = subprocess.run([sys.executable, "jobs/plan.py", "--preset", "mistral", "--gpus", "8", "--context", "8192"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    check(result, "mistral")
    assert "zero3 (would need)" in out.stdout and "training jobs support deepspeed.zero_stage 0-2" in out.stdout
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
    from mmm.plan import GiB, activation_bytes

    stage1 = plan_job.main(["--preset", "tinyllama", "--gpus", "4", "--context", "2048", "--stage", "stage1"])
    frozen = stage1["breakdown_gib"]["zero2"]["activations"]  # stage 1's LM is frozen: fewer tensors kept
    assert frozen == round(activation_bytes(result["lm"], 2048, 1, False, frozen_lm=True) / GiB, 2) < w["zero2"]["activations"]


def test_plan_refuses_a_context_beyond_the_positions(capsys):
    with pytest.raises(SystemExit) as e:
        plan_job.main(["--preset", "tinyllama", "--context", "8192"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "8192" in err and "2048" in err, (e.value.code, err)  # the docstring's status


@pytest.mark.parametrize("option,value", [("--context", "0"), ("--context", "-5"), ("--gpus", "0"), ("--micro-batch", "-1")])
def test_plan_refuses_a_count_below_one(capsys, option, value):
    """--context 0 used to plan at the preset's default context without a word."""
    with pytest.raises(SystemExit) as e:
        plan_job.main(["--preset", "tinyllama", option, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and option in err and f"must be >= 1, got {value}" in err, err


def _hf_tokenizer(specials: dict[str, str]):
    """A real HF tokenizer with Llama's first ids (<unk> 0, <s> 1, </s> 2) and the given special tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), **specials)


@pytest.mark.parametrize("specials", [
    {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},  # Mistral-7B-Instruct-v0.2
    {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"},  # TinyLlama-Chat
    {"bos_token": "<s>", "eos_token": "</s>"},  # no unk: a new <|pad|>
    {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"},  # pad is the end token, no unk
    {"unk_token": "<unk>", "eos_token": "</s>", "pad_token": "a"},  # a usable pad of its own
])
def test_meta_tokenizer_adds_the_rows_extend_tokenizer_adds(specials):
    """The planner's ids-only tokenizer grows the vocabulary exactly as the real extend_tokenizer
    does: the unk token is reused as pad when there is one (Llama and Mistral have <unk>)."""
    from mmm.meta import IdsOnlyTokenizer
    from mmm.tokenizer import extend_tokenizer

    real = extend_tokenizer(_hf_tokenizer(specials))
    ids = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}
    meta = IdsOnlyTokenizer(4, 2, {role: (token, ids[token]) for role, token in specials.items()})
    assert len(meta) == len(real)
    assert (meta.pad_token, meta.pad_token_id) == (real.pad_token, real.pad_token_id)
    for token in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|audio_pad|>"):
        assert meta.convert_tokens_to_ids(token) == real.convert_tokens_to_ids(token)


def test_kept_tokenizers_reuse_unk_as_pad():
    from mmm.meta import SPECIAL_TOKENS, IdsOnlyTokenizer

    for name, specials in SPECIAL_TOKENS.items():
        tok = IdsOnlyTokenizer(32000, 2, specials)
        assert (tok.pad_token, tok.pad_token_id, len(tok)) == ("<unk>", 0, 32000 + 8), name


SHAPE = {"layers": 4, "hidden": 256, "intermediate": 704, "heads": 8, "kv_width": 64, "vocab": 512, "max_positions": 4096}


def test_reduce_buckets_are_whole_and_two_on_gpus():
    """DeepSpeed allocates reduce_bucket_size bf16 elements whatever the trainable count, twice with
    overlap_comm (stage_1_and_2.py setup_buckets), which training/deepspeed_config.py turns on for GPUs."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from mmm import plan
    from training.config import load_config
    from training.deepspeed_config import deepspeed_config

    zero = deepspeed_config(load_config("finetune", overrides=["resources.use_gpu=true", "deepspeed.bf16=false"]))
    resolved = DeepSpeedZeroConfig(**zero["zero_optimization"])
    assert resolved.overlap_comm is True and plan.ZERO2_BUCKETS == 2
    assert resolved.reduce_bucket_size == plan.REDUCE_BUCKET
    trainable, gpus = 1_000_000, 4  # far below one bucket
    m = plan.memory(10 * trainable, trainable, trainable, SHAPE, gpus, 128, 1, False)
    bucket = plan.REDUCE_BUCKET * plan.BF16 / plan.GiB
    assert m["zero2"]["grads"] == round(2 * bucket + 2 * trainable / gpus / plan.GiB, 2)
    assert m["zero2_offload"]["grads"] == round(2 * bucket, 2)  # no gradient partition stays on the GPU
    assert m["zero3"]["grads"] == round(bucket + 2 * trainable / gpus / plan.GiB, 2)


def test_peak_is_the_larger_of_backward_and_step():
    """The fp32 gradient copy exists only in the optimizer step, after activations, logits and
    buckets are freed: the peak is the larger phase, not the sum."""
    from mmm import plan

    def check_total(mode: dict) -> float:
        backward = mode["grads"] + mode["activations"] + mode["logits"]
        assert mode["peak"] == ("backward" if backward >= mode["step_grads"] else "step")
        return mode["weights"] + mode["optimizer"] + mode["cuda_context"] + max(backward, mode["step_grads"])

    big = 4_000_000_000  # trainable: the step's 8 bytes a parameter outweigh a short context's activations
    short = plan.memory(big, big, 10**6, SHAPE, 1, 64, 1, False)
    assert short["zero2"]["peak"] == "step" and short["zero2"]["step_grads"] == round(8 * big / plan.GiB, 2)
    assert short["zero2_offload"]["peak"] == "backward" and short["zero2_offload"]["step_grads"] == 0
    long = plan.memory(big, big, 10**6, SHAPE, 1, 2**20, 1, False)
    assert long["zero2"]["peak"] == "backward"
    for m in (short, long):
        for mode in plan.ZERO_MODES:
            assert m[mode]["total"] == pytest.approx(check_total(m[mode]), abs=0.03)


def test_activations_match_the_measured_bytes_per_token_and_layer():
    """The figures mmm/plan.py's docstring gives for its saved-tensors measurement on this shape."""
    from mmm.plan import activation_bytes

    per = {frozen: activation_bytes(SHAPE, 1, 1, False, frozen) / SHAPE["layers"] for frozen in (False, True)}
    assert per == {False: 11_048, True: 7_592}
    assert activation_bytes(SHAPE, 1, 1, True, True) == SHAPE["layers"] * 2 * 256 + 7_592


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
