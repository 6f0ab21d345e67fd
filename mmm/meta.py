"""The model at full size with no weights: every part built on the meta device.

Planning needs shapes, not numbers: parameter counts per part, tokens per media item, and the
sizes a memory estimate is made of. ``build_meta`` builds an :class:`MMMModel` whose tensors live
on ``torch.device("meta")`` (no memory, seconds, no hub). A part that names a checkpoint takes its
architecture from the config kept in the repo (mmm/model_configs/, the public config.json values)
or, for a local folder, from that folder's config.json; its weights are never read. The tokenizer
is a stand-in that knows only ids: the LM's vocabulary plus the tokens ``extend_tokenizer`` adds.
Only for planning: the model cannot run.
"""

from __future__ import annotations

import os

import torch

from .config import ModelConfig
from .model_configs import FILES, hf_config
from .tokenizer import MEDIA_TOKENS, PAD, TURN_END, TURN_START

ADDED_TOKENS = MEDIA_TOKENS + [TURN_START, TURN_END, PAD]
"""What ``extend_tokenizer`` adds to a Llama/Mistral tokenizer (neither has a pad token)."""


class IdsOnlyTokenizer:
    """Token ids of a tokenizer extended with MMM's tokens; no text in or out."""

    def __init__(self, base_vocab: int, eos_token_id: int | None):
        self.base_vocab, self.eos_token_id = base_vocab, eos_token_id
        self.ids = {t: base_vocab + i for i, t in enumerate(ADDED_TOKENS)}
        self.pad_token_id = self.ids[PAD]

    def __len__(self) -> int:
        return self.base_vocab + len(self.ids)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.ids[token]


def architecture(name: str):
    """The transformers config of checkpoint ``name``: kept in the repo, or a local folder's own."""
    if name in FILES:
        return hf_config(name)
    if os.path.isfile(os.path.join(name, "config.json")):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name)
        return getattr(config, "vision_config", config)  # a full SigLIP checkpoint: its vision part
    raise ValueError(f"cannot plan {name!r} offline: keep its config.json in mmm/model_configs/ "
                     f"(kept: {sorted(FILES)}) or give a local folder that has one")


def build_meta(cfg: ModelConfig):
    """``MMMModel`` of ``cfg`` on the meta device (random-init parts as the preset builds them)."""
    from .encoders import AudioEncoder, VisionEncoder
    from .model import MMMModel, build_llm

    if not (cfg.vision.pretrained or cfg.audio.pretrained or cfg.llm.pretrained):
        with torch.device("meta"):
            return MMMModel.build(cfg)
    with torch.device("meta"):
        vision = VisionEncoder(cfg.vision, cfg.seed, architecture=_arch(cfg.vision.pretrained))
        audio = AudioEncoder(cfg.audio, cfg.seed, architecture=_arch(cfg.audio.pretrained))
        if cfg.llm.pretrained:
            llm_config = architecture(cfg.llm.pretrained)
            tokenizer = IdsOnlyTokenizer(llm_config.vocab_size, llm_config.eos_token_id)
            llm_config.vocab_size = len(tokenizer)  # what build_llm's resize_token_embeddings makes
            from transformers import AutoModelForCausalLM

            llm = AutoModelForCausalLM.from_config(llm_config)
        else:
            from .tokenizer import load_tokenizer

            tokenizer = load_tokenizer(cfg.tokenizer, None)
            llm = build_llm(cfg, len(tokenizer))
        return MMMModel(cfg, tokenizer, vision, audio, llm)


def _arch(name: str | None):
    return architecture(name) if name else None
