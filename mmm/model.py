"""MMMModal: frozen encoders -> one projector per modality -> a causal LM.

Text marks each media item with ``<image>`` / ``<audio>`` + N placeholders + the closing tag;
:meth:`MMMModel.embed` fills the placeholders with projected features via ``masked_scatter``.
Training feeds precomputed features, serving computes them with :meth:`encode_media`; both
go through ``embed``. Stage 1 and stage 2 differ only in :meth:`set_trainable` flags.
Two optional aids for an LM learning from scratch which span "image 2" names (item-number vectors,
one position per span; the tiny preset turns both on) are explained in mmm/spans.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from . import checkpoint, generation
from .attention import PACKED_SDPA, register as register_attention
from .chat import IGNORE_INDEX, PlaceholderMismatchError, Rendered, render
from .config import ModelConfig
from .encoders import build_encoders
from .lora import LoraSettings, add_lora, merged
from .pretrained import load_pretrained
from .projectors import AudioProjector, ItemOrdinals, VisionProjector
from .schema import AUDIO, IMAGE, MODALITIES
from .spans import default_positions, item_numbers, shared_span_positions
from .tokenizer import AUDIO_PAD, AUDIO_START, IMAGE_PAD, IMAGE_START, load_tokenizer, mmm_token_ids, stop_token_ids


def build_llm(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.llm.pretrained:
        llm = load_pretrained(AutoModelForCausalLM.from_pretrained, cfg.llm.pretrained, "language model")
        if llm.get_input_embeddings().num_embeddings < vocab_size:
            llm.resize_token_embeddings(vocab_size)
        return llm
    torch.manual_seed(cfg.seed + 2)
    c = cfg.llm
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads,
            num_key_value_heads=c.num_heads,
            max_position_embeddings=c.max_position_embeddings,
            tie_word_embeddings=c.tie_embeddings,
        )
    )


def check_context(config: ModelConfig, llm: nn.Module) -> None:
    """Refuse an ``llm.max_context`` the LM has no positions for (RoPE past its trained length
    degrades silently; learned position tables index out of range)."""
    positions = getattr(llm.config, "max_position_embeddings", None)
    if positions is not None and config.llm.max_context > positions:
        raise ValueError(
            f"llm.max_context {config.llm.max_context} exceeds the LM's max_position_embeddings {positions} "
            f"({config.llm.pretrained or 'random LM'}): set llm.max_context <= {positions}"
        )


def labelled_next_tokens(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) labels -> (B, L-1) mask of the positions whose next token is labelled: what
    ``MMMModel.forward``'s loss is the mean over (token t predicts t+1)."""
    return labels[:, 1:] != IGNORE_INDEX


def labelled_tokens(inputs: dict) -> int:
    """How many tokens ``MMMModel.forward``'s loss is the mean of, given its arguments. Training
    weighs micro-batches by it (training/loop.py, ``count_targets``)."""
    return int(labelled_next_tokens(inputs["labels"]).sum())


