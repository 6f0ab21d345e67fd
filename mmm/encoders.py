"""The frozen encoders: a SigLIP vision tower and a Whisper encoder.

Both are built from a config (random weights, the tiny preset) or loaded from a named checkpoint,
put in eval mode with gradients off, and encode batches of decoded media into per-item feature
tensors. Features are what the projectors consume, so training can precompute them once (the
feature store) and serving can compute them on demand: both paths meet in ``MMMModel.embed``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math

import numpy as np
import torch
from torch import nn

from . import logmel, pixels
from .config import (
    ENCODER_FRAMES_PER_SECOND,
    SAMPLE_RATE,
    AudioConfig,
    ModelConfig,
    VisionConfig,
)
from .pretrained import load_pretrained


# Fields of a transformers config that say where or how a checkpoint was saved or run, not what
# the encoder computes: a hub name, a local folder and a saved MMM checkpoint differ only in these.
_NOT_IDENTITY = frozenset({
    "_name_or_path", "name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype",
    "_commit_hash", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "auto_map", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
    # generation-only settings of an encoder-decoder checkpoint; the encoder never reads them
    "suppress_tokens", "begin_suppress_tokens", "forced_decoder_ids", "max_length",
})


def encoder_id(cfg, seed: int, hf_config=None) -> str:
    """What produced the weights: a digest of the checkpoint's config, or of the random-init config.

    It names the ``encoder`` column of the feature store, so it must not depend on how the
    checkpoint was named: the hub name, a local copy and a saved-and-reloaded MMM checkpoint
    (its ``vision/`` or ``audio/`` folder) give the same id, because the digest covers the loaded
    model's config minus path-like and runtime fields (``_NOT_IDENTITY``). Two checkpoints of the
    same architecture (a model and its fine-tune) share an id: give a fine-tuned encoder's features
    their own store. A random tiny encoder's id digests its MMM config and seed instead.
    """
    if cfg.pretrained and hf_config is not None:
        return f"cfg-{config_digest(hf_config.to_dict())[:12]}"
    weights_of = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RUNTIME_FIELDS}
    digest = hashlib.sha256(json.dumps([weights_of, seed], sort_keys=True).encode()).hexdigest()
    return f"tiny-random-{digest[:8]}"


_RUNTIME_FIELDS = frozenset({"max_seconds", "window_batch"})
"""Encoder settings that change what is accepted or how much runs at once, never the features."""


def config_digest(config: dict) -> str:
    """sha256 of a transformers config dict without the fields in ``_NOT_IDENTITY`` (nested ones too)."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in _NOT_IDENTITY}
        return value

    return hashlib.sha256(json.dumps(clean(config), sort_keys=True, default=str).encode()).hexdigest()


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


