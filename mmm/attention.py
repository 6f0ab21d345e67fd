"""Attention that runs each packed sample on its own: the CPU/GPU-portable varlen path.

A packed row holds several samples whose ``position_ids`` restart at 0. Stock transformers turns
the resets into a block-diagonal (L x L) mask, so every row pays for attention over its whole
length, masked blocks included, and loses SDPA's fused causal kernels (they need ``is_causal``
and no mask). ``packed_sdpa`` instead cuts each row at the resets and runs causal SDPA on each
sample's slice: the work of running the samples one by one, none of the padding of batching them.
It is what flash-attention's varlen kernel does on a GPU, written with the ops every device has;
on a CUDA device in bf16/fp16 that kernel itself runs (torch.nn.attention.varlen), one call a layer.

Rows with a padding mask (batched generation, padded batches) and cached decoding go through
transformers' own SDPA path unchanged.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
from torch.nn import functional as F

PACKED_SDPA = "mmm_packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, position_ids=None,
                **kwargs):
    """(B, H, L, D) query/key/value -> ((B, L, H, D) output, None), as transformers' interface expects."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    if attention_mask is not None or length == 1 or key.shape[2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    bounds = _bounds_once(position_ids, query.shape[0], length)
    if VARLEN_ON_CUDA and dropout == 0.0 and varlen_supported(query, scaling):
        return varlen_attention(query, key, value, bounds, scaling), None
    out_dtype = query.dtype
    if query.device.type == "cpu" and out_dtype == torch.bfloat16:
        # SDPA's CPU kernels in bf16 run the backward ~4x slower than in fp32; the matmuls around
        # them are what bf16 speeds up (docs/PERFORMANCE.md, "bf16 on CPUs")
        query, key, value = query.float(), key.float(), value.float()
    rows = []
    # unbind + split, not slicing: a slice's backward writes its gradient into a zeroed copy of the
    # whole input; split's backward is one cat per row (docs/PERFORMANCE.md, "Packed attention")
    for q, k, v, row_bounds in zip(query.unbind(0), key.unbind(0), value.unbind(0), bounds):
        sizes = [b - a for a, b in row_bounds]
        parts = [
            F.scaled_dot_product_attention(
                qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
                dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=groups > 1,
            )
            for qs, ks, vs in zip(q.split(sizes, dim=1), k.split(sizes, dim=1), v.split(sizes, dim=1))
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).to(out_dtype).contiguous(), None


VARLEN_ON_CUDA = True
"""On a CUDA device in bf16/fp16, run all packed samples in one flash varlen call per layer
(torch.nn.attention.varlen) instead of one SDPA call per sample: a small LM's training step on a
GPU is bound by launches, 17 samples x 30 layers of them in small-real's (docs/GPU.md). False
keeps the per-sample path everywhere (what a benchmark compares against)."""


@functools.cache
def _varlen():
    """torch's varlen attention and the names this torch version gives its options, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


def varlen_supported(query: torch.Tensor, scaling) -> bool:
    found = _varlen()
    if not (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and found):
        return False
    names = found[1]
    default_scale = scaling is None or math.isclose(scaling, query.shape[-1] ** -0.5)
    return bool(names & {"window_size", "is_causal"}) and ("scale" in names or default_scale)


def varlen_attention(query, key, value, bounds, scaling) -> torch.Tensor:
    """(B, H, L, D) packed rows -> (B, L, H, D): every sample of every row in one causal varlen call."""
    varlen_attn, names = _varlen()
    batch, heads, length, dim = query.shape
    starts = [r * length + a for r, row in enumerate(bounds) for a, _ in row]
    cu = torch.tensor([*starts, batch * length], dtype=torch.int32, device=query.device)
    longest = max(b - a for row in bounds for a, b in row)
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], dim) for x in (query, key, value))
    options = {}
    if heads != k.shape[1]:
        if "enable_gqa" in names:
            options["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
    if "window_size" in names:  # torch >= 2.11 spells causal as a window; 2.10 as is_causal
        options["window_size"] = (-1, 0)
    else:
        options["is_causal"] = True
    if "scale" in names and scaling is not None:
        options["scale"] = scaling
    return varlen_attn(q, k, v, cu, cu, longest, longest, **options).view(batch, length, heads, dim)


_last: tuple = (None, -1, None)
"""(position_ids, its version, its bounds) of the latest call."""


def _bounds_once(position_ids: torch.Tensor | None, batch: int, length: int) -> list[list[tuple[int, int]]]:
    """``segment_bounds``, worked out once per forward: every layer receives the same position_ids
    tensor, and on a GPU each computation is a device-to-host sync (32 per step for a 32-layer LM)."""
    global _last
    seen, version, bounds = _last
    if position_ids is not None and seen is position_ids and version == position_ids._version:
        return bounds
    bounds = segment_bounds(position_ids, batch, length)
    if position_ids is not None:
        _last = (position_ids, position_ids._version, bounds)
    return bounds


def segment_bounds(position_ids: torch.Tensor | None, batch: int, length: int) -> list[list[tuple[int, int]]]:
    """Per row, the ``[start, end)`` of each sample: a sample starts wherever its position is 0."""
    if position_ids is None:
        return [[(0, length)]] * batch
    starts = (position_ids.expand(batch, -1) == 0).cpu()
    out = []
    for row in starts:
        cuts = row.nonzero().flatten().tolist()
        if not cuts or cuts[0] != 0:
            cuts = [0, *cuts]
        out.append(list(zip(cuts, [*cuts[1:], length])))
    return out


def packed_mask(batch_size, q_length, kv_length, attention_mask=None, **kwargs):
    """No mask where ``packed_sdpa`` derives causality and sample bounds itself; SDPA's mask elsewhere."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask,
                     **kwargs)


def register() -> str:
    """Make ``PACKED_SDPA`` a transformers attention implementation (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    AttentionMaskInterface.register(PACKED_SDPA, packed_mask)
    return PACKED_SDPA
