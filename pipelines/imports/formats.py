"""Instruction-data formats people already have -> one normal form: messages with empty media
spans (``<image></image>``, ``<audio></audio>``) and the media references in order of appearance.

Formats (one record each; a file is a JSON array or JSONL):

- ``llava``: ``{"id", "image": path | [paths], "audio": path | [paths], "conversations": [{"from":
  "human" | "gpt", "value": "<image>\\nWhat is ..."}]}``. ``<image>`` / ``<audio>`` placeholders
  stand where the items go; the n-th ``<image>`` is the n-th image path, the n-th ``<audio>`` the
  n-th audio path (items are numbered in order of appearance across the whole conversation).
- ``sharegpt``: the same placeholders; turns under ``conversations`` (``from``/``value``) or
  ``messages`` (``role``/``content``), media under ``images`` / ``audios`` (or ``image`` /
  ``audio``), an optional ``system`` string.
- ``openai``: ``{"messages": [{"role", "content": str | [parts]}]}``, parts ``text``,
  ``image_url`` (``url``: a path, ``file://`` path, ``s3://`` uri or a ``data:`` URL),
  ``input_audio`` (``data`` base64 + ``format``, or ``path``/``url``), and ``image`` / ``audio``
  parts naming a path.
- ``mmm``: the project's own: ``{"messages": [{"role", "content"}], "media": [paths]}`` with empty
  spans already in the text; ``kind``, ``lang`` and ``split`` are kept when present.

A record may carry ``lang`` (one of ``mmm.schema.LANGS``), ``split`` (one of ``mmm.schema.SPLITS``,
the splits the training and evaluation jobs read) and ``kind`` (a string); otherwise the job's
defaults apply. Every field is type-checked where it is read, so every problem, a wrong type
included, is a :class:`RecordError` with a reason that names it; the job writes it to the errors table.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

from mmm.chat import content_to_text, reserved_token
from mmm.schema import AUDIO, IMAGE, LANGS, SPLITS

from ..ingest import lang_code

FORMATS = ("llava", "sharegpt", "openai", "mmm")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
         "model": "assistant", "system": "system", "developer": "system"}
"""Each format's role names -> the chat template's; OpenAI's ``developer`` is its newer name for ``system``."""
_PLACEHOLDER = re.compile(r"<(image|audio)>(?!</\1>)")
_SPAN = re.compile(r"<(image|audio)></\1>")
_DATA_URL = re.compile(r"^data:([\w/+.-]+)(?:;[\w.+-]+=[^;,]*)*;base64,(.*)$", re.S)
"""``data:<mime>[;name=value...];base64,<data>``: the parameters (``name=``, ``charset=``) are skipped."""
_UNSUPPORTED = re.compile(r"<(video)>")
_EXTENSION = re.compile(r"[A-Za-z0-9-]{1,16}")
"""An inline item's format becomes its file's extension under <out>/media/: no dots or slashes."""


class RecordError(ValueError):
    """A record that cannot become a dialogue; the message is the reason the errors table keeps."""


@dataclass
class MediaRef:
    modality: str
    path: str | None = None
    """A path or uri, resolved later against the media root."""
    data: bytes | None = None
    """Inline bytes (a data: URL or base64 audio)."""
    ext: str = ""


@dataclass
class Record:
    messages: list[dict]
    media: list[MediaRef] = field(default_factory=list)
    id: str | None = None
    lang: str | None = None
    split: str | None = None
    kind: str | None = None


def _as_list(value) -> list:
    if value is None or value == "":  # text-only rows of mixed files often carry "image": ""
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _turns(rec: dict, keys: tuple[str, ...]) -> list[dict]:
    for k in keys:
        if k in rec:
            if not isinstance(rec[k], list) or not rec[k]:
                raise RecordError(f"{k!r} is empty or not a list")
            for i, turn in enumerate(rec[k]):
                if not isinstance(turn, dict):
                    raise RecordError(f"turn {i} is not an object (got {type(turn).__name__})")
            return rec[k]
    raise RecordError(f"no turns: expected one of {list(keys)}")


def _role(turn: dict, i: int) -> str:
    raw = turn.get("from", turn.get("role"))
    if not isinstance(raw, str) or raw not in ROLES:  # a list or object is no role (and unhashable)
        raise RecordError(f"turn {i}: unknown role {raw!r} (expected one of {sorted(ROLES)})")
    return ROLES[raw]


