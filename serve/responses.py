"""OpenAI response objects: a whole ``chat.completion`` and the SSE ``chat.completion.chunk`` stream."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from .events import Event

log = logging.getLogger(__name__)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(done: Event) -> dict[str, int]:
    p, c = done.prompt_tokens, done.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def completion(done: Event, model: str) -> dict[str, Any]:
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                     "finish_reason": done.finish_reason, "logprobs": None}],
        "usage": usage(done),
    }


_NO_USAGE = object()


def _chunk(cid: str, created: int, model: str, delta: dict | None, finish: str | None = None,
           use=_NO_USAGE) -> str:
    """One SSE chunk; ``use``: its ``usage`` field, when the client asked for usage (None on every
    chunk but the last, as OpenAI sends it)."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if use is not _NO_USAGE:
        body["usage"] = use
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _guard(events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """The events, ending with an error event if the stream breaks: a 503 when the model replica
    went away, else a 500 (our bug, logged here), so the client reads why instead of a cut stream."""
    from .errors import internal_error, unavailable

    try:
        async for event in events:
            yield event
    except Exception as e:
        err = unavailable(e)
        if err is None:
            log.exception("a streamed request failed")
            err = internal_error(e, "mid-answer")
        yield Event.failed(err)


async def sse(events: AsyncIterator[Event], model: str, include_usage: bool) -> AsyncIterator[str]:
    """Service events (after ``start``) -> SSE lines: a role chunk, content chunks, a finish chunk,
    an optional usage chunk (``stream_options.include_usage``), then ``data: [DONE]``."""
    cid, created = completion_id(), int(time.time())
    null_usage = {"use": None} if include_usage else {}
    finished = False
    try:
        yield _chunk(cid, created, model, {"role": "assistant", "content": ""}, **null_usage)
        async for event in _guard(events):
            if event.error is not None:  # the stream broke: say so in OpenAI's shape, then end
                yield f"data: {json.dumps(event.error.body())}\n\n"
                break
            if event.delta:
                yield _chunk(cid, created, model, {"content": event.delta}, **null_usage)
            if event.done:
                finished = True
                yield _chunk(cid, created, model, {}, event.finish_reason, **null_usage)
                if include_usage:
                    yield _chunk(cid, created, model, None, use=usage(event))
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished and hasattr(events, "cancel"):  # the client left: stop generating for it
            events.cancel()
