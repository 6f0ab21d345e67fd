"""Evaluate a trained checkpoint on the held-out splits: exact match per kind and language, and loss.

Usage:
    python jobs/evaluate.py model=outputs/demo/stage2/final data=outputs/data out=outputs/demo
    python jobs/evaluate.py model=s3://bucket/run/final data=s3://bucket/mmm storage.endpoint_url=... out=/tmp/ev
    python jobs/evaluate.py --help                      # every field with its default

Every assistant turn of every eval dialogue is scored: the prompt is the reference history up to
that turn (teacher forcing), the answer is greedy (``generate_batch``, prompts of similar length
batched together), and it counts as right when it equals the reference after normalisation
(lowercase, punctuation removed, whitespace collapsed). The eval media never appear in training
(the offline generator splits media before making dialogues). Loss is the teacher-forced mean
cross-entropy over every assistant token of the eval dialogues.

Two splits are scored side by side: ``eval`` (held-out media drawn like the training media) and
``eval_ood`` (the same dialogues about twin media with the same facts, rendered with parameters
outside the training ranges: other canvas sizes, shades, shape sizes, beep and gap lengths,
loudness and noise). The gap between them is how much the model learned the renderer rather than
the facts. Data without an ``eval_ood`` split (imported or older data) is scored on ``eval`` only.

Writes under ``out``:
    eval.json      {"overall", "by_kind", "by_lang", "by_kind_lang", "loss", "counts", "model", "seconds",
                    "ood": {"overall", "by_kind", "by_lang", "by_kind_lang", "loss", "counts"}}
    accuracy.png   bar chart per kind and language, with the table of figures
    loss.png       training loss curves of both stages (``metrics`` files; missing ones are skipped)
and prints the accuracy table.
"""

from __future__ import annotations

import json
import os
import re
import string
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from mmm.chat import media_modalities
from mmm.schema import AUDIO, IMAGE, KINDS, LANGS
from pipelines.storage import StorageConfig

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


@dataclass
class EvalConfig:
    model: str = "outputs/demo/stage2/final"
    """Checkpoint to evaluate (HF layout from jobs/finetune.py; stage1 or stage2 phase)."""
    data: str = "outputs/data"
    """Data root: <data>/dialogues (eval split) and <data>/features."""
    out: str = "outputs/demo"
    """Folder for eval.json and the PNG plots (local)."""
    metrics: list[str] = field(default_factory=lambda: ["outputs/demo/stage1/metrics.jsonl", "outputs/demo/stage2/metrics.jsonl"])
    """Training metrics.jsonl files whose loss curves go into loss.png (stage 1, stage 2)."""
    split: str = "eval"
    ood_split: str = "eval_ood"
    """A second held-out split scored side by side (stored under "ood"); "" skips it, and data
    without such rows skips it with a note."""
    max_dialogues: int = 0
    """Evaluate only the first N eval dialogues (0: all). The offline generator cycles kinds and
    languages every 10 dialogues, so any multiple of 10 keeps every kind and both languages."""
    batch_size: int = 64
    """Prompts per generate_batch call; prompts are sorted by length first, so padding stays small."""
    max_new_tokens: int = 8
    """Answers are one or two words; a longer output is wrong anyway."""
    loss_context: int = 512
    """Packed row length for the eval loss."""
    threads: int = 0
    """torch threads (0: torch's default, all cores)."""
    storage: StorageConfig = field(default_factory=StorageConfig)