def check_turns(messages: list[dict]) -> None:
    """Optional system first, then user/assistant alternating from a user turn, no empty turn, no
    control token in the text, at least one assistant answer (the only tokens training learns from)."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for i, m in enumerate(messages):
        _check_unicode(m["content"], f"turn {i}")
        token = reserved_token(m["content"])
        if token is not None:
            raise RecordError(f"turn {i} holds {token!r}, a control token of the chat format (a turn or media marker)")
        text = _SPAN.sub("", m["content"]).strip()
        if not text and not _SPAN.search(m["content"]):
            raise RecordError(f"turn {i} ({m['role']}) is empty")
        if m["role"] == "assistant" and not text:
            raise RecordError(f"turn {i} (assistant) is empty")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise RecordError(f"turn order: turn {i} is {m['role']!r}, expected {want!r} (user and assistant alternate)")
    if not any(m["role"] == "assistant" for m in body):
        raise RecordError("no assistant turn")
    if any(m["role"] == "system" for m in body):
        raise RecordError("a system turn after the first")


def _check_unicode(text: str, what: str) -> None:
    """Arrow stores UTF-8: a lone surrogate (``"\\ud800"`` is valid JSON) would fail the whole write."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordError(f"{what}: text is not valid Unicode ({e.reason} at character {e.start})") from None


def _placeholders(rec: dict, turns_keys, media_keys: dict) -> Record:
    _refuse_video(rec)
    messages = []
    for i, turn in enumerate(_turns(rec, turns_keys)):
        content = turn.get("value", turn.get("content"))
        if not isinstance(content, str):
            raise RecordError(f"turn {i}: content is not a string")
        messages.append({"role": _role(turn, i), "content": _PLACEHOLDER.sub(lambda m: f"<{m.group(1)}></{m.group(1)}>", content)})
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise RecordError(f"system is not a string (got {type(system).__name__})")
    if messages and messages[0]["role"] == "assistant":  # LLaVA's own preprocessing drops such an opening turn
        messages = messages[1:]
    if system and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    paths = {m: [p for k in keys for p in _as_list(rec.get(k))] for m, keys in media_keys.items()}
    return _ordered(messages, paths, rec)


def _refuse_video(rec: dict) -> None:
    """Video is not a modality MMM reads: a record with one fails by name instead of importing as
    text with a literal ``<video>`` in it."""
    turns = rec.get("conversations") or rec.get("messages") or []
    texts = [t.get("value", t.get("content")) for t in turns if isinstance(t, dict)]
    if any(rec.get(k) for k in ("video", "videos")) or any(isinstance(t, str) and _UNSUPPORTED.search(t) for t in texts):
        raise RecordError("video is not supported (MMM reads images and audio)")


def _ordered(messages: list[dict], paths: dict[str, list], rec: dict) -> Record:
    """Pair the n-th span of each modality with its n-th path; the counts must match."""
    order = [m.group(1) for msg in messages for m in _SPAN.finditer(msg["content"])]
    for modality in (IMAGE, AUDIO):
        n_spans, n_paths = order.count(modality), len(paths.get(modality, []))
        if n_spans != n_paths:
            raise RecordError(f"{n_spans} <{modality}> placeholders but {n_paths} {modality} files")
    taken = {IMAGE: 0, AUDIO: 0}
    media = []
    for modality in order:
        path = paths[modality][taken[modality]]
        taken[modality] += 1
        if not isinstance(path, str) or not path:
            raise RecordError(f"{modality} path {path!r} is not a string")
        _check_unicode(path, f"{modality} path")
        media.append(MediaRef(modality, path=path))
    return _record(messages, media, rec)


def _record(messages: list[dict], media: list[MediaRef], rec: dict) -> Record:
    check_turns(messages)
    return Record(messages, media, id=_id(rec.get("id")), lang=_one_of("lang", _lang(rec.get("lang")), LANGS),
                  split=_one_of("split", rec.get("split"), SPLITS), kind=_kind(rec.get("kind")))


def _id(value) -> str | None:
    """A string or an integer (LLaVA's ids are either); it becomes part of the dialogue id."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError(f"id {value!r} is not a string or integer")
    _check_unicode(str(value), "id")
    return str(value)


def _lang(value):
    """BCP 47 tags and other names of the two languages ("ms-MY", "EN") as MMM's codes."""
    return lang_code(value) if isinstance(value, str) and value.strip() else value


def _one_of(name: str, value, allowed: tuple[str, ...]) -> str | None:
    """lang and split select rows in the training and evaluation jobs: another value is a row they never read."""
    if value is not None and value not in allowed:
        raise RecordError(f"unknown {name} {value!r} (expected one of {list(allowed)})")
    return value


