"""Evaluate a trained checkpoint on the held-out splits: exact match per kind and language, and loss.

Usage:
    python jobs/evaluate.py model=outputs/demo/stage2/final data=outputs/data out=outputs/demo
    python jobs/evaluate.py model=s3://bucket/run/final data=s3://bucket/mmm storage.endpoint_url=... out=/tmp/ev
    python jobs/evaluate.py --help                      # every field with its default

Every assistant turn of every eval dialogue is scored by exact match of its greedy answer, given
the reference history before it (evaluation/exact.py). The eval media never appear in training
(the offline generator splits media before making dialogues). Data with spoken phrases also gets
a transcription report (evaluation/speech.py).

Two splits are scored side by side: ``eval`` (held-out media drawn like the training media) and
``eval_ood`` (the twins of the eval dialogues scored: the same questions about twin media with the same facts, rendered with parameters
outside the training ranges: other canvas sizes, shades, shape sizes, beep and gap lengths,
loudness and noise). The gap between them is how much the model learned the renderer rather than
the facts. Dialogues about spoken phrases have no twin (their held-out phrases are their test).
Data without an ``eval_ood`` split (imported or older data) is scored on ``eval`` only.

Writes under ``out``:
    eval.json      {"overall", "by_kind", "by_lang", "by_kind_lang", "loss", "counts", "model", "seconds",
                    "ood": {"overall", "by_kind", "by_lang", "by_kind_lang", "loss", "counts"},
                    "speech": {"en": {"exact", "word_accuracy", "unseen_exact", "unseen_word_accuracy", "no_speech"}, "ms": ..., "real": ...}}
    accuracy.png   bar chart per kind and language, with the table of figures
    loss.png       training loss curves of both stages (``metrics`` files; missing ones are skipped)
and prints the accuracy table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from evaluation.exact import answer, answer_budget, eval_loss, normalize, score, table, turn_prompts  # noqa: F401 (normalize: API)
from evaluation.plots import plot_accuracy, plot_losses
from pipelines.storage import StorageConfig


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
    max_new_tokens: int = 0
    """Tokens an answer may take; 0: the longest reference's tokens plus a few, since a longer
    answer cannot match (a Malay verdict takes ~11 of SmolLM2's tokens, an English one 6)."""
    loss_context: int = 512
    """Packed row length for the eval loss."""
    threads: int = 0
    """torch threads (0: torch's default, all cores)."""
    storage: StorageConfig = field(default_factory=StorageConfig)


# ---- the job -----------------------------------------------------------------------------------


def load_split(cfg: EvalConfig, split: str | None = None, required: bool = True, limit: bool = True) -> list[dict]:
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
    return first_dialogues(cfg, rows) if limit else rows


def first_dialogues(cfg: EvalConfig, rows: list[dict]) -> list[dict]:
    return rows[: cfg.max_dialogues] if cfg.max_dialogues else rows


def ood_rows(cfg: EvalConfig, rows: list[dict]) -> list[dict]:
    """The ``ood_split`` rows to score beside ``rows``: the twins of the eval dialogues scored (the
    offline generator names a twin ``<id>-ood``; spoken phrases have none), so both columns ask
    about the same dialogues; a split of other dialogues is cut to ``max_dialogues`` on its own."""
    if not cfg.ood_split:
        return []
    ood = load_split(cfg, cfg.ood_split, required=False, limit=False)
    scored = {r["dialogue_id"] + "-ood" for r in rows}
    twins = [r for r in ood if r["dialogue_id"] in scored]
    return twins if twins or not ood else first_dialogues(cfg, ood)


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
    manifest = join(cfg.data, "manifest.parquet")
    ood = ood_rows(cfg, rows)
    if cfg.ood_split and not ood:
        print(f"note: {cfg.data}/dialogues has no {cfg.ood_split!r} rows; scoring {cfg.split!r} only")
    index = load_index(join(cfg.data, "features"), (model.vision.name, model.audio.name),
                       {m for r in rows + ood for m in r["media_ids"]} | speech_ids(manifest, cfg.storage), cfg.storage)
    result = score_rows(model, rows, index, cfg)
    if ood:
        result["ood"] = score_rows(model, ood, index, cfg)
    speech = evaluate_speech(model, manifest, index, cfg.storage)
    if speech is not None:
        result["speech"] = speech
    result.update(model=cfg.model, phase=model.phase, seconds=round(time.time() - start, 1))
    return result


def score_rows(model, rows: list[dict], index, cfg: EvalConfig) -> dict:
    prompts = turn_prompts(model, rows, index)
    budget = cfg.max_new_tokens or answer_budget(model.tokenizer, prompts)
    result = score(prompts, answer(model, prompts, cfg.batch_size, budget))
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