class MMMModel(nn.Module):
    def __init__(self, config: ModelConfig, tokenizer, vision, audio, llm, phase: str = "init"):
        super().__init__()
        self.config, self.tokenizer, self.phase = config, tokenizer, phase
        self.vision, self.audio, self.llm = vision, audio, llm
        check_context(config, llm)
        if config.llm.attention == PACKED_SDPA:
            register_attention()
        llm.set_attn_implementation(config.llm.attention)
        d = self.embed_dim = llm.get_input_embeddings().embedding_dim  # (adapters later wrap the embedding)
        p = config.projector
        self.vision_projector = VisionProjector(vision.hidden_size, d, p.vision_hidden, vision.num_patches)
        self.audio_projector = AudioProjector(audio.hidden_size, d, p.audio_hidden, p.audio_stride,
                                              audio.positions if p.audio_norm_per_position else 1, p.audio_context)
        self.item_ordinals = ItemOrdinals(MODALITIES, p.item_ordinals, d) if p.item_ordinals else None
        self.pad_ids = {m: tokenizer.convert_tokens_to_ids(t) for m, t in ((IMAGE, IMAGE_PAD), (AUDIO, AUDIO_PAD))}
        self.open_ids = {m: tokenizer.convert_tokens_to_ids(t) for m, t in ((IMAGE, IMAGE_START), (AUDIO, AUDIO_START))}
        self.stop_ids = stop_token_ids(tokenizer)
        self.set_trainable(projectors=True, llm=False)

    # ---- construction and checkpoints -------------------------------------------------
    @classmethod
    def build(cls, config: ModelConfig) -> "MMMModel":
        """A fresh model: named checkpoints are loaded, the rest is random-initialised."""
        tokenizer = load_tokenizer(config.tokenizer, config.llm.pretrained)
        vision, audio = build_encoders(config)
        model = cls(config, tokenizer, vision, audio, build_llm(config, len(tokenizer)))
        torch.manual_seed(config.seed + 3)
        model.vision_projector.apply(_reset), model.audio_projector.apply(_reset)
        if model.item_ordinals is not None:
            model.item_ordinals.reset_parameters()
        return model

    @classmethod
    def from_pretrained(
        cls, path: str, expect_phase: str | tuple[str, ...] | None = None, dtype: torch.dtype | None = None,
        storage_options: dict | None = None,
    ) -> "MMMModel":
        """Load a checkpoint; ``dtype`` (e.g. torch.bfloat16 on a GPU) casts the whole model.
        ``storage_options``: fsspec options for an s3:// ``path`` (endpoint, keys; mmm/checkpoint.py)."""
        model = checkpoint.load(cls, path, expect_phase, storage_options)
        return model.to(dtype) if dtype is not None else model

    def save_pretrained(self, path: str, phase: str | None = None) -> None:
        checkpoint.save(self, path, phase or self.phase)

    def set_trainable(self, projectors: bool = True, llm: bool | LoraSettings = False) -> None:
        """Freeze flags: stage 1 is (True, False); stage 2 is (True, True) or (True, LoraSettings(...)):
        adapters on the LM, plus the rows of MMM's own tokens (mmm/lora.py)."""
        self.vision.requires_grad_(False)
        self.audio.requires_grad_(False)
        for part in self.projector_parts().values():
            part.requires_grad_(projectors)
        if isinstance(llm, LoraSettings):
            self.llm = add_lora(self.llm, llm, mmm_token_ids(self.tokenizer))
        else:
            self.llm.requires_grad_(bool(llm))

    def merge_lora(self) -> None:
        """Fold LoRA adapters and trained token rows into the LM's own weights, for good: what the end
        of training does before it saves, where a merged copy would hold the LM twice."""
        self.llm = merged(self.llm, keep_adapters=False)

    def projector_parts(self) -> dict[str, nn.Module]:
        """What stage 1 trains and the checkpoint keeps beside the LM, by attribute name."""
        parts = {"vision_projector": self.vision_projector, "audio_projector": self.audio_projector}
        if self.item_ordinals is not None:
            parts["item_ordinals"] = self.item_ordinals
        return parts

    # ---- media and text ---------------------------------------------------------------
    def num_media_tokens(self, modality: str, num_frames: int) -> int:
        return self._projector(modality).num_tokens(num_frames)

    def encode_media(self, modality: str, items) -> list[torch.Tensor]:
        """Decoded media (PIL images or 16 kHz waves) -> frozen encoder features, one per item."""
        return (self.vision if modality == IMAGE else self.audio).encode(items)

    def render(self, messages, features, add_generation_prompt: bool = False, **kw) -> Rendered:
        """Render a conversation whose i-th media item has encoder features ``features[i]``;
        ``kw``: ``continue_final_message``, ``number_media`` (see ``mmm.chat.render``)."""
        from .chat import media_modalities

        modalities = media_modalities(messages)
        if len(modalities) != len(features):
            raise PlaceholderMismatchError(
                f"the conversation marks {len(modalities)} media items but {len(features)} feature tensors were given"
            )
        counts = [self.num_media_tokens(m, f.shape[0]) for m, f in zip(modalities, features)]
        return render(self.tokenizer, messages, counts, add_generation_prompt, **kw)

    # ---- the shared forward path ------------------------------------------------------
    def _projector(self, modality: str) -> nn.Module:
        return self.vision_projector if modality == IMAGE else self.audio_projector

    def _project(self, modality: str, feats: list[torch.Tensor], dtype, device) -> torch.Tensor:
        """Project each item, concatenated in order: (sum of tokens, D)."""
        proj = self._projector(modality)
        if not feats:
            return torch.zeros(0, self.embed_dim, dtype=dtype, device=device)
        w = next(proj.parameters())
        return torch.cat([proj(f.to(device=device, dtype=w.dtype)) for f in feats]).to(dtype)

    def embed(self, input_ids: torch.Tensor, image_features=(), audio_features=(), position_ids=None) -> torch.Tensor:
        """(B, L) ids + per-item features in order of appearance -> (B, L, D) input embeddings.

        ``position_ids`` (packed rows: 0 starts each sample) only matter for item numbers."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        for modality, feats in ((IMAGE, list(image_features)), (AUDIO, list(audio_features))):
            projected = self._project(modality, feats, embeds.dtype, embeds.device)  # (N, D)
            mask = input_ids == self.pad_ids[modality]
            if int(mask.sum()) != projected.shape[0]:
                raise PlaceholderMismatchError(
                    f"{int(mask.sum())} {modality} placeholder tokens but {projected.shape[0]} projected "
                    f"{modality} features ({len(feats)} items)"
                )
            if projected.shape[0] == 0:  # trainable parts stay in the graph: ZeRO waits for each gradient
                embeds = embeds + 0.0 * _dummy_sum(self._projector(modality), self.item_ordinals)
                continue
            if self.item_ordinals is not None:  # row-major, the order masked_scatter fills in
                numbers = item_numbers(input_ids, self.open_ids[modality], position_ids)[mask]
                projected = projected + self.item_ordinals(modality, numbers).to(projected.dtype)
            embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), projected)
        return embeds

    def lm_positions(self, input_ids: torch.Tensor, position_ids=None, attention_mask=None):
        """The ``position_ids`` to give the LM with ``embed``'s output: the caller's (or the LM's
        default), with each span of a modality in ``llm.shared_span_positions`` sharing one position."""
        if not self.config.llm.shared_span_positions:
            return position_ids
        if position_ids is None:
            position_ids = default_positions(input_ids, attention_mask)
        shared = [self.pad_ids[m] for m in self.config.llm.shared_span_positions]
        return shared_span_positions(input_ids, position_ids, shared)

    def forward(self, input_ids, image_features=(), audio_features=(), labels=None, attention_mask=None, position_ids=None):
        """(B, L) ids -> ``.logits`` (B, L, V); with ``labels``, ``.loss`` instead: the mean
        cross-entropy of the labelled next tokens, the head run only where a label exists (the one
        loss path of training and evaluation: answers are a few percent of a row's tokens, and the
        head over the vocabulary is a large share of a small LM's work). A batch with no labelled
        token has loss 0 (a mean over nothing would be NaN, and one NaN step ruins the weights),
        still joined to the graph so every rank's backward runs."""
        embeds = self.embed(input_ids, image_features, audio_features, position_ids)  # (B, L, D)
        positions = self.lm_positions(input_ids, position_ids, attention_mask)
        if labels is None:
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                                        use_cache=False).last_hidden_state  # (B, L, D)
        target = labels[:, 1:]  # (B, L-1): token t predicts t+1
        keep = labelled_next_tokens(labels)
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
        if not keep.any():
            return SimpleNamespace(loss=logits.float().sum() * 0.0)
        return SimpleNamespace(loss=nn.functional.cross_entropy(logits.float(), target[keep]))

    def prefill(self, prompts):
        """The prompt pass of cached decoding. ``prompts``: (ids, image_features, audio_features)
        per row, left-padded here. Returns the LM's output (logits and KV cache), the (B, L)
        positions it used (left pads do not shift them) and the (B, L) attention mask."""
        device = next(self.llm.parameters()).device
        ids, mask = (t.to(device) for t in generation.left_pad([p[0] for p in prompts], self.tokenizer.pad_token_id))
        positions = self.lm_positions(ids, default_positions(ids, mask))
        embeds = self.embed(ids, [f for p in prompts for f in p[1]], [f for p in prompts for f in p[2]])
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        return out, positions, mask

    @torch.no_grad()
    def generate(self, input_ids, image_features=(), audio_features=(), max_new_tokens: int = 32, **kw) -> list[int]:
        """Greedy (temperature 0) or sampled continuation of one prompt; returns the new token ids."""
        ids = torch.as_tensor(input_ids).reshape(1, -1)
        return self.generate_batch([(ids[0], list(image_features), list(audio_features))], max_new_tokens, **kw)[0]

    @torch.no_grad()
    def generate_batch(
        self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
        stop_token_ids=None, seed: int | None = None, streamer=None,
    ) -> list[list[int]]:
        """Several prompts ``(ids, image_features, audio_features)`` at once, left-padded, KV-cached."""
        return generation.generate_batch(self, prompts, max_new_tokens, temperature, top_p, stop_token_ids, seed, streamer)


def _dummy_sum(*modules: nn.Module | None) -> torch.Tensor:
    return sum(p.sum() for m in modules if m is not None for p in m.parameters())


def _reset(m: nn.Module) -> None:
    if hasattr(m, "reset_parameters") and not isinstance(m, nn.LayerNorm):
        m.reset_parameters()
