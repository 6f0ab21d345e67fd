"""OpenAI chat-completions requests -> the core's messages, media and sampling parameters.

    req = parse_request(body_bytes, RequestLimits(), model_id="mmm-stage2")
    req.messages   # [{"role": "user", "content": [{"type": "text", ...}, {"type": "image"}]}, ...]
    req.media      # [MediaItem("image", param="messages[0].content[1]", data=b"\x89PNG..."), ...]

Content parts: ``text``; ``image_url`` (``data:image/...;base64,``; http(s) only when enabled and
allow-listed, fetched later by the ingress); ``input_audio`` (``{data: base64, format: wav|mp3|
flac|ogg}``). Every violation raises :class:`APIError` (4xx) naming the offending field. Media
bytes are only sniffed here; the full decode happens where the features are computed (on a
cache miss), and fails there with a 400 just the same.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field

from mmm.media import AUDIO_FORMATS, media_id, sniff_modality

from .config import RequestLimits
from .errors import APIError, bad_request
from .urls import check_remote_url, decode_base64, parse_data_url

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Accepted but unused (defaults of the OpenAI client); anything else is refused by name, as OpenAI does.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
KNOWN = {"model", "messages", "chat_template_kwargs", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
         "stream", "stream_options", "n", "frequency_penalty", "presence_penalty", "logprobs"} | IGNORED
# Text that would forge the chat template's turn markers or the media spans the renderer expands.
RESERVED = re.compile(r"<\|[A-Za-z0-9_]{1,32}\|>|</?(?:image|audio)>")


@dataclass
class MediaItem:
    modality: str
    """"image" or "audio"."""
    param: str
    """Where the item sits in the request (``messages[2].content[1]``): errors name it."""
    data: bytes = b""
    url: str | None = None
    """A remote image URL still to fetch (the ingress fills ``data`` and clears it)."""

    @functools.cached_property
    def id(self) -> str:
        """Content hash of ``data`` (the feature cache's key), computed once where it is first needed."""
        return media_id(self.data)


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    """None: whatever the context leaves, up to ``RequestLimits.default_max_tokens``."""
    temperature: float = 1.0
    """OpenAI's default; 0 is greedy."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    media: list[MediaItem] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    include_usage: bool = False
    number_media: bool = True
    """Label media "Image 1: ", "Audio 1: " in the prompt (``chat_template_kwargs.number_media``)."""
    cancelled: bool = False
    """Set by the replica when the client goes away: the scheduler drops the row at its next step."""


def parse_request(body: bytes, limits: RequestLimits, model_id: str) -> ChatRequest:
    if len(body) > limits.max_body_bytes:
        raise APIError(413, f"request body of {len(body)} bytes exceeds the {limits.max_body_bytes}-byte limit",
                       None, "payload_too_large")
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise bad_request(f"request body is not valid JSON ({e})", None, "invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request("request body must be a JSON object", None, "invalid_json")
    unknown = sorted(set(obj) - KNOWN)
    if unknown:
        raise bad_request(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0], "unknown_parameter")
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required (a string)", "model", "missing_model")
    if model not in (model_id, "mmm"):
        raise APIError(404, f"model {model!r} does not exist; this server serves {model_id!r}", "model", "model_not_found")
    _check_unsupported(obj)
    messages, media = _parse_messages(obj.get("messages"), limits)
    stream = _flag(obj, "stream")
    options = obj.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad_request("stream_options may only hold include_usage", "stream_options")
    if options and not stream:  # as OpenAI and vLLM refuse it
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    kwargs = obj.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) - {"number_media"}:
        raise bad_request("chat_template_kwargs may only hold number_media (a boolean)", "chat_template_kwargs")
    number = _flag(kwargs, "number_media") if "number_media" in kwargs else True
    return ChatRequest(model=model, messages=messages, media=media, params=_parse_params(obj, limits),
                       stream=stream, include_usage=bool(stream and _flag(options, "include_usage")),
                       number_media=number)


def _flag(obj: dict, key: str) -> bool:
    value = obj.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{key}' must be a boolean", key)
    return value


def _number(obj: dict, key: str, lo: float, hi: float, integer: bool = False):
    value = obj.get(key)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise bad_request(f"'{key}' must be {kind} in [{lo}, {hi}], got {value!r}", key)
    return value


def _check_unsupported(obj: dict) -> None:
    if _number(obj, "n", 1, 1, integer=True) not in (None, 1):
        raise bad_request("only n=1 is supported", "n")
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(obj, key, -2.0, 2.0) not in (None, 0, 0.0):
            raise bad_request(f"'{key}' is not supported (only 0)", key, "unsupported_parameter")
    if obj.get("logprobs"):
        raise bad_request("logprobs are not supported", "logprobs", "unsupported_parameter")


def _parse_params(obj: dict, limits: RequestLimits) -> SamplingParams:
    max_tokens = _number(obj, "max_completion_tokens", 1, limits.max_tokens_cap, integer=True)
    if max_tokens is None:
        max_tokens = _number(obj, "max_tokens", 1, limits.max_tokens_cap, integer=True)
    temperature = _number(obj, "temperature", 0.0, 2.0)
    top_p = _number(obj, "top_p", 0.0, 1.0)
    if top_p == 0:
        raise bad_request("'top_p' must be greater than 0", "top_p")
    seed = _number(obj, "seed", -(2**63), 2**63 - 1, integer=True)
    stop = obj.get("stop")
    stops = (stop,) if isinstance(stop, str) else stop if stop is not None else ()
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    if len(stops) > limits.max_stop:
        raise bad_request(f"at most {limits.max_stop} stop sequences are allowed, got {len(stops)}", "stop")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        stop=tuple(stops),
        seed=seed,
    )


def _parse_messages(messages, limits: RequestLimits) -> tuple[list[dict], list[MediaItem]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages", "invalid_messages")
    out, media = [], []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"{param} must be an object", param, "invalid_messages")
        role = ROLES.get(msg.get("role"))
        if role is None:
            raise bad_request(f"{param}.role {msg.get('role')!r} is not one of {sorted(ROLES)}", f"{param}.role",
                              "invalid_role")
        extra = sorted(set(msg) - {"role", "content", "name"})
        if extra:
            raise bad_request(f"{param} has unsupported field(s) {extra} (tools are not supported)", f"{param}.{extra[0]}",
                              "unsupported_parameter")
        content = _parse_content(msg.get("content"), role, param, media)
        out.append({"role": role, "content": content})
        if len(media) > limits.max_media:
            raise bad_request(f"more than {limits.max_media} images and audio clips in one request", param,
                              "too_many_media")
    if out[-1]["role"] == "assistant" and all(m["role"] == "assistant" for m in out):
        raise bad_request("the conversation has no user message", "messages", "invalid_messages")
    for item in media:
        if item.url is not None:
            check_remote_url(item.url, limits, item.param)  # refuse before anything is fetched
    return out, media


def _text(value, param: str) -> str:
    if not isinstance(value, str):
        raise bad_request(f"{param} must be a string", param, "invalid_content")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # valid JSON ("\ud800") that no tokenizer can take
        raise bad_request(f"{param} is not valid Unicode: a lone surrogate at character {e.start}", param,
                          "invalid_content") from None
    match = RESERVED.search(value)
    if match:
        raise bad_request(f"{param} contains the reserved marker {match.group(0)!r}; send media as content parts",
                          param, "reserved_token")
    return value


def _parse_content(content, role: str, param: str, media: list[MediaItem]):
    param = f"{param}.content"
    if isinstance(content, str):
        return _text(content, param)
    if not isinstance(content, list) or not content:
        raise bad_request(f"{param} must be a string or a non-empty list of parts", param, "invalid_content")
    parts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": _text(part.get("text"), f"{where}.text")})
            continue
        if kind not in ("image_url", "input_audio"):
            raise bad_request(f"{where} has unknown part type {kind!r}; expected text, image_url or input_audio",
                              f"{where}.type", "unknown_part_type")
        if role != "user":
            raise bad_request(f"{where}: only user messages may carry images or audio", where, "invalid_content")
        item = _image(part.get("image_url"), where) if kind == "image_url" else _audio(part.get("input_audio"), where)
        media.append(item)
        parts.append({"type": item.modality})
    return parts


def _image(spec, where: str) -> MediaItem:
    url = spec.get("url") if isinstance(spec, dict) else spec
    param = f"{where}.image_url.url"
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param} must be a non-empty string", param, "invalid_image_url")
    if url[:5].lower() != "data:":
        return MediaItem("image", param, url=url)
    data = parse_data_url(url, param)
    if sniff_modality(data) != "image":
        raise bad_request(f"{param} is not an image (PNG/JPEG/WebP/GIF/BMP)", param, "invalid_image")
    return MediaItem("image", param, data=data)


def _audio(spec, where: str) -> MediaItem:
    param = f"{where}.input_audio"
    if not isinstance(spec, dict):
        raise bad_request(f"{param} must be an object {{data, format}}", param, "invalid_audio")
    fmt = spec.get("format")
    if not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS:
        raise bad_request(f"{param}.format {fmt!r} is not supported; use one of {', '.join(AUDIO_FORMATS)}",
                          f"{param}.format", "unsupported_audio_format")
    if not isinstance(spec.get("data"), str):
        raise bad_request(f"{param}.data must be a base64 string", f"{param}.data", "invalid_audio")
    data = decode_base64(spec["data"], f"{param}.data", "input_audio.data")
    if sniff_modality(data) != "audio":
        raise bad_request(f"{param}.data is not audio ({'/'.join(AUDIO_FORMATS)})", f"{param}.data", "invalid_audio")
    return MediaItem("audio", param, data=data)
