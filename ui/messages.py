"""Gradio chat history -> OpenAI ``messages``, media inlined as the API expects.

Every turn re-sends the whole conversation, as any OpenAI client does: pictures as ``image_url``
parts with ``data:`` URLs, audio clips as ``input_audio`` parts (base64 + format). The server's
feature cache is keyed by content hash, so media re-sent on later turns are not encoded again.
Media come before the text of their turn, in upload order; the server numbers them ("Image 1:",
"Audio 2:") across the conversation as training did, so "image 2" in a question names the second
picture of the whole chat.
"""

from __future__ import annotations

import base64
import io
import mimetypes
from pathlib import Path
from typing import Any

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".gif": "image/gif", ".bmp": "image/bmp"}
AUDIO_FORMATS = {".wav": "wav", ".mp3": "mp3", ".flac": "flac", ".ogg": "ogg"}
"""What the API accepts as ``input_audio.format``; other audio files are converted to WAV."""


class UnsupportedFile(ValueError):
    pass


class EmptyMessage(ValueError):
    pass


def media_part(path: str) -> dict:
    """One uploaded file as an OpenAI content part (image_url or input_audio)."""
    suffix = Path(path).suffix.lower()
    data = Path(path).read_bytes()
    if suffix in IMAGE_TYPES:
        url = f"data:{IMAGE_TYPES[suffix]};base64,{base64.b64encode(data).decode()}"
        return {"type": "image_url", "image_url": {"url": url}}
    if suffix in AUDIO_FORMATS:
        return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(),
                                                       "format": AUDIO_FORMATS[suffix]}}
    kind = (mimetypes.guess_type(path)[0] or "").split("/")[0]
    if kind == "audio":
        return {"type": "input_audio", "input_audio": {"data": base64.b64encode(_to_wav(path)).decode(), "format": "wav"}}
    raise UnsupportedFile(f"{Path(path).name}: not a picture ({', '.join(IMAGE_TYPES)}) or an audio clip "
                          f"({', '.join(AUDIO_FORMATS)})")


def _to_wav(path: str) -> bytes:
    """An audio file of another container (a browser recording, m4a, ...) as WAV bytes."""
    import soundfile as sf

    try:
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises its own LibsndfileError for unknown containers
        raise UnsupportedFile(f"{Path(path).name}: cannot read this audio ({e}); send wav, mp3, flac or ogg") from e
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV")
    return buf.getvalue()


def user_content(text: str, files: list[str]) -> list[dict]:
    """A user turn: its media in order, then its text (if any)."""
    parts = [media_part(f) for f in files]
    if text and text.strip():
        parts.append({"type": "text", "text": text.strip()})
    return parts


def to_openai(message: dict | str, history: list[dict]) -> list[dict]:
    """Gradio's ``(message, history)`` of a multimodal ChatInterface -> OpenAI ``messages``.

    Gradio keeps each uploaded file as its own history entry and may give content as a string,
    a file dict (``{"path": ...}``), a list of typed parts, or a component; consecutive entries of
    one role are merged into one OpenAI message. User entries that no answer follows are a turn that
    failed (a refused file, a server that was down): Gradio keeps them in the history, but they are
    not sent again, so one failed turn does not fail every later one. A message with neither text
    nor files is refused: sent as is, it would ask the server to continue the last answer.
    """
    text, uploads = (message, []) if isinstance(message, str) else (message.get("text", ""), message.get("files", []))
    if not (text or "").strip() and not uploads:
        raise EmptyMessage("type a question or attach a picture or an audio clip")
    messages: list[dict] = []
    for entry in _answered(history):
        role = entry["role"]
        texts, files = _flatten(entry["content"])
        if role == "assistant":
            _append(messages, "assistant", [{"type": "text", "text": t} for t in texts])
        elif role == "user":
            _append(messages, "user", user_content("\n".join(texts), files))
    _append(messages, "user", user_content(text, [_path(f) for f in uploads]))
    return [_collapse(m) for m in messages]


def _answered(history: list[dict]) -> list[dict]:
    """The history up to its last assistant entry."""
    last = max((i for i, entry in enumerate(history) if entry["role"] == "assistant"), default=-1)
    return history[: last + 1]


def _flatten(content: Any) -> tuple[list[str], list[str]]:
    """(texts, file paths) of one history entry's content, whatever shape Gradio gave it."""
    items = content if isinstance(content, (list, tuple)) else [content]
    texts, files = [], []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text":
            texts.append(item["text"])
        elif isinstance(item, dict) and item.get("type") == "file":
            files.append(_path(item["file"]))
        elif isinstance(item, dict) and ("path" in item or "url" in item):
            files.append(_path(item))
        elif isinstance(item, dict) and item.get("type") == "component":
            files.append(_path(item["value"]))
        elif hasattr(item, "value"):  # a gr.Image / gr.Audio component in the history
            files.append(_path(item.value))
        elif item is not None:
            raise UnsupportedFile(f"unexpected chat content {type(item).__name__}")
    return texts, files


def _path(f: Any) -> str:
    if isinstance(f, str):
        return f
    if isinstance(f, dict) and f.get("path"):
        return f["path"]
    if hasattr(f, "path"):
        return f.path
    raise UnsupportedFile(f"a file without a local path: {f!r}")


def _append(messages: list[dict], role: str, parts: list[dict]) -> None:
    if not parts:
        return
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(parts)
    else:
        messages.append({"role": role, "content": list(parts)})


def _collapse(message: dict) -> dict:
    """Assistant turns go back as plain strings (the API's usual shape for them)."""
    if message["role"] == "assistant":
        return {"role": "assistant", "content": "\n".join(p["text"] for p in message["content"])}
    return message
