"""Typed configs for MMMModal and its presets.

One dataclass per part, composed into :class:`ModelConfig`. A part either names a real
checkpoint (``pretrained``: a hub name or a local path) or is built with random weights from
the small sizes given here, which is what the ``tiny`` preset does so that the whole chain runs
offline on one CPU. Every default says why it is what it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SAMPLE_RATE = 16_000
"""Whisper's rate; every clip is resampled to it."""
WINDOW_SECONDS = 30.0
"""Whisper encodes fixed 30 s windows; longer audio is covered by consecutive windows."""
MEL_FRAMES_PER_SECOND = 100
"""Whisper's mel hop is 10 ms; the encoder's stride-2 conv halves this to 50 features/s."""
ENCODER_FRAMES_PER_SECOND = 50
IMAGE = "image"
AUDIO = "audio"
MODALITIES = (IMAGE, AUDIO)
"""The media a conversation holds; mmm.schema re-exports them for its ``modality`` columns."""


@dataclass
class VisionConfig:
    """A frozen SigLIP vision tower."""

    pretrained: str | None = None
    """Hub name or local path of a SigLIP checkpoint; None builds random weights from the sizes below."""
    image_size: int = 32
    """Tiny images keep the tiny preset fast; real towers fix this themselves (384 for base-384)."""
    patch_size: int = 8
    """32 / 8 = 4 x 4 = 16 patches, so 16 tokens per image."""
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    select_layer: int = -2
    """Hidden state taken as the image feature; LLaVA and the paper use the second-to-last layer."""

    def __post_init__(self) -> None:
        if self.pretrained is None and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")


@dataclass
class AudioConfig:
    """A frozen Whisper encoder over 16 kHz mono audio in 30 s windows."""

    pretrained: str | None = None
    """Hub name or local path of a Whisper checkpoint (only its encoder is used)."""
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 128
    num_mel_bins: int = 80
    init_std: float = 0.1
    """Random tiny encoders at Whisper's 0.02 erase their input (positions dominate after the final
    LayerNorm); larger scales keep it. A probe of the projector's shape (stride-4 conv, pooled) on
    700 held-out clips reads beep count best at 0.1 (docs/LEARNING.md#audio-encoder-init-scale).
    Ignored for pretrained weights."""
    select_layer: int = -1
    """Whisper's last layer (after its final LayerNorm), as the paper and Qwen-Audio use."""
    max_seconds: float = 600.0
    """Longest clip accepted: 10 minutes (Qwen2.5-Omni's limit), 20 windows of 30 s, 7500 LM tokens
    at 12.5 a second. A limit, so one request cannot ask for unbounded compute."""
    window_batch: int = 8
    """Windows the encoder runs at once: a 10-minute clip's 20 windows go through in chunks, so the
    encoder's activation memory stays that of 8 windows whatever the clip's length."""
    window_seconds: float | None = None
    """Length of one encoder window, in whole seconds; None is the checkpoint's own (30 s for every
    Whisper) or 30 s for a random encoder. Every window is padded to this length, so a short clip
    costs the whole window: a shorter one runs a pretrained Whisper on the first of its positions
    (mmm/encoders.py ``windowed``), and the tiny preset's random encoder, whose clips are 1-3 s
    long, uses 5 s windows: 6x less encoder work per clip, the same code path."""

    @property
    def positions(self) -> int:
        """Encoder frames per window of a random encoder (Whisper's max_source_positions)."""
        seconds = WINDOW_SECONDS if self.window_seconds is None else self.window_seconds
        return int(seconds * ENCODER_FRAMES_PER_SECOND)


