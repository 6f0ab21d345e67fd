"""What a request hears from the model replica, one :class:`Event` at a time.

    Event.failed(err)             # its 4xx (the only event of a refused request)
    Event.started(n)              # streaming only: prepared, the prompt is n tokens
    Event.chunk(text)             # streaming only: new text
    Event.finished(...)           # the last one: whole text, the streamed tail, reason and usage
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import APIError


@dataclass(frozen=True)
class Event:
    delta: str = ""
    """New text (streaming); in a finished event, the tail not streamed yet."""
    error: APIError | None = None
    start: bool = False
    done: bool = False
    text: str = ""
    """The whole completion (finished events)."""
    finish_reason: str | None = None
    """"stop", "length", or "cancelled" (the client went away)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def final(self) -> bool:
        """Nothing follows this event."""
        return self.done or self.error is not None

    @classmethod
    def failed(cls, error: APIError) -> "Event":
        return cls(error=error)

    @classmethod
    def started(cls, prompt_tokens: int) -> "Event":
        return cls(start=True, prompt_tokens=prompt_tokens)

    @classmethod
    def chunk(cls, delta: str) -> "Event":
        return cls(delta=delta)

    @classmethod
    def finished(cls, text: str, delta: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> "Event":
        return cls(delta=delta, done=True, text=text, finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                   completion_tokens=completion_tokens)
