"""Batched, KV-cached decoding over input embeddings (the LM never sees media ids): the one decode
loop of the project, used by evaluation (``generate_batch``) and by the server (``StepDecoder``).

:class:`StepDecoder` yields one token per row per :meth:`~StepDecoder.step`, samples each row with
its own settings and generator (a seeded row gets the same tokens whatever it is batched with),
takes new rows in with :meth:`~StepDecoder.merge` (their prefill done separately, KV caches
left-padded to a common length) and lets finished rows go with :meth:`~StepDecoder.keep`. A row may
start from a reused KV prefix (``Past``): only the rest of its prompt is prefilled, and the cached
part is exactly what the full prefill computes, since every input of a prefix token (its id, its
media features, its item number and its shared span position) depends only on the tokens before it.

State between steps: ``cache`` holds every fed token; ``logits`` (B, V) predict the next one;
``pending`` (B,) are the tokens sampled by the last step, fed lazily by the next step or merge,
so that a row finishing on this step costs no forward pass.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Sequence

import torch

from .decode_step import decode_step_for
from .spans import default_positions


@dataclass
class Sampling:
    """Per-row sampling settings (the server's ``SamplingParams`` has the same fields)."""

    temperature: float = 0.0
    """0 is greedy."""
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Past:
    """A reusable KV prefix for one row: per layer (keys, values) of shape (1, H, >= n, D), and how
    many of its tokens the row's prompt shares. A decoder reuses at most all but the prompt's last
    token: the prefill has to run that one to give the logits of the first new token."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    length: int


def sample_row(logits: torch.Tensor, params, gen: torch.Generator | None) -> int:
    """(V,) logits -> one id: greedy at temperature 0, else nucleus sampling."""
    if params.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < params.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return int(torch.multinomial(probs, 1, generator=gen))


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


@functools.lru_cache(maxsize=None)
def _cache_kwarg(forward_type: type) -> str:
    """transformers renamed the LM's ``past_key_values`` argument (and output) to ``cache`` (5.24;
    the old name warns): the name this LM class takes."""
    return "cache" if "cache" in inspect.signature(forward_type.forward).parameters else "past_key_values"


def lm_call(llm, cache, **kw):
    """``llm(**kw)`` with a KV cache, under the argument name its transformers version takes;
    returns (output, its KV cache)."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # peft wraps the LM
    name = _cache_kwarg(type(base))
    out = llm(**{name: cache}, use_cache=True, **kw)
    return out, cache_of(out)