class VisionEncoder(nn.Module):
    """SigLIP vision tower; returns the hidden state of ``select_layer`` for every patch."""

    def __init__(self, cfg: VisionConfig, seed: int = 0, weights: str | None = None, architecture=None):
        """``weights``: a folder to load from instead of ``cfg.pretrained`` (a saved MMM model).
        ``architecture``: a ``SiglipVisionConfig`` to build the tower from without loading weights
        (the planner builds real sizes on the meta device; see mmm/meta.py)."""
        super().__init__()
        from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

        self.cfg = cfg
        source = weights or cfg.pretrained
        if architecture is not None:
            self.tower = SiglipVisionModel(architecture)
        elif source:
            self.tower = load_pretrained(SiglipVisionModel.from_pretrained, source, "vision")
        else:
            torch.manual_seed(seed)
            self.tower = SiglipVisionModel(
                SiglipVisionConfig(
                    hidden_size=cfg.hidden_size,
                    intermediate_size=cfg.intermediate_size,
                    num_hidden_layers=cfg.num_layers,
                    num_attention_heads=cfg.num_heads,
                    image_size=cfg.image_size,
                    patch_size=cfg.patch_size,
                    vision_use_head=False,  # the pooled head is unused: we keep every patch
                )
            )
        tc = self.tower.config
        if architecture is not None:
            self.processor = SiglipImageProcessorPil(size={"height": tc.image_size, "width": tc.image_size})
        else:
            self.processor = image_processor(cfg, weights)
        _freeze(self.tower)
        self.hidden_size = tc.hidden_size
        self.num_patches = (tc.image_size // tc.patch_size) ** 2
        self.name = f"siglip:{encoder_id(cfg, seed, tc)}:layer{cfg.select_layer}"

    def preprocess(self, images) -> torch.Tensor:
        """PIL images -> (B, 3, H, W) pixel values, equal to the processor's (see mmm.pixels)."""
        return pixels.pixel_values(self.processor, images)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N_patches, Dv)."""
        dtype = next(self.tower.parameters()).dtype
        out = self.tower(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        return out.hidden_states[self.cfg.select_layer]

    def encode(self, images) -> list[torch.Tensor]:
        """PIL images -> one (N_patches, Dv) float32 tensor each."""
        if not len(images):
            return []
        return self.encode_pixels(pixels.resize(self.processor, images))

    def encode_pixels(self, resized: np.ndarray) -> list[torch.Tensor]:
        """(B, H, W, 3) uint8 from ``pixels.resize`` -> one (N_patches, Dv) float32 tensor each."""
        device = next(self.tower.parameters()).device
        feats = self(pixels.normalize(self.processor, torch.from_numpy(resized).to(device))).float().cpu()
        return list(feats.unbind(0))


def image_processor(cfg: VisionConfig, weights: str | None = None):
    """The SigLIP image processor of a vision config, without building the tower: what a CPU decode
    stage needs to resize images for the encoder (``weights`` as in :class:`VisionEncoder`)."""
    from transformers import SiglipImageProcessorPil

    source = weights or cfg.pretrained
    if source:
        return load_pretrained(SiglipImageProcessorPil.from_pretrained, source, "image processor")
    return SiglipImageProcessorPil(size={"height": cfg.image_size, "width": cfg.image_size})


def frames_for(num_samples: int) -> int:
    """Encoder frames that hold real audio: 50 per second, at least one."""
    return max(1, math.ceil(num_samples * ENCODER_FRAMES_PER_SECOND / SAMPLE_RATE))


class AudioEncoder(nn.Module):
    """Whisper encoder over fixed windows (30 s unless ``window_seconds`` says less), keeping only
    the frames that cover real audio.

    Whisper always sees a full window (its positions are fixed), but the frames past the end of
    the clip hold padding: dropping them makes a 3 s clip's tokens a tenth of a 30 s one's.
    Audio longer than a window is covered by consecutive windows, concatenated in time.
    """

    def __init__(self, cfg: AudioConfig, seed: int = 0, weights: str | None = None, architecture=None):
        """``weights``: a folder to load from instead of ``cfg.pretrained`` (a saved MMM model).
        ``architecture``: a ``WhisperConfig`` to build the encoder from without loading weights
        (the planner builds real sizes on the meta device; see mmm/meta.py)."""
        super().__init__()
        from transformers import WhisperConfig, WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        self.cfg = cfg
        source = weights or cfg.pretrained
        if architecture is not None:
            self.encoder = WhisperEncoder(architecture)
            seconds = architecture.max_source_positions // ENCODER_FRAMES_PER_SECOND
            self.extractor = WhisperFeatureExtractor(feature_size=architecture.num_mel_bins, chunk_length=seconds)
        elif source:
            self.encoder = windowed(load_pretrained(_load_whisper_encoder, source, "audio"), cfg.window_seconds)
            seconds = self.encoder.config.max_source_positions // ENCODER_FRAMES_PER_SECOND
            self.extractor = load_pretrained(WhisperFeatureExtractor.from_pretrained, source, "audio features",
                                             chunk_length=seconds)
        else:
            torch.manual_seed(seed + 1)
            self.encoder = WhisperEncoder(
                WhisperConfig(
                    d_model=cfg.d_model,
                    encoder_layers=cfg.num_layers,
                    encoder_attention_heads=cfg.num_heads,
                    encoder_ffn_dim=cfg.ffn_dim,
                    num_mel_bins=cfg.num_mel_bins,
                    init_std=cfg.init_std,
                    max_source_positions=cfg.positions,
                    # the decoder is never built, but the config insists its ids fit a vocab
                    vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                )
            )
            self.encoder.post_init()
            self.extractor = WhisperFeatureExtractor(
                feature_size=cfg.num_mel_bins, chunk_length=cfg.positions // ENCODER_FRAMES_PER_SECOND
            )
        _freeze(self.encoder)
        self.hidden_size = self.encoder.config.d_model
        self.positions = self.encoder.config.max_source_positions
        self.window_samples = int(self.extractor.chunk_length * SAMPLE_RATE)
        self.name = f"whisper:{encoder_id(cfg, seed, self.encoder.config)}:layer{cfg.select_layer}:{self.extractor.chunk_length}s"

    def windows(self, wave: np.ndarray) -> list[np.ndarray]:
        step = self.window_samples
        return [wave[i : i + step] for i in range(0, max(len(wave), 1), step)]

    def log_mels(self, windows: list[np.ndarray]) -> torch.Tensor:
        """Clips of at most one window each -> (W, n_mels, 2 * positions) Whisper log-mels."""
        if logmel.supports(self.extractor):
            return logmel.log_mel(self.extractor, windows, self.window_samples)
        return self.extractor(windows, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding="max_length")["input_features"]

    @torch.no_grad()
    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """(W, n_mels, 2 * positions) log-mels -> (W, positions, Da) per-window features."""
        dtype = next(self.encoder.parameters()).dtype
        out = self.encoder(mels.to(dtype), output_hidden_states=True)
        return out.hidden_states[self.cfg.select_layer]

    def encode(self, waves) -> list[torch.Tensor]:
        """16 kHz mono clips -> one (T_i, Da) float32 tensor each, T_i = frames of real audio."""
        pieces = [(i, w) for i, wave in enumerate(waves) for w in self.windows(np.asarray(wave, np.float32))]
        if not pieces:
            return []
        device = next(self.encoder.parameters()).device
        per_item: list[list[torch.Tensor]] = [[] for _ in waves]
        step = max(1, self.cfg.window_batch)  # bounded memory: a chunk of windows at a time
        for start in range(0, len(pieces), step):
            chunk = pieces[start : start + step]
            feats = self(self.log_mels([w for _, w in chunk]).to(device)).float().cpu()  # (W, 1500, Da)
            for (i, w), f in zip(chunk, feats):
                per_item[i].append(f[: frames_for(len(w))])
        return [torch.cat(parts, dim=0) for parts in per_item]


def windowed(encoder, window_seconds: float | None):
    """``encoder`` over windows of ``window_seconds``: the same weights, its first positions only.

    Whisper's encoder positions are fixed sinusoids and each window is padded to full length, so a
    2 s clip in a 10 s window costs a fifth of the work of a 30 s one; the features of its frames
    are close to, not equal to, the 30 s window's (docs/LEARNING.md, "Shorter Whisper windows").
    """
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    if window_seconds is None:
        return encoder
    have = encoder.config.max_source_positions
    positions = int(window_seconds * ENCODER_FRAMES_PER_SECOND)
    if window_seconds != int(window_seconds) or not 1 <= positions <= have:
        raise ValueError(
            f"audio.window_seconds={window_seconds:g} does not fit this Whisper checkpoint: its window "
            f"holds {have // ENCODER_FRAMES_PER_SECOND} s ({have} positions); give a whole number of "
            f"seconds up to {have // ENCODER_FRAMES_PER_SECOND}"
        )
    if positions == have:
        return encoder
    config = copy.deepcopy(encoder.config)
    config.max_source_positions = positions
    shorter = WhisperEncoder(config).to(next(encoder.parameters()).dtype)
    state = encoder.state_dict()
    state["embed_positions.weight"] = state["embed_positions.weight"][:positions]
    shorter.load_state_dict(state)
    return shorter


def _load_whisper_encoder(name: str):
    """A saved MMM encoder loads directly; a full Whisper checkpoint gives up its encoder."""
    from transformers import AutoConfig, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    if "WhisperEncoder" in (AutoConfig.from_pretrained(name).architectures or []):
        return WhisperEncoder.from_pretrained(name)
    return WhisperModel.from_pretrained(name).get_encoder()


def build_encoders(cfg: ModelConfig) -> tuple[VisionEncoder, AudioEncoder]:
    return VisionEncoder(cfg.vision, cfg.seed), AudioEncoder(cfg.audio, cfg.seed)
