"""The model side of the server, without Ray: what happens to a request between parsing and
decoding, and the events it produces. ``serve.scheduler`` drives it; tests use a fake engine.

:meth:`ChatService.prepare` takes a group of requests: looks every media item up in the feature
cache, decodes and encodes the misses (deduped across the group, one encoder call per modality),
renders the prompts and checks them against the context. :meth:`ChatService.advance` turns each
decoded token into the request's next event.

Each request hears :class:`serve.events.Event` objects: its error, or (streaming) a start, text
chunks, then a finished event with the whole text and usage.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from mmm.chat import content_to_text

from .cache import FeatureCache
from .config import RequestLimits
from .detok import TextStream
from .engine import ChatEngine, Prompt
from .errors import APIError, bad_request, internal_error
from .events import Event
from .openai_schema import ChatRequest

log = logging.getLogger(__name__)


@dataclass
class _Job:
    req: ChatRequest
    prompt: list[int]
    features: list
    media: list[str]
    """Content hash of each media item, in order."""
    budget: int
    text: TextStream
    tokens: int = 0
    finish_reason: str | None = None


@dataclass
class _Stats:
    requests: int = 0
    steps: int = 0
    row_steps: int = 0
    """Sum over decode steps of the rows decoded together: row_steps / steps is the mean batch."""
    max_batch: int = 0
    rejected: int = 0
    cancelled: int = 0
    """Requests whose client went away before the end: their rows left the batch at once, and
    those still waiting were never prepared."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    encoded: dict = field(default_factory=lambda: {"image": 0, "audio": 0})
    encode_s: float = 0.0
    prepare_s: float = 0.0
    """Cache lookups + media decode + encode + render, summed over batches."""
    generate_s: float = 0.0
    """Prefill + decode steps, summed over batches."""


