"""Projectors: frozen-encoder features -> the LM's embedding space, one per modality."""

from __future__ import annotations

import math

import torch
from torch import nn


class FeatureNorm(nn.Module):
    """Standardise each (position, channel) of frozen features with training-set statistics.

    Random tiny encoders (and some real ones) put most of their output's scale in what every item
    shares (positional structure); the content is a small variation on top. Standardising with
    the training set's mean/std makes that variation visible to the projector. The statistics are
    buffers: they travel with the checkpoint, so serving standardises exactly as training did.
    Identity (mean 0, std 1) until :meth:`set_stats` is called.
    """

    def __init__(self, positions: int, dim: int):
        super().__init__()
        self.positions = positions
        self.register_buffer("mean", torch.zeros(positions, dim))
        self.register_buffer("std", torch.ones(positions, dim))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (T, D) in x's dtype; position t uses the statistics of position t mod ``positions``.

        The statistics stay float32 when the projector's weights are cast to bf16 (DeepSpeed casts
        parameters, not buffers): standardise in float32, hand the projector its own dtype back."""
        idx = torch.arange(x.shape[0], device=x.device) % self.positions
        return ((x - self.mean[idx]) / self.std[idx]).to(x.dtype)


class VisionProjector(nn.Module):
    """LLaVA-1.5's mlp2x_gelu: one token per patch."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None, num_patches: int):
        super().__init__()
        hidden = hidden or out_dim
        self.norm = FeatureNorm(num_patches, in_dim)
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden, out_dim)

    def num_tokens(self, num_frames: int) -> int:
        return num_frames

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, Dv) -> (N, D)."""
        return self.linear_2(self.act(self.linear_1(self.norm(feats))))


class AudioProjector(nn.Module):
    """Temporal downsampling by ``stride`` (Conv1d), then GELU and a linear layer.

    Each token reads its own ``stride`` frames and ``context`` frames on either side (kernel
    ``stride + 2 * context``; the paper's projector reads 40 frames a stride of 3). With no context
    it is a 2-layer MLP over stacked frames; with some, a token also sees where its neighbours
    differ from it, which is where a sound starts or stops. Token count is ceil(frames / stride)
    either way: proportional to the clip's duration.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None, stride: int, positions: int, context: int = 0):
        super().__init__()
        if context < 0:
            raise ValueError(f"audio projector context must be >= 0 frames, got {context}")
        hidden = hidden or out_dim
        self.stride, self.context = stride, context
        self.norm = FeatureNorm(positions, in_dim)  # per frame of a window; positions=1: per channel
        self.conv = nn.Conv1d(in_dim, hidden, kernel_size=stride + 2 * context, stride=stride)
        self.act = nn.GELU()
        self.linear = nn.Linear(hidden, out_dim)

    def num_tokens(self, num_frames: int) -> int:
        return math.ceil(num_frames / self.stride)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(T, Da) -> (ceil(T / stride), D)."""
        x = self.norm(feats)
        pad = self.num_tokens(x.shape[0]) * self.stride - x.shape[0]
        # zeros (the standardised mean) before the clip's start and after its end
        x = nn.functional.pad(x, (0, 0, self.context, pad + self.context))
        x = self.conv(x.T.unsqueeze(0)).squeeze(0).T  # (T' / stride, H)
        return self.linear(self.act(x))


class ItemOrdinals(nn.Module):
    """A learned vector per item number and modality (1st image, 2nd image, ..., 1st clip, ...),
    added to every projected token of that item's span; see mmm/spans.py for why.

    Items past ``limit`` share the last vector. Init std 0.05; zero and 0.5 score within noise of it
    (docs/LEARNING.md#binding-aids).
    """

    def __init__(self, modalities: tuple[str, ...], limit: int, dim: int):
        super().__init__()
        self.modalities, self.limit = modalities, limit
        self.table = nn.Embedding(len(modalities) * limit, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.table.weight, 0.0, 0.05)

    def forward(self, modality: str, numbers: torch.Tensor) -> torch.Tensor:
        """(N,) 1-based item numbers -> (N, D)."""
        row = numbers.clamp(1, self.limit) - 1 + self.modalities.index(modality) * self.limit
        return self.table(row)
