"""Packing vs padding: effective (non-pad) training tokens/s on the same data, side by side.

    python bench/train.py [--dialogues 600] [--context 512] [--rows 4] [--seconds 15] [--image-tokens N]

Builds the offline generator's dialogues (all five kinds, English and Malay) over media it makes
in memory, encodes them with the tiny preset's frozen encoders, renders them, then trains the
tiny model (projectors + LM, AdamW) on the same sample stream twice per round: once as packed
rows (``mmm.packing.pack_stream``) and once padded to the longest sample of each batch of the
same token budget. Rounds alternate the order so machine load hits both alike.

The gain is set by how widely sample lengths spread, so the default run measures two lengths of
the same dialogues, each side by side:

* real-preset lengths (the headline): each image as many tokens as the tinyllama and mistral
  presets' SigLIP-base-384 gives (576; the tiny encoder's 16 features tiled), dialogues of
  ~40-1850 tokens, the workload packing exists for;
* tiny lengths: the tiny encoder's 16 tokens an image, dialogues of ~40-190 tokens. Padding wastes
  ~38% there, so 1 / (1 - 0.38) = 1.6x is packing's ceiling on them.

Clips are the same length in both (12.5 tokens a second after the stride-4 projector, as in the
real presets). ``--image-tokens N`` measures one length only. The last line is a JSON object with
the headline figures, ``packed_vs_padded`` (ratio) and ``pad_waste_packed`` (fraction), and the
tiny lengths' figures under ``tiny_lengths``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from mmm.config import preset
from mmm.media import decode_audio, decode_image, media_id
from mmm.model import MMMModel
from mmm.packing import collate_padded, model_inputs, pack_stream, pad_waste
from mmm.schema import AUDIO, IMAGE
from pipelines.synth.media import make_item
from pipelines.synth.offline import DialogueConfig, OfflineDialogues

REAL_IMAGE_TOKENS = 576
"""SigLIP-base-patch16-384, the tinyllama and mistral presets' vision tower: (384 / 16)^2 patches."""


def make_samples(model: MMMModel, num_dialogues: int, seed: int = 0, image_tokens: int = 0) -> list[dict]:
    """Rendered training samples of the offline generator's dialogues; ``image_tokens`` > 0 tiles
    each image's features to that many positions."""
    features, pools = {}, {"train": {}, "eval": {}}
    for kind, n, decode in ((IMAGE, 60, decode_image), (AUDIO, 30, decode_audio)):
        raw = [make_item(seed, kind, i) for i in range(n)]
        feats = model.encode_media(kind, [decode(data) for data, _, _ in raw])
        if kind == IMAGE and image_tokens:
            feats = [f.repeat(-(-image_tokens // len(f)), 1)[:image_tokens] for f in feats]
        for (data, facts, _), f in zip(raw, feats):
            features[media_id(data)] = f
            for split in pools:  # a bench has no held-out media: both splits share them
                pools[split].setdefault(kind, []).append((media_id(data), facts))
    gen = OfflineDialogues(pools, DialogueConfig(num_dialogues=num_dialogues, eval_fraction=0.0), seed)
    samples = []
    for i in range(num_dialogues):
        d = gen.dialogue(i)
        feats = [features[m] for m in d["media_ids"]]
        r = model.render(d["messages"], feats)
        samples.append({
            "input_ids": r.input_ids, "labels": r.labels,
            "image_features": [f for f, m in zip(feats, r.modalities) if m == IMAGE],
            "audio_features": [f for f, m in zip(feats, r.modalities) if m == AUDIO],
        })
    return samples


def padded_batches(samples, tokens_per_batch: int, pad_id: int):
    """Batches of whole samples holding about the same real tokens as a packed batch."""
    batch, tokens = [], 0
    for s in samples:
        batch.append(s)
        tokens += len(s["input_ids"])
        if tokens >= tokens_per_batch:
            yield collate_padded(batch, pad_id)
            batch, tokens = [], 0
    if batch:
        yield collate_padded(batch, pad_id)


def train_rate(model, batches, seconds: float) -> tuple[float, float]:
    """Train until ``seconds`` pass; returns (non-pad tokens/s, pad waste)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for batch in itertools.islice(batches, 3):  # warm-up: first-touch allocations, kernel choice
        model(**model_inputs(batch)).loss.backward()
    real = slots = 0
    start = time.perf_counter()
    for batch in batches:
        loss = model(**model_inputs(batch)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        real += batch["num_tokens"]
        slots += batch["input_ids"].numel()
        if time.perf_counter() - start > seconds:
            break
    return real / (time.perf_counter() - start), 1 - real / slots


def measure(model, args, image_tokens: int) -> dict:
    """Packed vs padded rounds on the dialogues rendered with ``image_tokens`` an image (0: 16)."""
    samples = make_samples(model, args.dialogues, image_tokens=image_tokens)
    lengths = [len(s["input_ids"]) for s in samples]
    tokens = image_tokens or model.vision.num_patches
    print(f"{tokens} tokens an image: {len(samples)} samples, tokens per sample: min {min(lengths)}, "
          f"median {statistics.median(lengths)}, max {max(lengths)}")
    context = args.context
    if max(lengths) > context:  # a packed row must hold the longest sample
        context = -(-max(lengths) // 256) * 256
        print(f"context raised to {context} tokens for the longest sample")
    pad = model.tokenizer.pad_token_id
    results = {"packed": [], "padded": []}
    for r in range(args.rounds):
        order = ("packed", "padded") if r % 2 == 0 else ("padded", "packed")
        for mode in order:
            stream = itertools.cycle(samples)
            batches = (pack_stream(stream, context, args.rows, pad) if mode == "packed"
                       else padded_batches(stream, context * args.rows, pad))
            rate, waste = train_rate(model, batches, args.seconds)
            results[mode].append((rate, waste))
            print(f"round {r + 1} {mode:6s}: {rate:8.0f} non-pad tokens/s, pad waste {waste:.1%}", flush=True)
    packed = statistics.median(x[0] for x in results["packed"])
    padded = statistics.median(x[0] for x in results["padded"])
    return {
        "packed_tokens_per_s": round(packed, 1),
        "padded_tokens_per_s": round(padded, 1),
        "pad_waste_packed": round(statistics.median(x[1] for x in results["packed"]), 4),
        "pad_waste_padded": round(statistics.median(x[1] for x in results["padded"]), 4),
        "packed_vs_padded": round(packed / padded, 3),
        "image_tokens": tokens, "context": context, "rows_per_batch": args.rows,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dialogues", type=int, default=600)
    ap.add_argument("--context", type=int, default=512, help="packed row length (tokens; raised for longer samples)")
    ap.add_argument("--rows", type=int, default=4, help="packed rows per batch")
    ap.add_argument("--seconds", type=float, default=15.0, help="training time per measurement")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--image-tokens", type=int, default=None,
                    help=f"measure only this image length (default: {REAL_IMAGE_TOKENS}, then the tiny encoder's 16)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = MMMModel.build(preset("tiny"))
    model.set_trainable(projectors=True, llm=True)
    if args.image_tokens is not None:
        summary = measure(model, args, args.image_tokens)
    else:
        summary = measure(model, args, REAL_IMAGE_TOKENS)
        summary["tiny_lengths"] = measure(model, args, 0)
    summary["threads"] = torch.get_num_threads()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
