"""The model at full size with no weights: every part built on the meta device.

Planning needs shapes, not numbers: parameter counts per part, tokens per media item, and the
sizes a memory estimate is made of. ``build_meta`` builds an :class:`MMMModel` whose tensors live
on ``torch.device("meta")`` (no memory, seconds, no hub). A part that names a checkpoint takes its
architecture from the config kept in the repo (mmm/model_configs/, the public config.json values)
or, for a local folder, from that folder's config.json; its weights are never read. The tokenizer
of a kept checkpoint is a stand-in that knows only ids: the LM's vocabulary plus the tokens
``extend_tokenizer`` adds, by the same rules (a pad is added only when the tokenizer has no usable
pad or unk token); a local folder's own tokenizer is loaded and extended as training does.
Only for planning: the model cannot run.
"""

from __future__ import annotations

import os

import torch

from .config import ModelConfig
from .model_configs import FILES, hf_config
from .tokenizer import MEDIA_TOKENS, TURN_END, TURN_START, choose_pad_token, load_tokenizer

SPECIAL_TOKENS = {
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": {"unk_token": ("<unk>", 0), "bos_token": ("<s>", 1), "eos_token": ("</s>", 2),
                                           "pad_token": ("</s>", 2)},
    "mistralai/Mistral-7B-Instruct-v0.2": {"unk_token": ("<unk>", 0), "bos_token": ("<s>", 1), "eos_token": ("</s>", 2)},
}
"""(token, id) of the special tokens of each kept checkpoint's tokenizer (its tokenizer_config.json):
what ``extend_tokenizer`` reads to choose a pad. Both reuse ``<unk>``, so neither gets a new pad row."""


class IdsOnlyTokenizer:
    """Token ids of a tokenizer extended with MMM's tokens; no text in or out.

    ``specials`` maps ``unk_token``/``bos_token``/``eos_token``/``pad_token`` to the base tokenizer's
    (token, id); the pad is then chosen by ``mmm.tokenizer.choose_pad_token`` itself, so a new ``<|pad|>``
    row appears only where ``extend_tokenizer`` would add one (no usable pad, no unk)."""

    def __init__(self, base_vocab: int, eos_token_id: int | None, specials: dict[str, tuple[str, int]] | None = None):
        self.base_vocab, self.eos_token_id = base_vocab, eos_token_id
        specials = specials or {}
        self.ids = {token: i for token, i in specials.values()}
        self.added = 0
        for role in ("unk_token", "bos_token", "eos_token", "pad_token"):
            setattr(self, role, specials[role][0] if role in specials else None)
        self.add_special_tokens({"additional_special_tokens": MEDIA_TOKENS + [TURN_START, TURN_END]})
        self.pad_token = choose_pad_token(self)
        self.pad_token_id = self.ids[self.pad_token]

    def add_special_tokens(self, tokens: dict) -> None:
        """What the HF method does to the vocabulary: a token not there yet gets the next id."""
        for role, value in tokens.items():
            for token in value if isinstance(value, list) else [value]:
                if token not in self.ids:
                    self.ids[token] = self.base_vocab + self.added
                    self.added += 1
            if role != "additional_special_tokens":
                setattr(self, role, value)

    def __len__(self) -> int:
        return self.base_vocab + self.added

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.ids[token]


def meta_tokenizer(cfg: ModelConfig, llm_config):
    """The extended tokenizer of ``cfg``'s LM: a local folder's own, else the kept ids."""
    name = cfg.tokenizer.pretrained or cfg.llm.pretrained
    if os.path.isfile(os.path.join(name, "tokenizer_config.json")) or os.path.isfile(os.path.join(name, "tokenizer.json")):
        return load_tokenizer(cfg.tokenizer, cfg.llm.pretrained)
    # A checkpoint whose special tokens are not kept: no unk known, so a new pad row, as
    # extend_tokenizer adds to a tokenizer with neither (at most one row too many).
    return IdsOnlyTokenizer(llm_config.vocab_size, llm_config.eos_token_id, SPECIAL_TOKENS.get(name))


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
            tokenizer = meta_tokenizer(cfg, llm_config)
            # what build_llm's resize_token_embeddings makes (it never shrinks)
            llm_config.vocab_size = max(llm_config.vocab_size, len(tokenizer))
            from transformers import AutoModelForCausalLM

            llm = AutoModelForCausalLM.from_config(llm_config)
        else:
            tokenizer = load_tokenizer(cfg.tokenizer, None)
            llm = build_llm(cfg, len(tokenizer))
        return MMMModel(cfg, tokenizer, vision, audio, llm)


def _arch(name: str | None):
    return architecture(name) if name else None
