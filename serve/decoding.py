"""Step-by-step batched decoding with per-request sampling, and rows that join and leave.

``mmm.generation.generate_batch`` runs a fixed batch under one temperature, top_p and seed until
every row stops. A server batch changes under it: requests arrive while others are half-way
through (continuous batching), and each has its own sampling settings, ``max_tokens`` and stop
strings. So this decoder yields one token per row per :meth:`step`, samples each row with its own
settings and generator (a seeded request gets the same tokens whatever it is batched with),
takes new rows in with :meth:`merge` (their prefill done separately, KV caches left-padded to a
common length) and lets finished rows go with :meth:`keep`. Greedy output equals
``MMMModel.generate_batch`` (tested).

State between steps: ``cache`` holds every fed token; ``logits`` (B, V) predict the next one;
``pending`` (B,) are the tokens sampled by the last step, fed lazily by the next step or merge,
so that a row finishing on this step costs no forward pass.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .openai_schema import SamplingParams


def sample_row(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """(V,) logits -> one id: greedy at temperature 0, else nucleus sampling."""
    if params.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < params.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return int(torch.multinomial(probs, 1, generator=gen))


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class StepDecoder:
    """Rows ``(ids, image_features, audio_features)`` decoded in lockstep."""

    def __init__(self, model, prompts, params: Sequence[SamplingParams]) -> None:
        self.model, self.params = model, list(params)
        self.device = next(model.llm.parameters()).device
        self.stop_ids = set(model.stop_ids)
        self.gens = [self._generator(p.seed) for p in self.params]
        self.pending: torch.Tensor | None = None  # (B,)
        with torch.no_grad():
            out, positions, self.mask = model.prefill(prompts)  # mask: (B, L)
        self.cache, self.logits = out.past_key_values, out.logits[:, -1]  # cache: L tokens; logits (B, V)
        self.positions = positions[:, -1:]  # (B, 1): position of each row's last fed token

    def _generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(device=self.device).manual_seed(seed % 2**63)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def can_merge(self) -> bool:
        """Only plain growing caches can be padded and concatenated (not sliding-window ones)."""
        return all(type(layer).__name__ == "DynamicLayer" for layer in getattr(self.cache, "layers", [None]))

    @torch.no_grad()
    def _feed(self) -> None:
        if self.pending is None:
            return
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        self.positions = self.positions + 1
        out = self.model.llm(input_ids=self.pending[:, None], attention_mask=self.mask, position_ids=self.positions,
                             past_key_values=self.cache, use_cache=True)
        self.cache, self.logits, self.pending = out.past_key_values, out.logits[:, -1], None

    @torch.no_grad()
    def step(self) -> list[int | None]:
        """The next token of every row; None where a row emitted a stop token (it is finished)."""
        self._feed()
        greedy = self.logits.argmax(-1).tolist()
        tokens: list[int | None] = []
        for i, params in enumerate(self.params):
            tok = greedy[i] if params.temperature <= 0 else sample_row(self.logits[i], params, self.gens[i])
            tokens.append(None if tok in self.stop_ids else tok)
        pad = self.model.tokenizer.pad_token_id
        self.pending = torch.tensor([pad if t is None else t for t in tokens], device=self.device)
        return tokens

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` (finished ones), and the left padding nobody needs any more."""
        if len(rows) == len(self):
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.mask, self.positions, self.logits = self.mask[idx], self.positions[idx], self.logits[idx]
        self.pending = None if self.pending is None else self.pending[idx]
        self.params, self.gens = [self.params[i] for i in rows], [self.gens[i] for i in rows]
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx, :, first:], layer.values[idx, :, first:]

    @torch.no_grad()
    def merge(self, other: "StepDecoder") -> None:
        """Append ``other``'s rows (freshly prefilled) to this batch."""
        self._feed()
        other._feed()
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(other.mask, width, 1)])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.positions = torch.cat([self.positions, other.positions])
        self.logits = torch.cat([self.logits, other.logits])
        self.params, self.gens = self.params + other.params, self.gens + other.gens
