"""OpenAI-style API errors: every refusal is one of these, rendered as the JSON body clients expect.

    raise APIError(400, "messages[0].content[1] has unknown type 'video'", param="messages[0].content[1].type",
                   code="unknown_part_type")
    -> 400 {"error": {"message": ..., "type": "invalid_request_error", "param": ..., "code": ...}}

Bad input is always a 4xx raised as ``APIError``; anything else that escapes is our bug (5xx).
The class pickles with all its fields, since the model deployment hands errors back to the
ingress across a Ray process boundary.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """A request the server refuses; ``status`` is the HTTP code (4xx for anything the client sent)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self):
        return (APIError, (self.status, self.message, self.param, self.code))

    @property
    def type(self) -> str:
        # OpenAI calls every client error, a wrong API key included, "invalid_request_error".
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"


def unavailable(exc: BaseException) -> APIError | None:
    """The 503 for a model replica that died or became unreachable mid-request (Ray Serve starts
    another; the client may retry), or None for any other exception."""
    from ray import exceptions as rx

    if isinstance(exc, (rx.RayActorError, rx.ActorUnavailableError)):
        return APIError(503, f"the model replica serving this request went away ({type(exc).__name__}); retry shortly",
                        None, "model_unavailable")
    return None


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def internal_error(exc: BaseException, doing: str = "") -> APIError:
    """The 500 for our own bug ``exc`` (hit while ``doing`` something, when given): its type, and
    where to read the rest."""
    where = f" {doing}" if doing else ""
    return APIError(500, f"internal error ({type(exc).__name__}){where}; see the server log", None, "internal_error")
