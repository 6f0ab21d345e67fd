"""The model side of the server, without Ray: one batch of parsed requests in, a stream of
per-request events out. The Serve deployment wraps :meth:`ChatService.run_batch` in
``@serve.batch``; tests drive it directly with a fake engine.

Per batch: look every media item up in the feature cache; decode and encode the misses (deduped
across the batch, one encoder call per modality); render the prompts; check them against the
context; then decode all rows in lockstep. Each ``yield`` is a list with one entry per request:
``None`` (nothing new), an event dict, or ``StopIteration`` once that request is over.

Events: ``{"error": APIError}``; ``{"start": True, "prompt_tokens": n}`` (streaming only);
``{"delta": text}`` (streaming only); ``{"done": True, "text", "finish_reason", "prompt_tokens",
"completion_tokens", "delta"}`` (``delta``: the streamed tail, ``text``: the whole completion).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from mmm.media import media_id

from .cache import FeatureCache
from .config import RequestLimits
from .detok import TextStream
from .engine import ChatEngine
from .errors import APIError, bad_request
from .openai_schema import ChatRequest


@dataclass
class _Job:
    req: ChatRequest
    prompt: list[int]
    features: list
    budget: int
    text: TextStream
    tokens: int = 0
    finish_reason: str | None = None


@dataclass
class _Stats:
    requests: int = 0
    batches: int = 0
    max_batch: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    encoded: dict = field(default_factory=lambda: {"image": 0, "audio": 0})
    encode_s: float = 0.0


class ChatService:
    def __init__(self, engine: ChatEngine, cache: FeatureCache, limits: RequestLimits = RequestLimits()) -> None:
        self.engine, self.cache, self.limits = engine, cache, limits
        self._stats = _Stats()

    def stats(self) -> dict[str, Any]:
        s = self._stats
        return {"model": self.engine.model_id, "cache": self.cache.stats(), "requests": s.requests,
                "batches": s.batches, "max_batch": s.max_batch, "rejected": s.rejected,
                "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                "encoded": dict(s.encoded), "encode_seconds": round(s.encode_s, 3)}

    async def run_batch(self, requests: list[ChatRequest]) -> AsyncIterator[list]:
        self._stats.requests += len(requests)
        self._stats.batches += 1
        self._stats.max_batch = max(self._stats.max_batch, len(requests))
        prepared = await asyncio.to_thread(self._prepare, requests)
        jobs: dict[int, _Job] = {}
        first: list = []
        for i, p in enumerate(prepared):
            if isinstance(p, APIError):
                self._stats.rejected += 1
                first.append({"error": p})
            else:
                jobs[i] = p
                first.append({"start": True, "prompt_tokens": len(p.prompt)} if p.req.stream else None)
        yield first
        over = {i for i, p in enumerate(prepared) if isinstance(p, APIError)}
        if jobs:
            async for events in self._decode(jobs, len(requests), over):
                yield events

    async def _decode(self, jobs: dict[int, _Job], n: int, over: set[int]) -> AsyncIterator[list]:
        order = list(jobs)
        decoder = await asyncio.to_thread(
            self.engine.start, [(jobs[i].prompt, *self._split(jobs[i])) for i in order],
            [jobs[i].req.params for i in order])
        while len(over) < n:
            tokens = await asyncio.to_thread(decoder.step)
            events: list = [StopIteration if i in over else None for i in range(n)]
            for row, i in enumerate(order):
                job = jobs[i]
                if i in over:
                    continue
                delta = self._advance(job, tokens[row])
                if job.finish_reason is not None:
                    decoder.finish(row)
                    over.add(i)
                    events[i] = self._done(job, delta + job.text.flush())
                elif delta and job.req.stream:
                    events[i] = {"delta": delta}
            yield events
        yield [StopIteration] * n

    @staticmethod
    def _advance(job: _Job, token: int | None) -> str:
        if token is None:  # a stop token (or the decoder ended the row)
            job.finish_reason = "stop"
            return ""
        job.tokens += 1
        delta = job.text.push(token)
        if job.text.stopped:
            job.finish_reason = "stop"
        elif job.tokens >= job.budget:
            job.finish_reason = "length"
        return delta

    def _done(self, job: _Job, delta: str) -> dict:
        self._stats.prompt_tokens += len(job.prompt)
        self._stats.completion_tokens += job.tokens
        return {"done": True, "text": job.text.text, "delta": delta if job.req.stream else "",
                "finish_reason": job.finish_reason, "prompt_tokens": len(job.prompt), "completion_tokens": job.tokens}

    @staticmethod
    def _split(job: _Job) -> tuple[list, list]:
        image = [f for item, f in zip(job.req.media, job.features) if item.modality == "image"]
        audio = [f for item, f in zip(job.req.media, job.features) if item.modality == "audio"]
        return image, audio

    # ---- preparation (in a worker thread) ------------------------------------------------
    def _prepare(self, requests: list[ChatRequest]) -> list[_Job | APIError]:
        keys = [[(media_id(m.data), self.engine.encoder_name(m.modality)) for m in r.media] for r in requests]
        found, failed = self._features(requests, keys)
        out: list[_Job | APIError] = []
        for req, req_keys in zip(requests, keys):
            bad = next((failed[k] for k in req_keys if k in failed), None)
            out.append(bad or self._job(req, [found[k] for k in req_keys]))
        return out

    def _features(self, requests, keys) -> tuple[dict, dict]:
        """Features for every key of the batch (cache first, then one encode per modality);
        keys whose media failed to decode map to their 400 in the second dict."""
        found, failed, todo = {}, {}, {}
        for req, req_keys in zip(requests, keys):
            for item, key in zip(req.media, req_keys):
                if key in found or key in todo:
                    continue
                hit = self.cache.get(key) if self.cache.enabled else None
                if hit is not None:
                    found[key] = hit
                else:
                    todo[key] = item
        decoded: dict[str, list] = {"image": [], "audio": []}
        for key, item in todo.items():
            try:
                decoded[item.modality].append((key, self.engine.decode_media(item.modality, item.data, item.param)))
            except ValueError as e:  # mmm.media.MediaError: corrupt, not audio, too long, ...
                failed[key] = bad_request(str(e), item.param, f"invalid_{item.modality}")
        for modality, pairs in decoded.items():
            if not pairs:
                continue
            t0 = time.perf_counter()
            feats = self.engine.encode(modality, [x for _, x in pairs])
            self._stats.encode_s += time.perf_counter() - t0
            self._stats.encoded[modality] += len(pairs)
            for (key, _), f in zip(pairs, feats):
                found[key] = f
                if self.cache.enabled:
                    self.cache.put(key, f)
        return found, failed

    def _job(self, req: ChatRequest, features: list) -> _Job | APIError:
        try:
            prompt = self.engine.render(req.messages, features)
        except ValueError as e:  # PlaceholderMismatchError: the parser and renderer disagree
            return bad_request(f"the conversation could not be rendered: {e}", "messages", "invalid_messages")
        limit, n, want = self.engine.max_context, len(prompt), req.params.max_tokens
        if n >= limit:
            return bad_request(f"the conversation is {n} tokens (media included); this model's context is {limit} "
                               "tokens, leaving no room for a reply", "messages", "context_length_exceeded")
        if want is not None and n + want > limit:
            return bad_request(f"the conversation ({n} tokens) plus max_tokens ({want}) exceeds this model's "
                               f"{limit}-token context", "max_tokens", "context_length_exceeded")
        budget = want if want is not None else min(self.limits.default_max_tokens, limit - n)
        stream = TextStream(self.engine.detokenize, req.params.stop)
        return _Job(req=req, prompt=prompt, features=features, budget=budget, text=stream)