def cache_of(out):
    """The KV cache of an LM output, whichever name its transformers version gives it."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def prefill_after(model, prompts, past: Sequence[Past | None]):
    """The prompt pass of rows on top of reused KV prefixes (None: none), in one LM call: (output,
    positions (B, L), mask (B, L)). Row i is laid out as its reused prefix, left-padded to the
    longest one, then the rest of its prompt, left-padded to the longest rest; the mask hides both
    pads. Positions and item numbers come from each whole prompt, so the new tokens see what a full
    prefill gives them; only they go through the LM."""
    from transformers import DynamicCache

    device = next(model.llm.parameters()).device
    reused = [p.length if p is not None else 0 for p in past]
    ids = [torch.as_tensor(list(p[0]), dtype=torch.long, device=device)[None] for p in prompts]
    width, rest = max(reused), max(t.shape[1] - n for t, n in zip(ids, reused))
    embeds, positions, mask = [], [], []
    for (_, images, audio), t, n in zip(prompts, ids, reused):
        pos, ones = model.lm_positions(t, default_positions(t)), torch.ones_like(t)
        embeds.append(_pad_left(model.embed(t, list(images), list(audio))[:, n:], rest, 1))
        positions.append(torch.cat([_pad_left(pos[:, :n], width, 1), _pad_left(pos[:, n:], rest, 1)], 1))
        mask.append(torch.cat([_pad_left(ones[:, :n], width, 1), _pad_left(ones[:, n:], rest, 1)], 1))
    positions, mask = torch.cat(positions), torch.cat(mask)
    shapes = next(p for p in past if p is not None).layers  # a row without a prefix gets zeros, masked
    cache = DynamicCache()
    for i, (k0, v0) in enumerate(shapes):
        keys = [_pad_left((p.layers[i][0] if p is not None else k0)[:, :, :n], width, 2) for p, n in zip(past, reused)]
        values = [_pad_left((p.layers[i][1] if p is not None else v0)[:, :, :n], width, 2) for p, n in zip(past, reused)]
        cache.update(torch.cat(keys), torch.cat(values), i)
    out, _ = lm_call(model.llm, cache, inputs_embeds=torch.cat(embeds), attention_mask=mask,
                     position_ids=positions[:, width:])
    return out, positions, mask


def _usable(past: Past | None, prompt_len: int) -> Past | None:
    n = min(past.length, prompt_len - 1) if past is not None else 0
    return Past(past.layers, n) if n > 0 else None


class StepDecoder:
    """Rows ``(ids, image_features, audio_features)`` decoded in lockstep; ``past[i]`` (optional)
    is a KV prefix row i reuses."""

    def __init__(self, model, prompts, params: Sequence, past: Sequence[Past | None] | None = None,
                 lean_step: bool = True) -> None:
        self.model, self.params = model, list(params)
        # Prefill is the LM's own forward; each one-token step after it takes the lean path when
        # the LM is a plain Llama (mmm/decode_step.py), with the same arithmetic and fewer ops.
        self.lean = decode_step_for(model.llm) if lean_step else None
        self.device = next(model.llm.parameters()).device
        self.stop_ids = set(model.stop_ids)
        self.gens = [self._generator(p.seed) for p in self.params]
        self.pending: torch.Tensor | None = None  # (B,)
        past = [_usable(p, len(prompt[0])) for p, prompt in zip(past or [None] * len(prompts), prompts)]
        with torch.no_grad():
            if any(p is not None for p in past):
                self._set(*prefill_after(model, prompts, past))
            else:
                self._set(*model.prefill(prompts))

    def _set(self, out, positions, mask) -> None:
        self.cache, self.logits, self.mask = cache_of(out), out.logits[:, -1], mask  # logits (B, V); mask (B, L)
        self.positions = positions[:, -1:]  # (B, 1): position of each row's last fed token

    def _generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(device=self.device).manual_seed(seed % 2**63)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def padded(self) -> bool:
        """Whether some row is left-padded (rows of different lengths share the batch)."""
        return not bool(self.mask.all())

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
        # With no left padding the causal mask of a one-token step hides nothing: None lets the LM
        # skip building a (B, 1, 1, L) mask every step
        mask = self.mask if self.padded else None
        if self.lean is not None:
            self.logits = self.lean(self.pending, self.positions, mask, self.cache)
        else:
            out, self.cache = lm_call(self.model.llm, self.cache, input_ids=self.pending[:, None], attention_mask=mask,
                                      position_ids=self.positions)
            self.logits = out.logits[:, -1]
        self.pending = None

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

    def row_kv(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the KV of row ``row``'s last ``length`` fed tokens, per layer (1, H, length, D):
        what a prefix cache keeps (copies, so the batch's tensors can be freed). Pads inside the row
        (a reused prefix's, see ``prefill_after``) are skipped."""
        cols = self.mask[row].nonzero()[-length:, 0]
        return [(layer.keys[row : row + 1, :, cols], layer.values[row : row + 1, :, cols]) for layer in self.cache.layers]

    def fed(self, row: int) -> int:
        """How many tokens of row ``row`` the cache holds."""
        return int(self.mask[row].sum())

    def _select(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.mask, self.positions, self.logits = self.mask[idx], self.positions[idx], self.logits[idx]
        self.pending = None if self.pending is None else self.pending[idx]
        self.params, self.gens = [self.params[i] for i in rows], [self.gens[i] for i in rows]
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx, :, first:], layer.values[idx, :, first:]

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` (finished ones), and the left padding nobody needs any more."""
        if len(rows) != len(self):
            self._select(rows)

    def _append(self, cache, mask, positions, logits) -> None:
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.positions = torch.cat([self.positions, positions])
        self.logits = torch.cat([self.logits, logits])

    @torch.no_grad()
    def merge(self, other: "StepDecoder") -> None:
        """Append ``other``'s rows (freshly prefilled) to this batch."""
        self._feed()
        other._feed()
        self._append(other.cache, other.mask, other.positions, other.logits)
        self.params, self.gens = self.params + other.params, self.gens + other.gens


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens, temperature, top_p, stop_token_ids, seed, streamer):
    """``prompts``: list of (ids, image_features, audio_features). Returns new ids per prompt,
    without the stop token. ``streamer(i, token_id)`` is called for each new token of prompt i.
    A seeded sampled batch seeds row i with ``seed + i``."""
    params = [Sampling(temperature, top_p, None if seed is None else seed + i) for i in range(len(prompts))]
    decoder = StepDecoder(model, prompts, params)
    if stop_token_ids is not None:
        decoder.stop_ids = set(stop_token_ids)
    results: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # prompt index of each decoder row
    for _ in range(max_new_tokens):
        keep = []
        for r, tok in enumerate(decoder.step()):
            if tok is None:
                continue
            results[live[r]].append(tok)
            if streamer is not None:
                streamer(live[r], tok)
            keep.append(r)
        if not keep:
            break
        decoder.keep(keep)
        live = [live[r] for r in keep]
    return results
