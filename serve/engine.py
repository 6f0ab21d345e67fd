"""What the server needs from a model, as a small protocol, and its implementation over MMMModel.

The service (batching, caching, streaming) only talks to a :class:`ChatEngine`; tests can give it
a fake one. :func:`load_engine` picks the model to serve: an explicit checkpoint, else the newest
export under ``outputs/demo`` (``make demo`` writes ``stage1/final`` then ``stage2/final``), else
the tiny preset with random weights, so ``serve run serve.app:mmm`` always has something to serve.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from .openai_schema import SamplingParams

log = logging.getLogger("ray.serve")
META = "mmm.json"
"""The file ``mmm.checkpoint.save`` writes last; its presence marks a complete checkpoint."""


@dataclass
class Prompt:
    """One request as the decoder takes it."""

    ids: list[int]
    images: list = field(default_factory=list)
    """Encoder features of each image, in order of appearance."""
    audio: list = field(default_factory=list)
    media: list[str] = field(default_factory=list)
    """Content hash of every media item (both modalities), in order of appearance: the prefix
    cache keys media spans by it."""


class Decoder(Protocol):
    can_merge: bool

    def __len__(self) -> int: ...

    def step(self) -> list[int | None]: ...

    def keep(self, rows: list[int]) -> None: ...

    def merge(self, other: "Decoder") -> None: ...


class ChatEngine(Protocol):
    model_id: str
    max_context: int
    max_text_bytes: int
    """A conversation whose text (UTF-8) is longer cannot fit the context, whatever its media:
    refused before it is tokenized, which costs about a second a megabyte."""

    def encoder_name(self, modality: str) -> str: ...

    def decode_media(self, modality: str, data: bytes, name: str) -> Any:
        """Bytes -> what ``encode`` takes; raises ``mmm.media.MediaError`` (a ValueError) for bad media."""

    def encode(self, modality: str, items: list) -> list: ...

    def render(self, messages: list[dict], features: list, number_media: bool = True) -> list[int]:
        """Prompt ids for a conversation: with the assistant's generation prompt, or continuing
        the assistant's message when it is the last one."""

    def start(self, prompts: list[Prompt], params: Sequence[SamplingParams]) -> Decoder: ...

    def stats(self) -> dict: ...

    def detokenize(self, ids: list[int]) -> str: ...


class MMMEngine:
    """:class:`ChatEngine` over an ``mmm.model.MMMModel``."""

    def __init__(self, model, model_id: str | None = None, prefix_bytes: int = 0) -> None:
        from mmm.media import MediaLimits

        from .prefix_cache import PrefixCache

        self.model = model.eval()
        self.prefix = PrefixCache(prefix_bytes)
        self.model_id = model_id or f"mmm-{model.config.preset}-{model.phase}"
        self.max_context = model.config.llm.max_context
        positions = getattr(model.llm.config, "max_position_embeddings", None)
        if positions is not None and self.max_context > positions:
            raise ValueError(f"llm.max_context is {self.max_context} tokens but the language model has only {positions} "
                             f"positions; set llm.max_context <= {positions} to serve this model")
        # No token covers more text than the longest in the vocabulary (in UTF-8 bytes; SentencePiece's
        # "▁" and byte tokens like "<0x0A>" count more bytes than they stand for, so this only errs long).
        longest = max(len(token.encode()) for token in model.tokenizer.get_vocab())
        self.max_text_bytes = self.max_context * longest
        self.limits = MediaLimits(max_audio_seconds=model.config.audio.max_seconds)
        self._encoders = {"image": model.vision.name, "audio": model.audio.name}

    def encoder_name(self, modality: str) -> str:
        return self._encoders[modality]

    def decode_media(self, modality: str, data: bytes, name: str) -> Any:
        from mmm.media import decode_audio, decode_image

        return (decode_image if modality == "image" else decode_audio)(data, self.limits, name)

    def encode(self, modality: str, items: list) -> list:
        return self.model.encode_media(modality, items)

    def render(self, messages: list[dict], features: list, number_media: bool = True) -> list[int]:
        cont = messages[-1]["role"] == "assistant"
        return self.model.render(messages, features, add_generation_prompt=not cont, continue_final_message=cont,
                                 number_media=number_media).input_ids

    def start(self, prompts: list[Prompt], params) -> Decoder:
        """Prefill (after the longest cached prefix of each prompt) and remember each prompt's KV."""
        from .decoding import StepDecoder
        from .prefix_cache import prompt_keys

        rows = [(p.ids, p.images, p.audio) for p in prompts]
        if not self.prefix.enabled:
            return StepDecoder(self.model, rows, params)
        keys = [prompt_keys(p.ids, p.media, self.model.pad_ids.values()) for p in prompts]
        decoder = StepDecoder(self.model, rows, params, [self.prefix.lookup(k) for k in keys])
        for i, k in enumerate(keys):
            self.prefix.store(k, decoder.row_kv(i, len(k)))
        return decoder

    def stats(self) -> dict:
        return self.prefix.stats()

    def detokenize(self, ids: list[int]) -> str:
        return self.model.tokenizer.decode(ids, skip_special_tokens=True)


def newest_checkpoint(search_dir: str) -> str | None:
    """The most recently written complete checkpoint under ``search_dir`` (any depth), or None.
    A stage-2 export is written after stage 1's, so "newest" is the most trained model."""
    found = []
    for root, _dirs, files in os.walk(search_dir):
        if META in files:
            found.append((os.path.getmtime(os.path.join(root, META)), root))
    return max(found)[1] if found else None


def resolve_checkpoint(checkpoint: str | None, search_dir: str) -> str | None:
    """Absolute path (or URL) of the checkpoint to serve, decided where the app is built (the
    replica's working directory may differ from the CLI's)."""
    if checkpoint:
        return checkpoint if "://" in checkpoint else os.path.abspath(checkpoint)
    found = newest_checkpoint(os.path.abspath(search_dir))
    return os.path.abspath(found) if found else None


def load_engine(checkpoint: str | None, preset: str, model_id: str | None, device: str,
                storage_options: dict | None = None, prefix_bytes: int = 0) -> MMMEngine:
    """Build the model in the replica: a checkpoint (local, or s3:// read with ``storage_options``)
    or an untrained preset; ``prefix_bytes`` bounds its prefix KV cache."""
    from mmm.config import preset as make_preset
    from mmm.model import MMMModel

    if checkpoint:
        log.info("loading checkpoint %s", checkpoint)
        import torch

        from mmm.precision import native_bf16

        # bf16 halves memory and runs on tensor cores; CPUs keep the fp32 a CPU run exports, so a
        # CPU replica answers as CPU evaluation does (bf16 serving on CPUs is unmeasured)
        dtype = torch.bfloat16 if device.startswith("cuda") and native_bf16(device) else None
        model = MMMModel.from_pretrained(checkpoint, dtype=dtype, storage_options=storage_options)
    else:
        log.info("no checkpoint: serving the untrained %r preset", preset)
        model = MMMModel.build(make_preset(preset))
    return MMMEngine(model.to(device), model_id, prefix_bytes)
