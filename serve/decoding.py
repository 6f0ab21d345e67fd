"""Step-by-step batched decoding with per-request sampling, for the server's dynamic batches.

``mmm.generation.generate_batch`` runs a whole batch under one temperature, top_p and seed until
every row emits a stop token. A server batch mixes requests: one greedy, one at temperature 0.8
with its own seed, one whose stop string appeared after 3 tokens. So this decoder yields one
token per row per :meth:`step` (the caller streams it, and ends rows by ``max_tokens`` or stop
strings with :meth:`finish`), samples each row with its own settings and generator (a seeded
request gets the same tokens whatever it is batched with), and stops calling the LM once
every row is finished. Greedy output equals ``MMMModel.generate_batch`` (tested).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .openai_schema import SamplingParams


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (B, L) ids and attention mask, padded on the left so that every row's
    next token is at position L."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


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


class StepDecoder:
    """One batch of prompts ``(ids, image_features, audio_features)`` decoded in lockstep."""

    def __init__(self, model, prompts, params: Sequence[SamplingParams]) -> None:
        self.model, self.params = model, list(params)
        self.device = next(model.llm.parameters()).device
        self.stop_ids = set(model.stop_ids)
        ids, mask = left_pad([p[0] for p in prompts], model.tokenizer.pad_token_id)
        self.mask = mask.to(self.device)  # (B, L)
        self.positions = (self.mask.cumsum(-1) - 1).clamp_min(0)  # (B, L): left pads do not shift positions
        self.gens = [self._generator(p.seed) for p in self.params]
        self.done = [False] * len(prompts)
        self._pending: torch.Tensor | None = None  # (B,) tokens sampled but not yet fed to the LM
        with torch.no_grad():
            embeds = model.embed(ids.to(self.device), [f for p in prompts for f in p[1]],
                                 [f for p in prompts for f in p[2]])  # (B, L, D)
            self.out = model.llm(inputs_embeds=embeds, attention_mask=self.mask, position_ids=self.positions,
                                 use_cache=True)

    def _generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(device=self.device).manual_seed(seed % 2**63)

    @property
    def finished(self) -> bool:
        return all(self.done)

    def finish(self, row: int) -> None:
        """The caller ended this row (max_tokens, a stop string): stop sampling for it."""
        self.done[row] = True

    @torch.no_grad()
    def step(self) -> list[int | None]:
        """The next token of every row; None for a finished row or one that just emitted a stop token."""
        if self.finished:
            return [None] * len(self.done)
        if self._pending is not None:  # feed last step's tokens only now, when they are needed
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.done), 1)], dim=1)
            self.positions = self.positions[:, -1:] + 1
            self.out = self.model.llm(input_ids=self._pending[:, None], attention_mask=self.mask,
                                      position_ids=self.positions, past_key_values=self.out.past_key_values,
                                      use_cache=True)
        logits = self.out.logits[:, -1]  # (B, V)
        greedy = logits.argmax(-1).tolist()
        tokens: list[int | None] = []
        for i, done in enumerate(self.done):
            tok = None if done else greedy[i] if self.params[i].temperature <= 0 else \
                sample_row(logits[i], self.params[i], self.gens[i])
            if tok is not None and tok in self.stop_ids:
                self.done[i], tok = True, None
            tokens.append(tok)
        pad = self.model.tokenizer.pad_token_id
        self._pending = torch.tensor([pad if t is None else t for t in tokens], device=self.device)
        return tokens
