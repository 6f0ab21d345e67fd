"""Conversations -> token ids, loss labels and the ordered media list.

A message's content is either a string that marks each media item with an empty span
(``<image></image>``, ``<audio></audio>``) or a list of parts (``{"type": "text", "text": ...}``,
``{"type": "image"}``, ``{"type": "audio"}``) in any order. Rendering expands every span to
``<image>`` + N placeholder tokens + ``</image>``, N being how many projected features that item
has, then applies the tokenizer's own chat template. Labels keep only assistant tokens. Every span
ends its line, however the message was written (:func:`content_to_text`).

Media are numbered by the renderer: each span is preceded by its label, "Image 1: ", "Audio 2: ",
counted per modality over the whole conversation in order of appearance, so "image 2" names the
second image whoever wrote the text (training data, evaluation, or an API client sending bare
parts). The label is English in every language (the Malay question "gambar 2" refers to the
"Image 2: " label, as an English one does): one fixed string per item keeps the model's binding
of names to spans the same for all data. ``number_media=False`` renders spans bare, for clients
(and data) that number media in their own text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .schema import AUDIO, IMAGE
from .tokenizer import (AUDIO_END, AUDIO_PAD, AUDIO_START, BOS, IMAGE_END, IMAGE_PAD, IMAGE_START, MEDIA_TOKENS, PAD,
                        TURN_END, TURN_START)

IGNORE_INDEX = -100
_SPAN = re.compile(r"<(image|audio)></\1>")
_UNBROKEN_SPAN = re.compile(r"(<(image|audio)></\2>)(?!\n)")
_TAGS = {IMAGE: (IMAGE_START, IMAGE_PAD, IMAGE_END), AUDIO: (AUDIO_START, AUDIO_PAD, AUDIO_END)}
MEDIA_LABELS = {IMAGE: "Image", AUDIO: "Audio"}
"""The word of each modality's label: "Image 1: ", "Audio 1: "."""


RESERVED = (*MEDIA_TOKENS, TURN_START, TURN_END, PAD, BOS)
"""Strings every MMM tokenizer reads as one control token: text must not carry them, or a message
could open a turn, a media span or a placeholder that no item fills."""


class PlaceholderMismatchError(ValueError):
    """The media in a conversation and the features given for them do not line up."""


class ReservedTokenError(ValueError):
    """A message's text holds a string that the tokenizer reads as a control token."""


def reserved_token(text: str, reserved=RESERVED) -> str | None:
    """The first of ``reserved`` in ``text`` outside its empty media spans, else None. Rejected rather
    than escaped, as tiktoken refuses special tokens in text by default: an escaped ``<|im_end|>``
    would still teach or prompt the model with a string it reads as structure elsewhere."""
    bare = _SPAN.sub("", text)
    return next((token for token in reserved if token and token in bare), None)


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    modalities: list[str]
    """Modality of each media item, in order of appearance."""


def content_to_text(content) -> str:
    """Parts or a string -> a string of text and empty media spans, each span ending its line.

    Every span ends its line whoever wrote the message: the data models learn from mostly write
    "<image></image>\nWhat colour ...?" (the synthesized dialogues, captions and transcripts,
    LLaVA-style imports), an API client sends bare parts, and some formats write "<image>What ...".
    One form for all of them keeps training, evaluation and serving on the same ids (LLaVA's own
    preprocessing puts "\n" after each image too). Rendered from bare parts without it, the tiny
    demo model read a lone image's colour question as another question (docs/SERVING.md, "Bare
    parts render as training data")."""
    text = content if isinstance(content, str) else _join_parts(content)
    return _UNBROKEN_SPAN.sub(r"\1\n", text)


def _join_parts(parts) -> str:
    """Parts as one string. A text part ends its line before the next part unless it ends in
    whitespace: "What colour is it?" then an image is a question above its image, as the string
    "What colour is it?\n<image></image>" writes it, while "Image 1: " then an image (a client
    numbering its own media) runs on into its span. Two text parts are two lines, as vLLM joins
    them."""
    pieces, text_before = [], ""
    for i, part in enumerate(parts):
        kind = part.get("type")
        if text_before[-1:] not in ("", "\n", " ", "\t"):
            pieces.append("\n")
        if kind == "text":
            text_before = part["text"]
            pieces.append(text_before)
        elif kind in _TAGS:
            text_before = ""
            pieces.append(f"<{kind}></{kind}>")
        else:
            raise ValueError(f"content part {i} has unknown type {kind!r}; expected text, image or audio")
    return "".join(pieces)


def media_modalities(messages) -> list[str]:
    """Modality of every media span across the conversation, in order."""
    return _span_modalities(content_to_text(msg["content"]) for msg in messages)


def _span_modalities(texts) -> list[str]:
    return [m.group(1) for text in texts for m in _SPAN.finditer(text)]


def _expand(text: str, counts: list[int], start: int, numbers: dict[str, int] | None) -> tuple[str, int]:
    """Replace each empty span with its placeholders (after its label when ``numbers`` counts the
    items seen so far per modality); returns the text and the next media index."""
    index = start

    def fill(match: re.Match) -> str:
        nonlocal index
        kind = match.group(1)
        open_tag, pad, close_tag = _TAGS[kind]
        n = counts[index]
        index += 1
        label = ""
        if numbers is not None:
            numbers[kind] = numbers.get(kind, 0) + 1
            label = f"{MEDIA_LABELS[kind]} {numbers[kind]}: "
        return label + open_tag + pad * n + close_tag

    return _SPAN.sub(fill, text), index


def _refuse_reserved(tokenizer, texts: list[str]) -> None:
    reserved = (*RESERVED, *getattr(tokenizer, "all_special_tokens", ()))
    for i, text in enumerate(texts):
        token = reserved_token(text, reserved)
        if token is not None:
            raise ReservedTokenError(f"message {i + 1} contains {token!r}, which the tokenizer reads as a control token "
                                     "(turns, media spans, padding); remove it, and send media as image or audio parts")


def _open_last_turn(tokenizer, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Cut a rendered conversation at its last turn-end marker: the final message stays open."""
    end = tokenizer.convert_tokens_to_ids(TURN_END)
    cut = max(i for i, t in enumerate(ids) if t == end)
    return ids[:cut], labels[:cut]


def render(tokenizer, messages, media_token_counts, add_generation_prompt: bool = False,
           continue_final_message: bool = False, number_media: bool = True) -> Rendered:
    """Render a conversation; ``media_token_counts[i]`` is the projected length of media item i.
    ``continue_final_message`` leaves the last (assistant) message open, so generation continues
    it (vLLM's option of the same name); it excludes ``add_generation_prompt``."""
    texts = [content_to_text(msg["content"]) for msg in messages]
    _refuse_reserved(tokenizer, texts)
    modalities = _span_modalities(texts)
    counts = [int(c) for c in media_token_counts]
    if len(modalities) != len(counts):
        raise PlaceholderMismatchError(
            f"the conversation marks {len(modalities)} media items ({', '.join(modalities) or 'none'}) "
            f"but {len(counts)} were given"
        )
    if continue_final_message and (add_generation_prompt or messages[-1]["role"] != "assistant"):
        raise ValueError("continue_final_message needs the last message to be the assistant's, and no generation prompt")
    expanded, index, numbers = [], 0, ({} if number_media else None)
    for msg, text in zip(messages, texts):
        text, index = _expand(text, counts, index, numbers)
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
    if continue_final_message:
        ids, labels = _open_last_turn(tokenizer, ids, labels)
    return Rendered(input_ids=ids, labels=labels, modalities=modalities)
