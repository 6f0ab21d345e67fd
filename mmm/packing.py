"""Batching rendered samples: packed rows (no pad waste) or padded rows (the baseline).

A sample is ``{"input_ids", "labels", "image_features", "audio_features"}`` (lists of ids and
lists of per-item feature tensors). Packed rows restart ``position_ids`` at 0 for each sample and
pass no attention mask: the LM's attention (``mmm/attention.py``) cuts each row at the restarts
and attends within each sample only, so each gives the logits it would give alone. (With plain
``sdpa`` transformers builds a block-diagonal mask from the same restarts: same logits, slower.)
"""

from __future__ import annotations

import torch

from .chat import IGNORE_INDEX


def plan_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sample indices grouped into rows of at most ``capacity`` tokens."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"sample {i} has {n} tokens, more than the context length {capacity}; filter it first")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def _features(samples, rows) -> tuple[list, list]:
    """Features in the order their placeholders appear: row by row, sample by sample."""
    order = [samples[i] for row in rows for i in row]
    return [f for s in order for f in s["image_features"]], [f for s in order for f in s["audio_features"]]


def collate_packed(samples: list[dict], context_length: int, pad_id: int = 0) -> dict:
    rows = plan_bins([len(s["input_ids"]) for s in samples], context_length)
    width = max(sum(len(samples[i]["input_ids"]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(samples[i]["input_ids"])
            ids[r, at : at + n] = torch.as_tensor(samples[i]["input_ids"])
            labels[r, at : at + n] = torch.as_tensor(samples[i]["labels"])
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)  # trailing pad: a segment of its own
    images, audio = _features(samples, rows)
    real = sum(len(s["input_ids"]) for s in samples)
    return {
        "input_ids": ids, "labels": labels, "position_ids": positions,
        "image_features": images, "audio_features": audio, "num_tokens": real, "rows": rows,
    }


def collate_padded(samples: list[dict], pad_id: int = 0) -> dict:
    """Right-pad every sample to the longest in the batch (the baseline packing is measured against)."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for r, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[r, :n] = torch.as_tensor(s["input_ids"])
        labels[r, :n] = torch.as_tensor(s["labels"])
        mask[r, :n] = 1
    images, audio = _features(samples, [[i] for i in range(len(samples))])
    return {
        "input_ids": ids, "labels": labels, "attention_mask": mask,
        "image_features": images, "audio_features": audio, "num_tokens": int(mask.sum()),
    }


def pad_waste(batch: dict) -> float:
    """Fraction of the batch's token slots that hold padding."""
    return 1.0 - batch["num_tokens"] / batch["input_ids"].numel()


def model_inputs(batch: dict) -> dict:
    """The keys ``MMMModel.forward`` takes."""
    keys = ("input_ids", "labels", "position_ids", "attention_mask", "image_features", "audio_features")
    return {k: batch[k] for k in keys if k in batch}


def pack_stream(samples, context_length: int, rows_per_batch: int, pad_id: int = 0):
    """Packed batches from a stream of samples, carrying leftovers over so rows stay full.

    Samples are buffered until they hold a batch's worth of tokens with some slack; the buffer is
    packed first-fit-decreasing, the ``rows_per_batch`` fullest rows are emitted and the samples of
    the others wait for the next batch. Pad waste is then a few percent, not the half-empty last
    row that packing each fixed batch of samples on its own leaves. The stream's tail is flushed.
    """
    buffer: list[dict] = []
    target = int(rows_per_batch * context_length * 1.25)
    for sample in samples:
        buffer.append(sample)
        if sum(len(s["input_ids"]) for s in buffer) >= target:
            batch, buffer = _fullest_rows(buffer, context_length, rows_per_batch)
            yield collate_packed(batch, context_length, pad_id)
    while buffer:
        batch, buffer = _fullest_rows(buffer, context_length, rows_per_batch)
        yield collate_packed(batch, context_length, pad_id)


def _fullest_rows(buffer: list[dict], capacity: int, count: int) -> tuple[list[dict], list[dict]]:
    rows = plan_bins([len(s["input_ids"]) for s in buffer], capacity)
    rows.sort(key=lambda row: -sum(len(buffer[i]["input_ids"]) for i in row))
    chosen = {i for row in rows[:count] for i in row}
    return [s for i, s in enumerate(buffer) if i in chosen], [s for i, s in enumerate(buffer) if i not in chosen]