@dataclass
class ProjectorConfig:
    """One projector per modality, mapping encoder features into the LM's embedding space."""

    vision_hidden: int | None = None
    """Hidden width of the 2-layer vision MLP; None uses the LM's width (LLaVA-1.5's mlp2x_gelu)."""
    audio_stride: int = 4
    """Audio is downsampled by a Conv1d with stride 4 (50 -> 12.5 tokens/s) and kernel 4 + 2 x
    ``audio_context``, then GELU and a linear layer. The paper used Conv1d kernel 40 stride 3;
    stride 4 with the context padded on both sides keeps token counts exactly proportional to
    duration."""
    audio_context: int = 0
    """Frames each audio token also reads on either side of its own ``audio_stride`` (0: none). The
    tiny preset reads 4, which scores higher on ``eval`` on every stage-2 seed tried and a little
    lower on ``eval_ood`` (docs/LEARNING.md, "Audio tokens that see their neighbours")."""
    audio_hidden: int | None = None
    """Hidden width of the audio projector; None uses the LM's width."""
    audio_norm_per_position: bool = False
    """Standardise audio features per (window position, channel) instead of per channel. Per
    channel, frames past the training clips' lengths (a long clip when serving, a clip with a late
    onset) get the statistics of every frame rather than of the few clips that reached them; the
    tiny preset's random encoder learns as well or better that way (docs/LEARNING.md, "Audio
    statistics per channel"). Checkpoints saved per position keep it."""
    item_ordinals: int = 0
    """Learned item-number vectors added to each span (1st image, 2nd image, ...; items past this
    many share the last), trained with the projectors; see mmm/spans.py. 0 (off) keeps LLaVA's
    architecture: a pretrained LM reads the "Image 2:" labels itself. The tiny preset uses 8."""


@dataclass
class LLMConfig:
    """Any Hugging Face causal LM; the tiny preset builds a small Llama."""

    pretrained: str | None = None
    """Hub name or local path (TinyLlama-1.1B, Mistral-7B, ...); None builds a random Llama."""
    hidden_size: int = 128
    num_layers: int = 2
    """The tiny preset uses 3: naming an item ("image 2") and reading it are two attention hops; 3
    layers gave the best run and mean at ~25% more time a step, 4 lose within the 10-minute budget
    (docs/LEARNING.md#lm-depth-and-tied-embeddings)."""
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 2048
    max_context: int = 1024
    """Longest rendered conversation accepted (tokens); at most the LM's positions (the server
    refuses at load time a model that claims more). Real presets raise it (the paper: 8192)."""
    attention: str = "mmm_packed_sdpa"
    """How the LM attends. The default runs each packed sample's slice with causal SDPA (no L x L
    mask; see mmm/attention.py); any transformers name ("sdpa", "flash_attention_2", ...) also works."""
    shared_span_positions: list[str] = field(default_factory=list)
    """Modalities (``image``, ``audio``) whose spans give every token the span's first RoPE position
    (mmm/spans.py). Empty keeps the LM's own positions. The tiny preset shares image spans only: a
    clip's tokens keep their order in time (docs/LEARNING.md, "Audio spans keep their time").
    Needs the packed attention: stock transformers reads a non-increasing step in ``position_ids``
    as the start of a new sample."""
    tie_embeddings: bool = False
    """Share the input embeddings with the output head (a random LM only; a pretrained one keeps its
    own choice). The tiny preset ties them: a fact word's input embedding is then trained by every
    answer naming that fact, not only by the few questions that mention it, which is what yes/no
    claims ("Is the tone in audio 1 high?") compare an item against
    (docs/LEARNING.md#lm-depth-and-tied-embeddings)."""

    def __post_init__(self) -> None:
        if self.tie_embeddings and self.pretrained:
            raise ValueError(f"llm.tie_embeddings applies to a randomly built LM; {self.pretrained!r} keeps its "
                             "own tying: set llm.tie_embeddings=false")
        if isinstance(self.shared_span_positions, bool):  # checkpoints saved when it was on/off for both
            self.shared_span_positions = list(MODALITIES) if self.shared_span_positions else []
        unknown = sorted(set(self.shared_span_positions) - set(MODALITIES))
        if unknown:
            raise ValueError(f"llm.shared_span_positions: unknown modalities {unknown}; "
                             f"choose from {list(MODALITIES)}")
        if self.shared_span_positions and self.attention != "mmm_packed_sdpa":
            raise ValueError(
                f"llm.shared_span_positions needs llm.attention='mmm_packed_sdpa', not {self.attention!r}: "
                "transformers' own attention would split each media span into one-token samples"
            )


@dataclass
class TokenizerConfig:
    pretrained: str | None = None
    """None: the LM's own tokenizer for real presets, or the project's own BPE for the tiny one."""
    vocab_size: int = 2048
    """Size of the project's own byte-level BPE (tiny preset only); trains in a fraction of a second."""


