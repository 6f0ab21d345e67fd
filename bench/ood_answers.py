"""Which rendering change costs which answer? Ask a trained tiny checkpoint about single items.

Usage:
    python bench/ood_answers.py outputs/demo/stage2/final            # 120 items a row: ~2 min
    python bench/ood_answers.py CKPT --items 60 --fields beep,tail

Each item is drawn in the training style (``pipelines.synth.media.TRAIN``), in the eval_ood style
(``OOD``), and in the training style with one parameter of ``OOD`` at a time (``partly_ood``), and
asked every attribute question of its modality in English ("How many beeps are in the audio?", ...),
greedy, through the serving scheduler in this process (no Ray). An answer is right when its last
word is the fact. The items come from a seed the demo's synthesis does not use, so none of them
was trained on. Prints accuracy per rendering (rows) and fact (columns); the last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from pipelines.synth.media import make_item, partly_ood
from pipelines.synth.words import ATTRIBUTE, SINGLE_REF, template

FIELDS = {"image": ("canvas", "fill", "shade", "background"), "audio": ("beep", "gap", "tail", "amplitude", "noise")}
"""The rendering parameters of each modality that ``OOD`` moves out of range."""
SEED = 777
"""Not a seed `make demo` synthesizes with."""


def questions(modality: str) -> list[tuple[str, str]]:
    """(fact, English question about the one item, as training asks it) for every attribute of ``modality``."""
    ref = SINGLE_REF["en"][modality]
    return [(fact, template(t, "en").format(ref=ref)) for fact, t in sorted(ATTRIBUTE[modality].items())]


def requests(modality: str, rendering: str, items: int):
    """(request, fact name, expected last word) for every question about ``items`` items."""
    from serve.openai_schema import ChatRequest, MediaItem, SamplingParams

    look = None if rendering == "train" else partly_ood([] if rendering == "ood" else [rendering])
    out = []
    for i in range(items):
        data, facts, _ = make_item(SEED, modality, i, "train" if rendering == "train" else "ood", look)
        for fact, q in questions(modality):
            msg = {"role": "user", "content": [{"type": modality}, {"type": "text", "text": q}]}
            req = ChatRequest("ood-answers", [msg], [MediaItem(modality, "item", data)],
                              SamplingParams(max_tokens=8, temperature=0))
            out.append((req, fact, str(facts[fact])))
    return out


async def answer_all(scheduler, reqs) -> list[str]:
    """Every request's answer, the requests in flight together (the scheduler batches them)."""
    from serve_mmdu import final_event

    return [event.text for event in await asyncio.gather(*(final_event(scheduler, r) for r in reqs))]


def accuracy(scheduler, modality: str, rendering: str, items: int) -> dict:
    asked = requests(modality, rendering, items)
    texts = []
    for start in range(0, len(asked), 32):
        texts += asyncio.run(answer_all(scheduler, [r for r, _, _ in asked[start:start + 32]]))
    right: dict[str, list[bool]] = {}
    for (_, fact, expect), text in zip(asked, texts):
        right.setdefault(fact, []).append(text.split()[-1:] == [expect])
    return {fact: round(sum(r) / len(r), 3) for fact, r in right.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--items", type=int, default=120)
    ap.add_argument("--fields", default="", help="comma-separated rendering parameters (default: all of FIELDS)")
    args = ap.parse_args(argv)
    chosen = [f for f in args.fields.split(",") if f]
    unknown = sorted(set(chosen) - {f for fs in FIELDS.values() for f in fs})
    if unknown:
        raise SystemExit(f"--fields: unknown {unknown}; choose from {FIELDS}")
    torch.set_num_threads(2)
    from serve.cache import FeatureCache
    from serve.engine import load_engine
    from serve.scheduler import Scheduler
    from serve.service import ChatService

    start = time.time()
    engine = load_engine(args.checkpoint, "tiny", None, "cpu")
    scheduler = Scheduler(ChatService(engine, FeatureCache(0)), engine, 16)
    result: dict = {}
    for modality, fields in FIELDS.items():
        rows = ["train", "ood", *(f for f in fields if not chosen or f in chosen)]
        result[modality] = {row: accuracy(scheduler, modality, row, args.items) for row in rows}
    for modality, rows in result.items():
        facts = list(rows["train"])
        print(f"\n{modality:<12}" + "".join(f"{f:>8}" for f in facts))
        for row, acc in rows.items():
            print(f"{row:<12}" + "".join(f"{acc[f]:>8.1%}" for f in facts))
    result.update(items=args.items, seconds=round(time.time() - start, 1), checkpoint=args.checkpoint)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
