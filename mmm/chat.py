"""Conversations -> token ids, loss labels and the ordered media list.

A message's content is either a string that marks each media item with an empty span
(``<image></image>``, ``<audio></audio>``) or a list of parts (``{"type": "text", "text": ...}``,
``{"type": "image"}``, ``{"type": "audio"}``) in any order. Rendering expands every span to
``<image>`` + N placeholder tokens + ``</image>``, N being how many projected features that item
has, then applies the tokenizer's own chat template. Labels keep only assistant tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .schema import AUDIO, IMAGE
from .tokenizer import AUDIO_END, AUDIO_PAD, AUDIO_START, IMAGE_END, IMAGE_PAD, IMAGE_START

IGNORE_INDEX = -100
_SPAN = re.compile(r"<(image|audio)></\1>")
_TAGS = {IMAGE: (IMAGE_START, IMAGE_PAD, IMAGE_END), AUDIO: (AUDIO_START, AUDIO_PAD, AUDIO_END)}


class PlaceholderMismatchError(ValueError):
    """The media in a conversation and the features given for them do not line up."""


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    modalities: list[str]
    """Modality of each media item, in order of appearance."""


def content_to_text(content) -> str:
    """Parts -> a string with empty media spans; strings pass through."""
    if isinstance(content, str):
        return content
    pieces = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            pieces.append(part["text"])
        elif kind in _TAGS:
            pieces.append(f"<{kind}></{kind}>")
        else:
            raise ValueError(f"content part {i} has unknown type {kind!r}; expected text, image or audio")
    return "".join(pieces)


def media_modalities(messages) -> list[str]:
    """Modality of every media span across the conversation, in order."""
    return [m.group(1) for msg in messages for m in _SPAN.finditer(content_to_text(msg["content"]))]


def _expand(text: str, counts: list[int], start: int) -> tuple[str, int]:
    """Replace each empty span with its placeholders; returns the text and the next media index."""
    index = start

    def fill(match: re.Match) -> str:
        nonlocal index
        open_tag, pad, close_tag = _TAGS[match.group(1)]
        n = counts[index]
        index += 1
        return open_tag + pad * n + close_tag

    return _SPAN.sub(fill, text), index


def render(tokenizer, messages, media_token_counts, add_generation_prompt: bool = False) -> Rendered:
    """Render a conversation; ``media_token_counts[i]`` is the projected length of media item i."""
    modalities = media_modalities(messages)
    counts = [int(c) for c in media_token_counts]
    if len(modalities) != len(counts):
        raise PlaceholderMismatchError(
            f"the conversation marks {len(modalities)} media items ({', '.join(modalities) or 'none'}) "
            f"but {len(counts)} were given"
        )
    expanded, index = [], 0
    for msg in messages:
        text, index = _expand(content_to_text(msg["content"]), counts, index)
        expanded.append({"role": msg["role"], "content": text})
    out = tokenizer.apply_chat_template(
        expanded,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        add_generation_prompt=add_generation_prompt,
    )
    ids = list(out["input_ids"])
    mask = out["assistant_masks"]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return Rendered(input_ids=ids, labels=labels, modalities=modalities)