@dataclass
class ModelConfig:
    preset: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seed: int = 0
    """Seed for random-init parts; the tiny preset is the same model on every machine."""
    encoders_bf16: str | bool = "auto"
    """The frozen encoders' precision in feature extraction: ``auto`` is bf16 where the device
    computes it natively (mmm/precision.py), fp32 elsewhere. Features are stored in fp16 either way."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return from_dict(cls, d)


def from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Build a (nested) dataclass from plain data; unknown keys are an error that names them."""
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__} expects a mapping, got {type(d).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in d.items():
        sub = _dataclass_type(known[name].type, cls)
        kwargs[name] = from_dict(sub, value) if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)


def _dataclass_type(annotation: Any, owner: type) -> type | None:
    if isinstance(annotation, str):
        import sys

        annotation = vars(sys.modules[owner.__module__]).get(annotation, annotation)
    return annotation if dataclasses.is_dataclass(annotation) else None


def _tiny() -> ModelConfig:
    # The two binding aids (mmm/spans.py): a from-scratch LM needs them to tell items apart
    return ModelConfig(
        preset="tiny",
        # the tiny towers are too small for bf16 to pay, and the demo's figures are fp32 features'
        encoders_bf16=False,
        audio=AudioConfig(window_seconds=5.0),
        projector=ProjectorConfig(item_ordinals=8, audio_context=4),
        # 8192 tokens hold an MMDU-sized chat (27 turns, 20 images, 10 clips) or a 10-minute clip
        llm=LLMConfig(num_layers=3, shared_span_positions=[IMAGE], tie_embeddings=True, max_context=8192,
                      max_position_embeddings=8192),
    )


def _tinyllama() -> ModelConfig:
    return ModelConfig(
        preset="tinyllama",
        vision=VisionConfig(pretrained="google/siglip-base-patch16-384"),
        audio=AudioConfig(pretrained="openai/whisper-small", init_std=0.02),
        projector=ProjectorConfig(),
        # TinyLlama was trained with 2048 positions (its config.json); the paper's 8192 needs Mistral
        llm=LLMConfig(pretrained="TinyLlama/TinyLlama-1.1B-Chat-v1.0", max_context=2048),
    )


def _mistral() -> ModelConfig:
    cfg = _tinyllama()
    cfg.preset = "mistral"
    cfg.llm = LLMConfig(pretrained="mistralai/Mistral-7B-Instruct-v0.2", max_context=8192)
    return cfg


def _small_real() -> ModelConfig:
    """Real pretrained audio and language weights that fit a CPU: Whisper-base's encoder (74M-param
    Whisper, encoder 20.6M; 10 s windows, only the frames that cover audio kept) and
    SmolLM2-135M-Instruct (134.5M, 30 layers, 8192 positions) with its own tokenizer extended by
    MMM's media tokens. The vision tower is a SMALL RANDOM SigLIP (the tiny preset's sizes: 32 px,
    16 patches): no real SigLIP/CLIP weights exist in any registry package, so none exist offline.

    ``pretrained`` points at the folders ``python jobs/weights.py small-real`` writes (under
    ``$MMM_WEIGHTS_DIR``, default ``~/.cache/mmm/weights``; see mmm/weights). With a model hub the
    same preset takes hub names: ``audio.pretrained=openai/whisper-base
    llm.pretrained=HuggingFaceTB/SmolLM2-135M-Instruct``. Real-preset semantics: no item-number
    vectors, the LM's own positions and tying.

    Whisper runs on 10 s windows, the first 500 of its 1500 positions: its clips are 1-5 s phrases,
    and a 30 s window would make their features cost 5x more for transcription no better
    (docs/LEARNING.md, "Shorter Whisper windows"). ``audio.window_seconds=null`` restores 30 s.
    """
    from .weights import local_path

    return ModelConfig(
        preset="small-real",
        vision=VisionConfig(),
        audio=AudioConfig(pretrained=local_path("whisper-base"), init_std=0.02, window_seconds=10.0),
        projector=ProjectorConfig(),
        # 2048 of the LM's 8192 positions: a 30 s clip is 375 tokens, so several clips and turns fit, and
        # CPU attention stays cheap; raise it for longer conversations
        llm=LLMConfig(pretrained=local_path("smollm2-135m-instruct"), max_context=2048),
    )


PRESETS = {"tiny": _tiny, "small-real": _small_real, "tinyllama": _tinyllama, "mistral": _mistral}


def preset(name: str) -> ModelConfig:
    """A fresh config for a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
