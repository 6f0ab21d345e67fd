"""What a preset needs: parameters per part, tokens per media item, and GPU memory per GPU.

The model is built on the meta device (mmm/meta.py), so the counts are the real ones and cost no
memory. The memory model, per GPU, for ``N`` GPUs under DeepSpeed in bf16 (jobs/deepspeed_config.py
builds the same setup), with ``P`` all parameters, ``T`` the trainable ones of the stage:

* weights: bf16, 2 bytes x P. DeepSpeed casts the whole module, frozen encoders included.
  ZeRO-2 keeps them whole on every GPU; ZeRO-3 keeps 2P/N plus the parameters it gathers for the
  module running now (counted as two of the largest modules, the prefetch included).
* gradients: bf16, reduce-scattered, so 2T/N per GPU, plus the fp32 copy of the own partition the
  optimizer steps on (4T/N) and one reduce bucket (DeepSpeed's default 5e8 elements, in bf16, or
  T if smaller). With optimizer offload the fp32 copy lives in CPU memory.
* optimizer: AdamW's fp32 master weights, first and second moments: 12 bytes x T/N (ZeRO-1, 2
  and 3 all partition it); 0 on the GPU with offload (then it is CPU memory: reported apart).
* activations of the LM, per token and layer: what a transformers Llama/Mistral layer keeps for
  its backward pass, 2 x (10h + 2h_kv + 4i) bytes: bf16 norm outputs, q/k/v input, q, k, v, the
  attention output, the MLP's gate, up, activation and product, plus each RMSNorm's input in fp32
  (transformers upcasts it), SDPA keeping no L x L matrix. Measured with autograd's
  saved_tensors_hooks on a 4-layer bf16 Llama (h 256, GQA, SDPA): 11,080 bytes a token and layer
  against 11,008 from this formula. Without gradient checkpointing: all layers. With it: each
  layer's bf16 input (2h bytes) plus one layer recomputed at a time. Stage 1 pays the same: the
  projectors' gradient flows back through the frozen LM. Encoders cost nothing here: training
  reads precomputed features.
* logits: B x L x vocab x 10 bytes, the loss's peak (bf16 logits, their fp32 copy, fp32
  log-softmax; its gradient in the backward pass). Autograd itself keeps ~4 bytes (measured 4.3).
  An upper bound when the loss computes logits only at answer positions.
* 1 GiB for the CUDA context and kernels. Allocator fragmentation is not modelled: keep a margin.
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
"""DeepSpeed's default reduce_bucket_size (elements); jobs/deepspeed_config.py keeps it."""
LOGIT_BYTES = 10
CUDA_CONTEXT = 1 * GiB
ZERO_MODES = ("zero2", "zero2_offload", "zero3")


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
    return {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "intermediate": c.intermediate_size,
            "kv_width": getattr(c, "num_key_value_heads", heads) * head_dim, "vocab": c.vocab_size,
            "max_positions": getattr(c, "max_position_embeddings", None)}


def largest_module(model) -> int:
    """Parameters of the largest module ZeRO-3 gathers at once (a decoder layer, an embedding)."""
    layers = [m for m in model.modules() if not any(True for _ in m.children())]
    blocks = [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "EncoderLayer"))]
    return max(count(m) for m in layers + blocks)


def activation_bytes(shape: dict, context: int, micro_batch: int, checkpointing: bool) -> int:
    h, kv, i, n = shape["hidden"], shape["kv_width"], shape["intermediate"], shape["layers"]
    per_layer = (10 * h + 2 * kv + 4 * i) * BF16 * context * micro_batch
    if checkpointing:
        return n * h * BF16 * context * micro_batch + per_layer
    return n * per_layer


def memory(total: int, trainable: int, largest: int, shape: dict, gpus: int, context: int, micro_batch: int,
           checkpointing: bool) -> dict[str, dict[str, float]]:
    """GiB per GPU by part, for each of ZeRO-2, ZeRO-2 with optimizer offload, and ZeRO-3."""
    acts = activation_bytes(shape, context, micro_batch, checkpointing)
    logits = micro_batch * context * shape["vocab"] * LOGIT_BYTES
    bucket = min(trainable, REDUCE_BUCKET) * BF16
    grads = trainable * BF16 / gpus + bucket
    fp32_grads = trainable * FP32 / gpus
    optim = trainable * ADAM_BYTES / gpus
    common = {"activations": acts, "logits": logits, "cuda_context": CUDA_CONTEXT}
    modes = {
        "zero2": {"weights": total * BF16, "grads": grads + fp32_grads, "optimizer": optim},
        "zero2_offload": {"weights": total * BF16, "grads": grads, "optimizer": 0},
        "zero3": {"weights": total * BF16 / gpus + 2 * largest * BF16, "grads": grads + fp32_grads, "optimizer": optim},
    }
    out = {}
    for name, parts in modes.items():
        parts = {**parts, **common}
        out[name] = {k: round(v / GiB, 2) for k, v in parts.items()}
        out[name]["total"] = round(sum(parts.values()) / GiB, 2)
    out["zero2_offload"]["cpu_per_gpu"] = round((optim + fp32_grads) / GiB, 2)
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
            m = memory(params["total"], trainable[st], largest, shape, gpus, context, micro_batch, gc)
            by_case[f"{st}/{'checkpointed' if gc else 'no_checkpointing'}"] = m
    chosen = by_case[f"{stage}/{'checkpointed' if checkpointing else 'no_checkpointing'}"]
    return {
        "preset": model.config.preset, "gpus": gpus, "context": context, "micro_batch": micro_batch,
        "stage": stage, "gradient_checkpointing": checkpointing,
        "params": params, "trainable": trainable, **tokens, "lm": shape,
        "gib_per_gpu": {mode: chosen[mode]["total"] for mode in ZERO_MODES},
        "cpu_gib_per_gpu_offload": chosen["zero2_offload"]["cpu_per_gpu"],
        "breakdown_gib": chosen,
        "gib_per_gpu_by_case": {case: {mode: m[mode]["total"] for mode in ZERO_MODES} for case, m in by_case.items()},
        "activation_tokens_per_gpu": context * micro_batch,
        "note": "estimates from the memory model in mmm/plan.py, not measurements: keep 10-20% headroom",
    }
