"""What the server needs from a model, as a small protocol, and its implementation over MMMModel.

The service (batching, caching, streaming) only talks to a :class:`ChatEngine`; tests can give it
a fake one. :func:`load_engine` picks the model to serve: an explicit checkpoint, else the newest
export under ``outputs/demo`` (``make demo`` writes ``stage1/final`` then ``stage2/final``), else
the tiny preset with random weights, so ``serve run serve.app:mmm`` always has something to serve.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol, Sequence

from .openai_schema import SamplingParams

log = logging.getLogger("ray.serve")
META = "mmm.json"
"""The file ``mmm.checkpoint.save`` writes last; its presence marks a complete checkpoint."""


class Decoder(Protocol):
    finished: bool

    def step(self) -> list[int | None]: ...

    def finish(self, row: int) -> None: ...


class ChatEngine(Protocol):
    model_id: str
    max_context: int

    def encoder_name(self, modality: str) -> str: ...

    def decode_media(self, modality: str, data: bytes, name: str) -> Any:
        """Bytes -> what ``encode`` takes; raises ``mmm.media.MediaError`` (a ValueError) for bad media."""

    def encode(self, modality: str, items: list) -> list: ...

    def render(self, messages: list[dict], features: list) -> list[int]:
        """Prompt ids for a conversation (with the assistant's generation prompt)."""

    def start(self, prompts: list[tuple[list[int], list, list]], params: Sequence[SamplingParams]) -> Decoder: ...

    def detokenize(self, ids: list[int]) -> str: ...


class MMMEngine:
    """:class:`ChatEngine` over an ``mmm.model.MMMModel``."""

    def __init__(self, model, model_id: str | None = None) -> None:
        from mmm.media import MediaLimits

        self.model = model.eval()
        self.model_id = model_id or f"mmm-{model.config.preset}-{model.phase}"
        self.max_context = model.config.llm.max_context
        self.limits = MediaLimits(max_audio_seconds=model.config.audio.max_seconds)
        self._encoders = {"image": model.vision.name, "audio": model.audio.name}

    def encoder_name(self, modality: str) -> str:
        return self._encoders[modality]

    def decode_media(self, modality: str, data: bytes, name: str) -> Any:
        from mmm.media import decode_audio, decode_image

        return (decode_image if modality == "image" else decode_audio)(data, self.limits, name)

    def encode(self, modality: str, items: list) -> list:
        return self.model.encode_media(modality, items)

    def render(self, messages: list[dict], features: list) -> list[int]:
        return self.model.render(messages, features, add_generation_prompt=True).input_ids

    def start(self, prompts, params) -> Decoder:
        from .decoding import StepDecoder

        return StepDecoder(self.model, prompts, params)

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
                storage_options: dict | None = None) -> MMMEngine:
    """Build the model in the replica: a checkpoint (local, or s3:// read with ``storage_options``)
    or an untrained preset."""
    from mmm.config import preset as make_preset
    from mmm.model import MMMModel

    if checkpoint:
        log.info("loading checkpoint %s", checkpoint)
        import torch

        # bf16 halves memory and runs on tensor cores; CPUs keep fp32 (slow bf16 kernels there)
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else None
        model = MMMModel.from_pretrained(checkpoint, dtype=dtype, storage_options=storage_options)
    else:
        log.info("no checkpoint: serving the untrained %r preset", preset)
        model = MMMModel.build(make_preset(preset))
    return MMMEngine(model.to(device), model_id)