class ChatService:
    def __init__(self, engine: ChatEngine, cache: FeatureCache, limits: RequestLimits = RequestLimits()) -> None:
        self.engine, self.cache, self.limits = engine, cache, limits
        self._stats = _Stats()

    def stats(self) -> dict[str, Any]:
        s = self._stats
        prefix = self.engine.stats() if hasattr(self.engine, "stats") else {}
        return {"model": self.engine.model_id, "cache": self.cache.stats(), "prefix_cache": prefix,
                "requests": s.requests, "cancelled": s.cancelled,
                "steps": s.steps, "mean_batch": round(s.row_steps / s.steps, 2) if s.steps else 0.0,
                "max_batch": s.max_batch, "rejected": s.rejected,
                "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                "encoded": dict(s.encoded), "encode_seconds": round(s.encode_s, 3),
                "prepare_seconds": round(s.prepare_s, 3), "generate_seconds": round(s.generate_s, 3)}

    def first_event(self, prepared: "_Job | APIError") -> Event | None:
        """What a request hears once prepared: its error, or (streaming) its prompt size."""
        if isinstance(prepared, APIError):
            self._stats.rejected += 1
            return Event.failed(prepared)
        return Event.started(len(prepared.prompt)) if prepared.req.stream else None

    def advance(self, job: _Job, token: int | None) -> Event | None:
        """Take one decoded token (None: a stop token); returns the event to send, if any.
        ``job.finish_reason`` is set once the request is over ("cancelled" when its client left)."""
        if job.req.cancelled:
            job.finish_reason = "cancelled"
            self._stats.cancelled += 1
            return self._done(job, "")
        delta = self._advance(job, token)
        if job.finish_reason is not None:
            return self._done(job, delta + job.text.flush())
        return Event.chunk(delta) if delta and job.req.stream else None

    def drop_waiting(self) -> None:
        """Count a request whose client left while it waited for a batch slot (never prepared)."""
        self._stats.requests += 1
        self._stats.cancelled += 1

    def record_step(self, rows: int, seconds: float) -> None:
        self._stats.steps += 1
        self._stats.row_steps += rows
        self._stats.max_batch = max(self._stats.max_batch, rows)
        self._stats.generate_s += seconds

    @staticmethod
    def _advance(job: _Job, token: int | None) -> str:
        if token is None:  # a stop token
            job.finish_reason = "stop"
            return ""
        job.tokens += 1
        delta = job.text.push(token)
        if job.text.stopped:
            job.finish_reason = "stop"
        elif job.tokens >= job.budget:
            job.finish_reason = "length"
        return delta

    def _done(self, job: _Job, delta: str) -> Event:
        self._stats.prompt_tokens += len(job.prompt)
        self._stats.completion_tokens += job.tokens
        return Event.finished(job.text.text, delta if job.req.stream else "", job.finish_reason, len(job.prompt),
                              job.tokens)

    def _text_too_long(self, req: ChatRequest) -> APIError | None:
        size = sum(len(content_to_text(m["content"]).encode()) for m in req.messages)
        limit = self.engine.max_text_bytes
        if size <= limit:
            return None
        return bad_request(f"the conversation's text is {size} bytes; no text over {limit} bytes fits this model's "
                           f"{self.engine.max_context}-token context", "messages", "context_length_exceeded")

    @staticmethod
    def decoder_input(job: _Job) -> Prompt:
        """Prompt ids, image and audio features, and media hashes of one request."""
        image = [f for item, f in zip(job.req.media, job.features) if item.modality == "image"]
        audio = [f for item, f in zip(job.req.media, job.features) if item.modality == "audio"]
        return Prompt(job.prompt, image, audio, job.media)

    # ---- preparation (in a worker thread) ------------------------------------------------
    def prepare(self, requests: list[ChatRequest]) -> list[_Job | APIError]:
        """Features (cache, then one encode per modality), prompt and budget of each request, or
        the 4xx that refuses it. Blocking: call it in a worker thread."""
        t0 = time.perf_counter()
        self._stats.requests += len(requests)
        out = self._prepare(requests)
        self._stats.prepare_s += time.perf_counter() - t0
        return out

    def needs_encoding(self, requests: list[ChatRequest]) -> bool:
        """Whether preparing ``requests`` decodes and encodes media (some are not in the feature cache)."""
        return any(self._key(m) not in self.cache for r in requests for m in r.media)

    def _key(self, item) -> tuple[str, str]:
        return item.id, self.engine.encoder_name(item.modality)

    def _prepare(self, requests: list[ChatRequest]) -> list[_Job | APIError]:
        keys = [[self._key(m) for m in r.media] for r in requests]
        found, failed = self._features(requests, keys)
        out: list[_Job | APIError] = []
        for req, req_keys in zip(requests, keys):
            bad = next((failed[k] for k in req_keys if k in failed), None)
            out.append(bad or self._job(req, [found[k] for k in req_keys], [k[0] for k in req_keys]))
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
            except Exception as e:  # a decoder's bug fails the requests with this item, not the batch
                failed[key] = _internal(e, f"decoding {item.param}")
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

    def _job(self, req: ChatRequest, features: list, media: list[str]) -> _Job | APIError:
        too_long = self._text_too_long(req)
        if too_long:
            return too_long
        try:
            prompt = self.engine.render(req.messages, features, req.number_media)
        except ValueError as e:  # PlaceholderMismatchError: the parser and renderer disagree
            return bad_request(f"the conversation could not be rendered: {e}", "messages", "invalid_messages")
        except Exception as e:  # our bug, for this request alone: the others in its group go on
            return _internal(e, "rendering the conversation")
        limit, n, want = self.engine.max_context, len(prompt), req.params.max_tokens
        if n >= limit:
            return bad_request(f"the conversation is {n} tokens (media included); this model's context is {limit} "
                               "tokens, leaving no room for a reply", "messages", "context_length_exceeded")
        if want is not None and n + want > limit:
            return bad_request(f"the conversation ({n} tokens) plus max_tokens ({want}) exceeds this model's "
                               f"{limit}-token context", "max_tokens", "context_length_exceeded")
        budget = want if want is not None else min(self.limits.default_max_tokens, limit - n)
        stream = TextStream(self.engine.detokenize, req.params.stop, _client_tail(req, prompt))
        return _Job(req=req, prompt=prompt, features=features, media=media, budget=budget, text=stream)


CONTINUATION_TAIL = 4
"""Tokens of a continued answer's own text that its reply is decoded after (serve.detok)."""


def _client_tail(req: ChatRequest, prompt: list[int]) -> list[int]:
    """The last tokens of the answer the client started, when it continues one with text; else none."""
    last = req.messages[-1]
    started = last["role"] == "assistant" and content_to_text(last["content"]).strip()
    return prompt[-CONTINUATION_TAIL:] if started else []


def _internal(exc: Exception, doing: str) -> APIError:
    """The 500 of one request that hit a bug while ``doing`` something; logged with its traceback."""
    log.exception("internal error %s", doing)
    return internal_error(exc, doing)
