"""One decode step of a Llama-family LM in a handful of tensor ops, on the model's own weights.

A Hugging Face forward of one token through a small LM is dispatch-bound on a CPU: its module
calls, mask building and per-layer bookkeeping cost more than its matmuls (docs/SERVING.md,
"Single-client latency"). This step does the same arithmetic with fewer ops, reading the weights
of the ``LlamaForCausalLM`` it is given (no copies, so a model trained later stays in sync), its
own rotary module, and ``transformers``' ``apply_rotary_pos_emb``; keys and values go through the
cache's public ``update``, so prefill, prefix reuse, merging and dropping rows work unchanged.

    step = decode_step_for(model.llm)         # None: not a plain Llama, use the LM's forward
    logits = step(tokens, positions, mask, cache)   # (B,), (B, 1), (B, L) or None -> (B, V)

Prefill stays the LM's own forward: prompts are long and compute-bound, and they carry media
embeddings and the packed attention's positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_step_for(llm) -> "LlamaDecodeStep | None":
    """The lean step for a plain ``LlamaForCausalLM`` (SmolLM2, TinyLlama, the tiny preset's LM);
    None for anything else (adapters still attached, biases, other activations, other families)."""
    cfg = getattr(llm, "config", None)
    if type(llm).__name__ != "LlamaForCausalLM" or cfg is None:
        return None
    plain = (cfg.hidden_act == "silu" and not getattr(cfg, "attention_bias", False)
             and not getattr(cfg, "mlp_bias", False) and getattr(cfg, "pretraining_tp", 1) == 1)
    return LlamaDecodeStep(llm) if plain and _stock_modules(llm) else None


def _stock_modules(llm) -> bool:
    """Every weight the step reads sits in a stock torch module: an adapter injected in place (a
    LoRA layer around ``q_proj``, trainable token rows around ``embed_tokens``) keeps the class
    name ``LlamaForCausalLM`` but adds arithmetic that reading ``.weight`` would skip."""
    linears = [llm.lm_head]
    for layer in llm.model.layers:
        linears += [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    return type(llm.model.embed_tokens) is torch.nn.Embedding and all(type(m) is torch.nn.Linear for m in linears)


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic: normalised in float32, scaled in the input's dtype."""
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(x.dtype)


class LlamaDecodeStep:
    def __init__(self, llm) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.llm, self.base, self.rotate = llm, llm.model, apply_rotary_pos_emb
        cfg = llm.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache) -> torch.Tensor:
        """Feed one token per row at ``positions``; ``mask`` (B, L) marks the real tokens of the
        cache plus this one (None: no row is padded). Returns the next-token logits (B, V)."""
        batch, (heads, kv_heads, dim) = tokens.shape[0], (self.heads, self.kv_heads, self.head_dim)
        x = F.embedding(tokens[:, None], self.base.embed_tokens.weight)
        cos, sin = self.base.rotary_emb(x, positions)
        attend = None if mask is None else mask.bool()[:, None, None, :]
        for i, layer in enumerate(self.base.layers):
            attn, mlp = layer.self_attn, layer.mlp
            y = _rms_norm(x, layer.input_layernorm)
            q = F.linear(y, attn.q_proj.weight).view(batch, 1, heads, dim).transpose(1, 2)
            k = F.linear(y, attn.k_proj.weight).view(batch, 1, kv_heads, dim).transpose(1, 2)
            v = F.linear(y, attn.v_proj.weight).view(batch, 1, kv_heads, dim).transpose(1, 2)
            q, k = self.rotate(q, k, cos, sin)
            keys, values = cache.update(k, v, i)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend, enable_gqa=kv_heads != heads)
            x = x + F.linear(o.transpose(1, 2).reshape(batch, 1, heads * dim), attn.o_proj.weight)
            y = _rms_norm(x, layer.post_attention_layernorm)
            x = x + F.linear(F.silu(F.linear(y, mlp.gate_proj.weight)) * F.linear(y, mlp.up_proj.weight),
                             mlp.down_proj.weight)
        return self.llm.lm_head(_rms_norm(x, self.base.norm))[:, -1]
