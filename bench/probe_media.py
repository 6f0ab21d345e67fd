"""Can the tiny preset's frozen random encoders still read the facts of the varied offline media?

Usage:
    python bench/probe_media.py                    # 480 items a modality: ~2 min CPU (4 min wall, load 2)
    python bench/probe_media.py --items 240 --seed 3
    python bench/probe_media.py --ood-only beep,gap   # twins that differ in those parameters alone

Draws items with the training style (``pipelines.synth.media.TRAIN``) and their twins with the
out-of-range style (``OOD``, the eval_ood split; with ``--ood-only``, the training style with only
the named ``Style`` fields taken from ``OOD``, to see which parameter costs a fact), encodes them
with the tiny preset's encoders (features rounded through fp16, as the feature store keeps them),
standardises them with the training items' statistics as the tiny preset's projectors do (images per
(position, channel); audio per channel over the clips' frames unless the preset says
``audio_norm_per_position``), and fits a probe on 75% of the training-style items. It prints the
probe's accuracy on the other 25% and on the OOD twins of every item, per fact; the last line is
JSON.

Images: a logistic-regression probe on the flattened patch features (colour, shape, count).
Audio: clips have different lengths, so a linear probe over positions cannot count; the probe has
the audio projector's shape (a stride-4 Conv1d, GELU, a kernel-3 Conv1d, max + mean pooled over
time, a linear layer), trained for a few hundred steps (pitch, count).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from mmm.config import preset
from mmm.encoders import build_encoders
from mmm.media import decode_audio, decode_image
from pipelines.synth.media import Style, make_item, partly_ood


def encode(kind: str, n: int, seed: int, style: str, encoder, look: Style | None = None):
    """(features, facts) of items 0..n-1 in ``style`` (rendered with ``look`` when given)."""
    feats, facts = [], []
    for start in range(0, n, 64):
        made = [make_item(seed, kind, i, style, look) for i in range(start, min(n, start + 64))]
        decode = decode_image if kind == "image" else decode_audio
        feats += [f.half().float() for f in encoder.encode([decode(b) for b, _, _ in made])]
        facts += [f for _, f, _ in made]
    return feats, facts


def padded(feats: list[torch.Tensor], length: int) -> torch.Tensor:
    """(N, length, D), zero after each item's end (zero is the training mean after standardising)."""
    out = torch.zeros(len(feats), length, feats[0].shape[1])
    for i, f in enumerate(feats):
        out[i, : min(length, len(f))] = f[:length]
    return out


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-3)
    return [(x - mean) / std for x in (train, *others)]


def standardise_channels(fit: list[torch.Tensor], *groups: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per-channel statistics over the ``fit`` clips' frames, applied to every clip of ``groups``
    before padding, so padding stays 0 (the tiny preset's audio FeatureNorm with positions=1)."""
    frames = torch.cat(fit)
    mean, std = frames.mean(0), frames.std(0).clamp_min(1e-3)
    return [[(f - mean) / std for f in group] for group in groups]


def logistic(x_fit, y_fit, tests) -> list[float]:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=0.1).fit(x_fit.flatten(1).numpy(), y_fit)
    return [float((clf.predict(x.flatten(1).numpy()) == y).mean()) for x, y in tests]


def conv_probe(x_fit, y_fit, tests, steps: int = 300) -> list[float]:
    torch.manual_seed(0)
    d, k = x_fit.shape[2], int(max(y_fit)) + 1
    conv = torch.nn.Sequential(torch.nn.Conv1d(d, 32, 4, stride=4), torch.nn.GELU(), torch.nn.Conv1d(32, 32, 3, padding=1), torch.nn.GELU())
    head = torch.nn.Linear(64, k)

    def logits(x):
        h = conv(x.transpose(1, 2))  # (N, 32, T/4)
        return head(torch.cat([h.max(-1).values, h.mean(-1)], dim=1))

    opt = torch.optim.AdamW([*conv.parameters(), *head.parameters()], lr=3e-3, weight_decay=1e-2)
    y = torch.tensor(y_fit)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,))
        loss = torch.nn.functional.cross_entropy(logits(x_fit[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return [float((logits(x).argmax(-1).numpy() == yt).mean()) for x, yt in tests]


def probe(kind: str, n: int, seed: int, encoder, twins: Style, per_position: bool) -> dict:
    train_f, facts = encode(kind, n, seed, "train", encoder)
    ood_f, ood_facts = encode(kind, n, seed, "ood", encoder, twins)
    assert facts == ood_facts  # twins: the same facts, other rendering
    length = max(len(f) for f in train_f + ood_f)
    fit = int(0.75 * n)
    if kind == "audio" and not per_position:
        train_f, ood_f = standardise_channels(train_f[:fit], train_f, ood_f)
        x_train, x_ood = padded(train_f, length), padded(ood_f, length)
        x_fit, x_held = x_train[:fit], x_train[fit:]
    else:
        x_train, x_ood = padded(train_f, length), padded(ood_f, length)
        x_fit, x_held, x_ood = standardise(x_train[:fit], x_train[fit:], x_ood)
    out = {}
    for fact in ("colour", "shape", "count") if kind == "image" else ("pitch", "count"):
        names = sorted({f[fact] for f in facts}, key=str)
        y = np.array([names.index(f[fact]) for f in facts])
        run = logistic if kind == "image" else conv_probe
        held, ood = run(x_fit, y[:fit], [(x_held, y[fit:]), (x_ood, y)])
        out[fact] = {"held_out": round(held, 3), "ood": round(ood, 3), "chance": round(1 / len(names), 3)}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=480)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ood-only", default="", help="comma-separated Style fields the twins take from OOD (default all)")
    args = ap.parse_args(argv)
    try:
        twins = partly_ood([f for f in args.ood_only.split(",") if f])
    except ValueError as e:
        raise SystemExit(f"--ood-only: {e}") from None
    torch.set_num_threads(2)
    start = time.time()
    cfg = preset("tiny")
    vision, audio = build_encoders(cfg)
    per_position = cfg.projector.audio_norm_per_position
    encoders = {"image": vision, "audio": audio}
    result = {kind: probe(kind, args.items, args.seed, enc, twins, per_position) for kind, enc in encoders.items()}
    print(f"{'fact':<14}{'held-out':>10}{'ood':>8}{'chance':>8}")
    for kind, facts in result.items():
        for fact, r in facts.items():
            print(f"{kind + ' ' + fact:<14}{r['held_out']:>10.1%}{r['ood']:>8.1%}{r['chance']:>8.1%}")
    result["seconds"] = round(time.time() - start, 1)
    result["items"], result["ood_only"] = args.items, args.ood_only or "all"
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