def _kind(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(f"kind {value!r} is not a string")
    _check_unicode(value, "kind")
    return value


def llava(rec: dict) -> Record:
    return _placeholders(rec, ("conversations",), {IMAGE: ("image",), AUDIO: ("audio",)})


def sharegpt(rec: dict) -> Record:
    return _placeholders(rec, ("conversations", "messages"), {IMAGE: ("images", "image"), AUDIO: ("audios", "audio")})


def mmm(rec: dict) -> Record:
    messages = []
    for i, turn in enumerate(_turns(rec, ("messages",))):
        if not isinstance(turn.get("content"), str):
            raise RecordError(f"turn {i}: content is not a string")
        messages.append({"role": _role(turn, i), "content": turn["content"]})
    order = [m.group(1) for msg in messages for m in _SPAN.finditer(msg["content"])]
    paths = _as_list(rec.get("media"))
    if len(order) != len(paths):
        raise RecordError(f"{len(order)} media spans but {len(paths)} media paths")
    return _ordered(messages, {m: [p for o, p in zip(order, paths) if o == m] for m in (IMAGE, AUDIO)}, rec)


def _openai_part(part, i: int, j: int) -> tuple[str, MediaRef | None]:
    if not isinstance(part, dict):
        raise RecordError(f"turn {i} part {j} is not an object (got {type(part).__name__})")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text", "")
        if not isinstance(text, str):
            raise RecordError(f"turn {i} part {j}: text is not a string (got {type(text).__name__})")
        return text, None
    if kind == "image_url":
        url = part["image_url"].get("url") if isinstance(part.get("image_url"), dict) else part.get("image_url")
        return "<image></image>", _from_url(IMAGE, url, i, j)
    if kind == "input_audio":
        return "<audio></audio>", _input_audio(part.get("input_audio"), i, j)
    if kind in (IMAGE, AUDIO):
        return f"<{kind}></{kind}>", _from_url(kind, part.get(kind) or part.get("path") or part.get("url"), i, j)
    raise RecordError(f"turn {i} part {j}: unknown part type {kind!r}")


def _input_audio(spec, i: int, j: int) -> MediaRef:
    """``{"data": base64, "format": "wav"}`` (OpenAI's form) or ``{"path" | "url": ...}``."""
    if not isinstance(spec, dict):
        raise RecordError(f"turn {i} part {j}: input_audio is not an object (got {type(spec).__name__})")
    data, fmt = spec.get("data"), spec.get("format", "wav")
    if not data:
        return _from_url(AUDIO, spec.get("path") or spec.get("url"), i, j)
    if not isinstance(data, str):
        raise RecordError(f"turn {i} part {j}: input_audio data is not a string (got {type(data).__name__})")
    if data.startswith("data:"):
        return _from_url(AUDIO, data, i, j)
    if not isinstance(fmt, str) or not _EXTENSION.fullmatch(fmt):
        raise RecordError(f"turn {i} part {j}: input_audio format {fmt!r} is not a file extension such as 'wav'")
    try:
        return MediaRef(AUDIO, data=_b64(data), ext=fmt)
    except ValueError:
        raise RecordError(f"turn {i} part {j}: input_audio data is not base64") from None


def _from_url(modality: str, url, i: int, j: int) -> MediaRef:
    if not isinstance(url, str) or not url:
        raise RecordError(f"turn {i} part {j}: {modality} part has no url or path")
    found = _DATA_URL.match(url)
    if found:
        try:
            return MediaRef(modality, data=_b64(found.group(2)), ext=found.group(1).split("/")[-1].split("+")[0])
        except ValueError:
            raise RecordError(f"turn {i} part {j}: data URL is not base64") from None
    if url.startswith("data:"):
        raise RecordError(f"turn {i} part {j}: data URL {url[:40]!r}... is not data:<type>[;name=value];base64,<data>")
    if url.startswith(("http://", "https://")):
        raise RecordError(f"turn {i} part {j}: remote URL {url!r} (download it and give a path or data: URL)")
    _check_unicode(url, f"turn {i} part {j}: {modality} path")
    return MediaRef(modality, path=url[len("file://") :] if url.startswith("file://") else url)


def _b64(text: str) -> bytes:
    """Base64 as files and tools write it, line breaks included (MIME wraps at 76 characters)."""
    return base64.b64decode(re.sub(r"\s+", "", text), validate=True)


def openai(rec: dict) -> Record:
    messages, media = [], []
    for i, turn in enumerate(_turns(rec, ("messages",))):
        role, content = _role(turn, i), turn.get("content")
        if isinstance(content, list):
            pieces = [_openai_part(p, i, j) for j, p in enumerate(content)]
            # joined as the renderer joins a client's parts, so training sees what serving will
            content = content_to_text([{"type": "text", "text": t} if m is None else {"type": m.modality} for t, m in pieces])
            media += [m for _, m in pieces if m is not None]
        if not isinstance(content, str):
            raise RecordError(f"turn {i}: content is neither a string nor a list of parts")
        if _PLACEHOLDER.search(content):
            raise RecordError(f"turn {i}: a bare <image>/<audio> placeholder in text; openai records carry media as parts")
        messages.append({"role": role, "content": content})
    spans = sum(len(_SPAN.findall(m["content"])) for m in messages)
    if spans != len(media):
        raise RecordError(f"{spans} media spans in the text but {len(media)} media parts")
    return _record(messages, media, rec)


PARSERS = {"llava": llava, "sharegpt": sharegpt, "openai": openai, "mmm": mmm}


def parse_record(fmt: str, rec) -> Record:
    if not isinstance(rec, dict):
        raise RecordError(f"a record is a JSON object, got {type(rec).__name__}")
    return PARSERS[fmt](rec)
