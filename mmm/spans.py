"""Where each media span sits: its item number, and one shared position for all its tokens.

Two optional aids (``projector.item_ordinals``, ``llm.shared_span_positions``) for an LM that has
to learn from scratch which span "image 2" names. A pretrained LM reads the "Image 2:" label in
front of a span; the tiny preset's random LM instead learns to answer about the most
recent item, which pays on most turns. On the tiny preset the two together make questions about
an earlier item learnable (90% where either alone gives 70%, docs/LEARNING.md#binding-aids):

* the item number (1st, 2nd, ... image of the sample) is embedded into every token of the span,
  so "which span is image 2" is a lookup rather than a count over the whole context;
* every token of an image span gets the RoPE position of its first token (as Qwen2-VL's M-RoPE
  does for an image's time axis), so the label in front of it sits at one fixed distance from all
  of it. A clip's tokens keep one position each: they are its time axis (as Qwen2.5-Omni's TMRoPE
  gives audio), and with one position for all of them the LM reads how much of each sound a clip
  holds but hardly in which order (docs/LEARNING.md, "Audio spans keep their time").

Both are computed from ``input_ids`` (and the packed ``position_ids``, whose zeros start each
sample), so training, evaluation and serving agree without extra inputs.
"""

from __future__ import annotations

import torch


def default_positions(input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """0, 1, 2, ... per row; left padding (mask 0) does not shift the positions of real tokens."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def sample_starts(input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, L) bool: True where a sample starts (position 0); only column 0 when unpacked."""
    if position_ids is None:
        starts = torch.zeros_like(input_ids, dtype=torch.bool)
        starts[:, 0] = True
        return starts
    return position_ids.expand_as(input_ids) == 0


def item_numbers(input_ids: torch.Tensor, open_id: int, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) long: how many ``open_id`` tags (``<image>``) the token's sample has opened up to and
    including it. Inside the k-th span of a sample this is k; before the first span, 0."""
    opens = (input_ids == open_id).long()
    count = opens.cumsum(1)
    starts = sample_starts(input_ids, position_ids)
    # the count reached just before each sample's first token, carried along the sample
    before = torch.where(starts, count - opens, torch.full_like(count, -1))
    return count - torch.cummax(before, dim=1).values.clamp_min(0)


def shared_span_positions(input_ids: torch.Tensor, position_ids: torch.Tensor, pad_ids) -> torch.Tensor:
    """(B, L) positions where each run of placeholder tokens takes its first token's position.

    Tokens outside spans keep theirs, so text after a span is where it would have been, decoding
    continues from the prompt's last position, and packed samples still restart at 0.
    """
    positions = position_ids.expand_as(input_ids)
    pad = torch.isin(input_ids, torch.as_tensor(list(pad_ids), device=input_ids.device))
    first = pad & ~torch.nn.functional.pad(pad[:, :-1], (1, 0), value=False)
    index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    first_index = torch.cummax(torch.where(first, index, torch.zeros_like(index)), dim=1).values
    return torch.where(pad, positions.gather(1, first_index), positions)
