"""What a preset needs: parameters per part, tokens per media item, and GPU memory per GPU.

The model is built on the meta device (mmm/meta.py), so the counts are the real ones and cost no
memory. The memory model, per GPU, for ``N`` GPUs under DeepSpeed 0.19 in bf16 as
training/deepspeed_config.py configures it (client AdamW, overlap_comm and contiguous gradients on
GPU workers, DeepSpeed's default buckets), with ``P`` all parameters and ``T`` the trainable ones
of the stage. Line references are to deepspeed/runtime/zero/stage_1_and_2.py. Training runs ZeRO
0-2 only (training/config.py): the ZeRO-3 figure says what ZeRO-3 would need, nothing runs it.

Held the whole step:

* weights: bf16, 2 bytes x P. DeepSpeed casts the whole module, frozen encoders included.
  ZeRO-2 keeps them whole on every GPU; ZeRO-3 would keep 2P/N plus the parameters it gathers for
  the module running now (counted as two of the largest modules, the prefetch included).
* optimizer: AdamW's fp32 master weights, first and second moments: 12 bytes x T/N (ZeRO-1, 2
  and 3 all partition it); 0 on the GPU with offload (then it is CPU memory: reported apart, with
  the fp32 gradients and the bf16 staging copy of the partition DeepSpeed keeps there, 18T/N).
* 1 GiB for the CUDA context and kernels. Allocator fragmentation is not modelled: keep a margin.

Forward and backward (``grads``, ``activations``, ``logits``):

* gradients: the reduce buckets, each ``reduce_bucket_size`` (DeepSpeed's default 5e8 elements:
  the config sets none) bf16 elements allocated whole whatever T is, two of them as overlap_comm
  is on (setup_buckets), plus the bf16 gradients of the own partition copied out of them, 2T/N
  (copy_grads_in_partition). With optimizer offload that copy goes to the CPU fp32 buffer
  instead: the buckets only. ZeRO-3 would hold one bucket and a 2T/N partition.
  Transients of one tensor at a time (autograd's fresh gradient; offload's fp32 cast of it) are
  left out: at most 2-4 bytes x the largest trainable tensor (Mistral's embedding: 0.25-0.5 GiB).
* activations of the LM, per token and layer, what autograd keeps for the backward pass of a
  transformers Llama/Mistral layer under SDPA (no L x L matrix), in bytes:
  trainable LM (stage 2): 2 x (10h + 2h_kv + 4i) + 8 + 4 x heads;
  frozen LM (stage 1, the projectors' gradient flows back through it, so no linear layer keeps
  its input): 2 x (6h + 2h_kv + 3i) + 8 + 4 x heads: each RMSNorm's fp32 input and its
  per-token rsqrt, q, k, v, the attention output and its fp32 logsumexp, the MLP's gate, up and
  activation. Measured: autograd's saved_tensors_hooks around the forward pass of a bf16 Llama
  (h 256, 8 heads, 2 KV heads, i 704, 512 tokens), bytes of the distinct saved tensors that are
  not parameters or buffers, 4 layers minus 2: 11,048 a token and layer trainable, 7,592 frozen
  (both what the formulas give), 10,248 with LoRA r 16 on every linear layer (stage 2 LoRA uses
  the trainable formula, an upper bound). With gradient checkpointing: each layer's bf16 input,
  2h (measured 512 = 2h, both cases), plus one layer recomputed at a time. Encoders cost nothing
  here: training reads precomputed features.
* logits: B x L x vocab x 10 bytes, the loss's peak (bf16 logits, their fp32 copy, fp32
  log-softmax; its gradient in the backward pass). Autograd itself keeps ~4 bytes (measured 4.3).
  An upper bound when the loss computes logits only at answer positions.

Optimizer step (``step_grads``): the end of backward frees the activations, the logits and the
buckets (_release_ipg_buffers); step() then flattens the bf16 partition and casts it to fp32 for
the optimizer: 2T/N + 2T/N + 4T/N = 8T/N at once without offload, nothing on the GPU with it (the
step runs on the CPU). ZeRO-3 would do it per sub-group (1e9 elements): 2T/N + 6 x min(T/N, 1e9).

Peak (``total``) = held + the larger of forward/backward and the step (``peak`` names which).
"""

from __future__ import annotations

import torch

from .encoders import frames_for
from .lora import LoraSettings
from .schema import AUDIO, IMAGE

