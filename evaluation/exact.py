"""Exact match of greedy answers: the score every held-out turn of the dialogues gets.

Every assistant turn of every eval dialogue is scored: the prompt is the reference history up to
that turn (teacher forcing), the answer is greedy (``generate_batch``, prompts of similar length
batched together), and it counts as right when it equals the reference after normalisation
(lowercase, punctuation removed, whitespace collapsed). Loss is the teacher-forced mean
cross-entropy over every assistant token, through the model's one loss path.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict

import torch

from mmm.chat import media_modalities
from mmm.schema import AUDIO, IMAGE, KINDS, LANGS

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: "Image 2." == "image 2"."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def turn_prompts(model, rows: list[dict], index) -> list[dict]:
    """One prompt per assistant turn: the reference history before it, with its media features."""
    prompts = []
    for row in rows:
        feats = [index[m] for m in row["media_ids"]]
        messages = row["messages"]
        for j, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            history = messages[:j]
            n = len(media_modalities(history))
            r = model.render(history, feats[:n], add_generation_prompt=True)
            prompts.append({
                "ids": r.input_ids, "reference": msg["content"], "kind": row["kind"], "lang": row["lang"],
                "image": [f for m, f in zip(r.modalities, feats[:n]) if m == IMAGE],
                "audio": [f for m, f in zip(r.modalities, feats[:n]) if m == AUDIO],
            })
    return prompts


ANSWER_MARGIN = 4
"""Tokens an answer may take beyond its reference's: spacing and punctuation that normalise away."""


def answer_budget(tokenizer, prompts: list[dict]) -> int:
    """New tokens enough for the longest reference (and its margin): a longer answer cannot match."""
    longest = max((len(tokenizer(p["reference"], add_special_tokens=False).input_ids) for p in prompts), default=0)
    return longest + ANSWER_MARGIN


@torch.no_grad()
def answer(model, prompts: list[dict], batch_size: int, max_new_tokens: int, progress: bool = True) -> list[str]:
    """Greedy answers, batched by similar prompt length; returned in the prompts' order."""
    from tqdm import tqdm

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]["ids"]))
    out: list[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generate", disable=not progress):
        todo = [(torch.tensor(prompts[i]["ids"]), prompts[i]["image"], prompts[i]["audio"]) for i in batch]
        for i, ids in zip(batch, model.generate_batch(todo, max_new_tokens=max_new_tokens)):
            out[i] = model.tokenizer.decode(ids, skip_special_tokens=True)
    return out


def score(prompts: list[dict], answers: list[str]) -> dict:
    """Exact-match accuracy overall, by kind, by language and by both, with counts."""
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p, a in zip(prompts, answers):
        ok = int(normalize(a) == normalize(p["reference"]))
        for key in ("overall", f"kind:{p['kind']}", f"lang:{p['lang']}", f"kind_lang:{p['kind']}/{p['lang']}"):
            hits[key][0] += ok
            hits[key][1] += 1

    def acc(key: str) -> float | None:
        right, n = hits.get(key, (0, 0))
        return round(right / n, 4) if n else None

    # an imported dataset's own kinds follow the synthesized ones, so by_kind adds up to overall
    named = sorted(k.removeprefix("kind:") for k in hits if k.startswith("kind:"))
    kinds = [k for k in KINDS if k in named] + [k for k in named if k not in KINDS]
    langs = [lg for lg in LANGS if f"lang:{lg}" in hits]
    return {
        "overall": acc("overall"),
        "by_kind": {k: acc(f"kind:{k}") for k in kinds},
        "by_lang": {lg: acc(f"lang:{lg}") for lg in langs},
        "by_kind_lang": {f"{k}/{lg}": acc(f"kind_lang:{k}/{lg}") for k in kinds for lg in langs},
        "counts": {"turns": hits["overall"][1], "by_kind": {k: hits[f"kind:{k}"][1] for k in kinds},
                   "by_lang": {lg: hits[f"lang:{lg}"][1] for lg in langs}},
    }


@torch.no_grad()
def eval_loss(model, rows: list[dict], index, context_length: int) -> float:
    """Teacher-forced mean cross-entropy over every assistant token of ``rows``."""
    from training.rows import render_row
    from mmm.packing import model_inputs, pack_stream

    total, tokens = 0.0, 0
    samples = (render_row(model, r, index) for r in rows)
    for batch in pack_stream(samples, context_length, 8, model.tokenizer.pad_token_id):
        n = int((batch["labels"][:, 1:] != -100).sum())  # HF shifts labels by one
        total += float(model(**model_inputs(batch)).loss) * n
        tokens += n
    return round(total / max(tokens, 1), 4)


def table(result: dict) -> str:
    """The accuracy table: one line per kind, a column per language and the total for the eval
    split, then the same for the ood split when there is one (side by side), then the totals."""
    langs = list(result["by_lang"])
    parts = [("", result)] + ([("ood ", result["ood"])] if result.get("ood") else [])
    pct = lambda v: "   -  " if v is None else f"{100 * v:5.1f}%"  # noqa: E731

    def cells(r: dict, kind: str | None) -> str:
        if kind is None:
            return "".join(f"{pct(r['by_lang'].get(lg)):>8}" for lg in langs) + f"{pct(r['overall']):>8}"
        return "".join(f"{pct(r['by_kind_lang'].get(f'{kind}/{lg}')):>8}" for lg in langs) + f"{pct(r['by_kind'].get(kind)):>8}"

    head = "".join(f"{p + lg:>8}" for p, _ in parts for lg in [*langs, "all"])
    lines = [f"{'kind':<18}{head}{'turns':>7}"]
    for kind in result["by_kind"]:
        lines.append(f"{kind:<18}" + "".join(cells(r, kind) for _, r in parts) + f"{result['counts']['by_kind'][kind]:>7}")
    lines.append(f"{'overall':<18}" + "".join(cells(r, None) for _, r in parts) + f"{result['counts']['turns']:>7}")
    return "\n".join(lines)