def normalize(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: "Image 2." == "image 2"."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


# ---- prompts and answers -----------------------------------------------------------------------


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

    kinds = [k for k in KINDS if f"kind:{k}" in hits]
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


# ---- report ------------------------------------------------------------------------------------


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


def plot_accuracy(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds, langs = list(result["by_kind"]), list(result["by_lang"])
    fig, (ax, tx) = plt.subplots(2, 1, figsize=(9, 7), gridspec_kw={"height_ratios": [3, 2]})
    width = 0.8 / (len(langs) + 1)
    for j, name in enumerate([*langs, "all"]):
        vals = [result["by_kind"][k] if name == "all" else result["by_kind_lang"].get(f"{k}/{name}") or 0 for k in kinds]
        ax.bar([i + (j - len(langs) / 2) * width for i in range(len(kinds))], [100 * v for v in vals], width, label=name)
    ax.axhline(100 * result["overall"], color="k", ls="--", lw=1, label=f"overall {100 * result['overall']:.1f}%")
    if result.get("ood"):
        ood = result["ood"]
        ax.scatter(range(len(kinds)), [100 * (ood["by_kind"].get(k) or 0) for k in kinds], marker="v", color="r", zorder=3,
                   label="ood, all")
        ax.axhline(100 * ood["overall"], color="r", ls=":", lw=1, label=f"ood overall {100 * ood['overall']:.1f}%")
    ax.set_xticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("exact match (%)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"eval exact match ({result['counts']['turns']} assistant turns), loss {result['loss']}")
    tx.axis("off")
    tx.text(0, 1, table(result), family="monospace", fontsize=9, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_losses(paths: list[str], path: str) -> list[str]:
    """Loss vs optimizer step, one panel per stage's metrics.jsonl; returns the files plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.metrics import read_jsonl

    found = [p for p in paths if os.path.exists(p)]
    fig, axes = plt.subplots(1, max(1, len(found)), figsize=(5 * max(1, len(found)), 3.5), squeeze=False)
    for ax, p in zip(axes[0], found):
        recs = [r for r in read_jsonl(p) if "loss" in r and "step" in r]
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
        ax.set_title(Path(p).parent.name or p)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("train loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return found


# ---- the job -----------------------------------------------------------------------------------


def load_split(cfg: EvalConfig, split: str | None = None, required: bool = True) -> list[dict]:
    import pyarrow.compute as pc

    from mmm.schema import DIALOGUES, check_columns
    from pipelines.storage import join, read_parquet

    fs, path = cfg.storage.filesystem(join(cfg.data, "dialogues"))
    table = read_parquet(fs, path)
    if table is None:
        raise FileNotFoundError(f"{cfg.data}/dialogues has no Parquet files (run jobs/synthesize.py)")
    check_columns(table, DIALOGUES, f"{cfg.data}/dialogues")
    split = split or cfg.split
    rows = table.filter(pc.equal(table["split"], split)).sort_by("dialogue_id").to_pylist()
    if not rows and required:
        raise ValueError(f"{cfg.data}/dialogues has no {split!r} rows")
    return rows[: cfg.max_dialogues] if cfg.max_dialogues else rows


def evaluate(cfg: EvalConfig) -> dict:
    from evaluation.speech import evaluate_speech, speech_ids
    from training.rows import load_index
    from mmm.model import MMMModel
    from pipelines.storage import join

    start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = MMMModel.from_pretrained(cfg.model, expect_phase=("stage1", "stage2"),
                                     storage_options=cfg.storage.storage_options()).eval()
    rows = load_split(cfg)
    manifest = os.path.join(cfg.data, "manifest.parquet")
    ood = load_split(cfg, cfg.ood_split, required=False) if cfg.ood_split else []
    if cfg.ood_split and not ood:
        print(f"note: {cfg.data}/dialogues has no {cfg.ood_split!r} rows; scoring {cfg.split!r} only")
    index = load_index(join(cfg.data, "features"), (model.vision.name, model.audio.name),
                       {m for r in rows + ood for m in r["media_ids"]} | speech_ids(manifest), cfg.storage)
    result = score_rows(model, rows, index, cfg)
    if ood:
        result["ood"] = score_rows(model, ood, index, cfg)
    speech = evaluate_speech(model, manifest, index)
    if speech is not None:
        result["speech"] = speech
    result.update(model=cfg.model, phase=model.phase, seconds=round(time.time() - start, 1))
    return result


def score_rows(model, rows: list[dict], index, cfg: EvalConfig) -> dict:
    prompts = turn_prompts(model, rows, index)
    result = score(prompts, answer(model, prompts, cfg.batch_size, cfg.max_new_tokens))
    result["loss"] = eval_loss(model, rows, index, cfg.loss_context)
    result["counts"]["dialogues"] = len(rows)
    return result


def main(argv: list[str] | None = None) -> dict:
    from pipelines.cli import parse

    cfg = parse(EvalConfig, argv, __doc__)
    result = evaluate(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_accuracy(result, os.path.join(cfg.out, "accuracy.png"))
    plot_losses(cfg.metrics, os.path.join(cfg.out, "loss.png"))
    print(table(result))
    if result.get("ood"):
        print(f"ood ({cfg.ood_split}) loss {result['ood']['loss']}, overall {result['ood']['overall']}")
    if "speech" in result:
        from evaluation.speech import table as speech_table

        print(speech_table(result["speech"]))
    print(f"eval loss {result['loss']}  ({result['counts']['turns']} turns of {result['counts']['dialogues']} dialogues, "
          f"{result['seconds']} s) -> {cfg.out}/eval.json, accuracy.png, loss.png")
    return result


if __name__ == "__main__":
    main()