GiB = 1 << 30
BF16, FP32 = 2, 4
ADAM_BYTES = 12
"""fp32 master weights + two fp32 moments per trainable parameter."""
REDUCE_BUCKET = 5e8
"""DeepSpeed's default reduce_bucket_size (elements); training/deepspeed_config.py sets none."""
ZERO2_BUCKETS = 2
"""Reduce buffers ZeRO-2 allocates: a second one because training/deepspeed_config.py turns
overlap_comm on for GPU workers (setup_buckets). ZeRO-3 allocates one at init."""
ZERO3_SUB_GROUP = 1e9
"""DeepSpeed's default sub_group_size: ZeRO-3 steps the optimizer one sub-group at a time."""
LOGIT_BYTES = 10
CUDA_CONTEXT = 1 * GiB
ZERO_MODES = ("zero2", "zero2_offload", "zero3")
TRAINED_MODES = ("zero2", "zero2_offload")
"""What the training jobs can run (deepspeed.zero_stage 0-2); zero3 is what ZeRO-3 would need."""
ZERO3_NOTE = "zero3: what ZeRO-3 would need; the training jobs support deepspeed.zero_stage 0-2 only"


def count(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def param_counts(model) -> dict[str, int]:
    """Parameters per part; ``llm_added_token_rows`` are the rows the added tokens give the LM."""
    projectors = sum(count(p) for p in model.projector_parts().values())
    parts = {"vision_tower": count(model.vision), "audio_encoder": count(model.audio), "projectors": projectors,
             "llm": count(model.llm)}
    parts["total"] = sum(parts.values())
    base = getattr(model.tokenizer, "base_vocab", None)
    emb = model.llm.get_input_embeddings()
    tied = emb.weight is model.llm.get_output_embeddings().weight
    added = 0 if base is None else (emb.num_embeddings - base) * emb.embedding_dim * (1 if tied else 2)
    parts["llm_added_token_rows"] = added
    return parts


def trainable_counts(model) -> dict[str, int]:
    """Trainable parameters of stage 1 (projectors), stage 2 full, and stage 2 with LoRA (default
    settings, the added tokens' rows included)."""
    out = {}
    for name, llm in (("stage1", False), ("stage2_full", True)):
        model.set_trainable(projectors=True, llm=llm)
        out[name] = count(model, trainable=True)
    try:  # last: LoRA wraps the LM in place
        model.set_trainable(projectors=True, llm=LoraSettings())
        out["stage2_lora"] = count(model, trainable=True)
    except Exception as e:  # peft missing or refusing: the other figures still stand
        out["stage2_lora"] = f"unavailable: {type(e).__name__}: {e}"
    return out


def media_tokens(model) -> dict[str, int]:
    """LM tokens one image and one 30 s clip become."""
    return {"tokens_per_image": model.num_media_tokens(IMAGE, model.vision.num_patches),
            "tokens_per_30s_audio": model.num_media_tokens(AUDIO, frames_for(30 * 16_000))}


def lm_shape(llm) -> dict[str, int]:
    c = llm.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "intermediate": c.intermediate_size, "heads": heads,
            "kv_width": getattr(c, "num_key_value_heads", heads) * head_dim, "vocab": c.vocab_size,
            "max_positions": getattr(c, "max_position_embeddings", None)}


def largest_module(model) -> int:
    """Parameters of the largest module ZeRO-3 gathers at once (a decoder layer, an embedding)."""
    layers = [m for m in model.modules() if not any(True for _ in m.children())]
    blocks = [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "EncoderLayer"))]
    return max(count(m) for m in layers + blocks)


def activation_bytes(shape: dict, context: int, micro_batch: int, checkpointing: bool, frozen_lm: bool = False) -> int:
    """What autograd keeps of the LM's forward pass (formulas and their measurement: module docstring)."""
    h, kv, i, n = shape["hidden"], shape["kv_width"], shape["intermediate"], shape["layers"]
    bf16_units = 6 * h + 2 * kv + 3 * i if frozen_lm else 10 * h + 2 * kv + 4 * i
    per_token = bf16_units * BF16 + 2 * FP32 + shape["heads"] * FP32  # rsqrt of both norms, SDPA's logsumexp
    per_layer = per_token * context * micro_batch
    if checkpointing:
        return n * h * BF16 * context * micro_batch + per_layer
    return n * per_layer


