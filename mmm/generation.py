"""Batched, KV-cached decoding over input embeddings (the LM never sees media ids)."""

from __future__ import annotations

from typing import Sequence

import torch


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen) -> torch.Tensor:
    """(B, V) logits -> (B,) next ids; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (B, L) ids and attention mask, padded on the left so that every row's
    next token is at position L."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def generate_batch(model, prompts, max_new_tokens, temperature, top_p, stop_token_ids, seed, streamer):
    """``prompts``: list of (ids, image_features, audio_features). Returns new ids per prompt,
    without the stop token. ``streamer(i, token_id)`` is called for each new token of prompt i."""
    device = next(model.llm.parameters()).device
    stops = set(stop_token_ids if stop_token_ids is not None else model.stop_ids)
    out, positions, mask = model.prefill(prompts)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    results: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        nxt = _sample(out.logits[:, -1], temperature, top_p, gen)  # (B,)
        for i, tok in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if tok in stops:
                done[i] = True
            else:
                results[i].append(tok)
                if streamer is not None:
                    streamer(i, tok)
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model.llm(
            input_ids=nxt[:, None], attention_mask=mask, position_ids=positions,
            past_key_values=out.past_key_values, use_cache=True,
        )
    return results
