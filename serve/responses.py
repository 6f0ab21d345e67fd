"""OpenAI response objects: a whole ``chat.completion`` and the SSE ``chat.completion.chunk`` stream."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from .events import Event


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


def _chunk(cid: str, created: int, model: str, delta: dict | None, finish: str | None = None, use=None) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if use is not None:
        body["usage"] = use
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _guard(events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """The events, ending with an error event (a 503) if the model replica goes away mid-stream."""
    from .errors import unavailable

    try:
        async for event in events:
            yield event
    except Exception as e:
        err = unavailable(e)
        if err is None:
            raise
        yield Event.failed(err)


async def sse(events: AsyncIterator[Event], model: str, include_usage: bool) -> AsyncIterator[str]:
    """Service events (after ``start``) -> SSE lines: a role chunk, content chunks, a finish chunk,
    an optional usage chunk (``stream_options.include_usage``), then ``data: [DONE]``."""
    cid, created = completion_id(), int(time.time())
    finished = False
    try:
        yield _chunk(cid, created, model, {"role": "assistant", "content": ""})
        async for event in _guard(events):
            if event.error is not None:  # the replica died mid-stream: say so in OpenAI's shape, then end
                yield f"data: {json.dumps(event.error.body())}\n\n"
                break
            if event.delta:
                yield _chunk(cid, created, model, {"content": event.delta})
            if event.done:
                finished = True
                yield _chunk(cid, created, model, {}, event.finish_reason)
                if include_usage:
                    yield _chunk(cid, created, model, None, use=usage(event))
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished and hasattr(events, "cancel"):  # the client left: stop generating for it
            events.cancel()