def memory(total: int, trainable: int, largest: int, shape: dict, gpus: int, context: int, micro_batch: int,
           checkpointing: bool, frozen_lm: bool = False) -> dict[str, dict]:
    """GiB per GPU by part, for each of ZeRO-2, ZeRO-2 with optimizer offload, and ZeRO-3.

    ``total`` = weights + optimizer + cuda_context + max(grads + activations + logits, step_grads)."""
    acts = activation_bytes(shape, context, micro_batch, checkpointing, frozen_lm)
    logits = micro_batch * context * shape["vocab"] * LOGIT_BYTES
    partition = trainable / gpus
    bucket = REDUCE_BUCKET * BF16
    optim = ADAM_BYTES * partition
    modes = {
        "zero2": {"weights": total * BF16, "optimizer": optim, "grads": BF16 * partition + ZERO2_BUCKETS * bucket,
                  "step_grads": (BF16 + BF16 + FP32) * partition},
        "zero2_offload": {"weights": total * BF16, "optimizer": 0, "grads": ZERO2_BUCKETS * bucket, "step_grads": 0},
        "zero3": {"weights": total * BF16 / gpus + 2 * largest * BF16, "optimizer": optim,
                  "grads": BF16 * partition + bucket,
                  "step_grads": BF16 * partition + (BF16 + FP32) * min(partition, ZERO3_SUB_GROUP)},
    }
    out = {}
    for name, parts in modes.items():
        parts = {**parts, "activations": acts, "logits": logits, "cuda_context": CUDA_CONTEXT}
        backward = parts["grads"] + acts + logits
        held = parts["weights"] + parts["optimizer"] + CUDA_CONTEXT
        out[name] = {k: round(v / GiB, 2) for k, v in parts.items()}
        out[name]["peak"] = "backward" if backward >= parts["step_grads"] else "step"
        out[name]["total"] = round((held + max(backward, parts["step_grads"])) / GiB, 2)
    out["zero2_offload"]["cpu_per_gpu"] = round((ADAM_BYTES + FP32 + BF16) * partition / GiB, 2)
    return out


def check_context(shape: dict, context: int) -> None:
    positions = shape["max_positions"]
    if positions is not None and context > positions:
        raise ValueError(f"context {context} exceeds the LM's max_position_embeddings {positions}")


def plan(model, gpus: int, context: int, micro_batch: int, checkpointing: bool, stage: str = "stage2_full") -> dict:
    """Everything jobs/plan.py prints, as plain data (``gib_per_gpu`` for ``stage``/``checkpointing``)."""
    if gpus < 1 or context < 1 or micro_batch < 1:
        raise ValueError(f"gpus, context and micro_batch must be >= 1 (got {gpus}, {context}, {micro_batch})")
    shape = lm_shape(model.llm)
    check_context(shape, context)
    params, tokens = param_counts(model), media_tokens(model)
    largest = largest_module(model)
    trainable = trainable_counts(model)
    by_case = {}
    for st in ("stage1", "stage2_full", "stage2_lora"):
        if not isinstance(trainable[st], int):
            continue
        for gc in (False, True):
            m = memory(params["total"], trainable[st], largest, shape, gpus, context, micro_batch, gc,
                       frozen_lm=st == "stage1")
            by_case[f"{st}/{'checkpointed' if gc else 'no_checkpointing'}"] = m
    chosen = by_case[f"{stage}/{'checkpointed' if checkpointing else 'no_checkpointing'}"]
    return {
        "preset": model.config.preset, "gpus": gpus, "context": context, "micro_batch": micro_batch,
        "stage": stage, "gradient_checkpointing": checkpointing,
        "params": params, "trainable": trainable, **tokens, "lm": shape,
        "gib_per_gpu": {mode: chosen[mode]["total"] for mode in ZERO_MODES},
        "training_supports": list(TRAINED_MODES), "zero3_note": ZERO3_NOTE,
        "cpu_gib_per_gpu_offload": chosen["zero2_offload"]["cpu_per_gpu"],
        "breakdown_gib": chosen,
        "gib_per_gpu_by_case": {case: {mode: m[mode]["total"] for mode in ZERO_MODES} for case, m in by_case.items()},
        "activation_tokens_per_gpu": context * micro_batch,
        "note": "estimates from the memory model in mmm/plan.py, not measurements: keep 10-20% headroom",
    }
