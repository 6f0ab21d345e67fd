"""The offline generator: its own media with known facts, and checkable dialogues about them.

Dialogue ``i`` is built from an RNG seeded by ``(seed, i)``: the output does not depend on how
Ray splits the work, and 100k dialogues are a few seconds of pure Python spread over actors.
Its kind cycles through the five kinds and its language alternates every five dialogues, so any
run of 10 consecutive eval dialogues holds every kind in both languages. The first ``eval_fraction``
of dialogues are ``eval`` and use only eval media; media are split by index before any dialogue
is made, so no eval item ever appears in a train dialogue. Each eval dialogue has an ``eval_ood``
twin: the same turns about twin media with the same facts, rendered outside the training ranges. A ``recall_rate`` share of train
dialogues are recall drills (see :class:`DialogueConfig`); the eval split never has any.

An eval turn never asks what the reference answers before it already said ("image 1 red", then
"is image 1 red?"): evaluation feeds those answers back as history, so such a turn scores reading
the text, not the media. An eval dialogue with no fresh question left ends there. Train dialogues
keep such turns: answering from the history is a skill too.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import pyarrow as pa

from mmm.schema import DIALOGUES, KINDS, LANGS

from ..runtime import PoolConfig, require
from . import questions as Q
from .words import COLOURS, COUNTS, PITCHES, SINGLE_REF, label

SOURCE = "offline"
VALUES = {"colour": list(COLOURS), "count": list(COUNTS), "pitch": list(PITCHES)}


@dataclass
class DialogueConfig:
    num_dialogues: int = 20_000
    """Enough for the tiny model's 10-minute stage 2 (about 2-3 passes at batch 32)."""
    eval_fraction: float = 0.1
    """Share of dialogues (and of media) held out for evaluation."""
    max_turns: int = 4
    max_items: int = 3
    """Most images (multi_image) or clips (multi_audio) in one dialogue."""
    relation_rate: float = 0.3
    """Share of turns in multi-item kinds asking a relation (which / same / as many as); these
    compare two items and learn slowest, so most turns ask about one item."""
    verify_rate: float = 0.15
    """Share of single-item questions that state a fact and ask yes/no."""
    speech_rate: float = 0.3
    """Share of audio_instruction dialogues about a spoken word, when speech clips exist."""
    recall_rate: float = 0.15
    """Share of train dialogues made as recall drills: multi-image or multi-audio dialogues whose
    last turn asks about an item shown before the latest one. Elsewhere a turn that shows an item
    usually asks about it, so a from-scratch LM learns to answer about the latest item. Measured on
    the tiny preset: 15% lifted the overall score most; 30% traded the latest item's questions away.
    Train split only: the eval split keeps the natural mix."""
    question_first_rate: float = 0.25
    """Share of turns that show media whose question stands above the media instead of below
    them. API clients send both orders (OpenAI's own examples put the text part first), and
    LLaVA's instruction data places its image either way; a model that only ever saw the media
    first answers a question above them at chance."""
    pool: PoolConfig = field(default_factory=lambda: PoolConfig(concurrency=2, batch_size=1000, num_cpus=0.5))
    """Dialogue-making actors: pure Python, ~0.15 ms a dialogue, so 1000 per call amortises Ray."""


def num_eval(n: int, fraction: float) -> int:
    """Eval dialogues: a multiple of 10 (every kind x language), at least 10 when there are 20+."""
    if n < 20:
        return 0
    return max(10, int(round(n * fraction / 10)) * 10)


class OfflineDialogues:
    """(index) rows -> DIALOGUES rows, from the media pools of each split."""

    NEEDS = ("index",)

    def __init__(self, pools: dict, cfg: DialogueConfig, seed: int, twins: dict[str, str] | None = None):
        """``pools[split][kind]`` is a list of ``(media_id, facts)``; kind is image/audio/speech.
        ``twins`` maps an eval media id to its eval_ood twin (same facts, other rendering)."""
        self.pools, self.cfg, self.seed, self.twins = pools, cfg, seed, twins or {}
        self.n_eval = num_eval(cfg.num_dialogues, cfg.eval_fraction)
        # spoken phrases have no twin: speech holds out phrases of its own (synth/speech.py)
        self._spoken = {m for m, _ in pools.get("eval", {}).get("speech", [])}

    def __call__(self, batch: pa.Table) -> pa.Table:
        require(batch, self.NEEDS, type(self).__name__)
        rows = []
        for i in batch["index"].to_pylist():
            rows.append(self.dialogue(i))
            if rows[-1]["split"] == "eval" and self.twins and not set(rows[-1]["media_ids"]) & self._spoken:
                rows.append(self.twin(rows[-1]))
        return pa.Table.from_pylist(rows, schema=DIALOGUES)

    def twin(self, row: dict) -> dict:
        """The eval_ood copy of an eval dialogue: the same questions and answers about media with
        the same facts, rendered outside the training ranges."""
        missing = [m for m in row["media_ids"] if m not in self.twins]
        if missing:
            raise ValueError(f"{row['dialogue_id']}: no eval_ood twin for media {missing}")
        ids = [self.twins[m] for m in row["media_ids"]]
        return dict(row, dialogue_id=row["dialogue_id"] + "-ood", media_ids=ids, split="eval_ood")

    def dialogue(self, index: int) -> dict:
        rng = random.Random(f"{self.seed}:dialogue:{index}")
        kind, lang = KINDS[index % len(KINDS)], LANGS[(index // len(KINDS)) % len(LANGS)]
        split = "eval" if index < self.n_eval else "train"
        recall = split == "train" and self._recall_kind(index)
        kind = recall or kind
        items = self._pick(kind, self.pools[split], rng)
        messages, media_ids = self._turns(kind, items, lang, rng, bool(recall), fresh=split == "eval")
        return {
            "dialogue_id": f"{SOURCE}-s{self.seed}-{index:07d}",
            "kind": kind,
            "lang": lang,
            "media_ids": media_ids,
            "messages": messages,
            "split": split,
            "source": SOURCE,
        }

    def _recall_kind(self, index: int) -> str | None:
        """The multi-item kind of a recall drill, or None; its own RNG, so the other dialogues are
        the same whatever the rate."""
        rng = random.Random(f"{self.seed}:recall:{index}")
        if rng.random() >= self.cfg.recall_rate:
            return None
        return rng.choice(("multi_image", "multi_audio"))

    def _pick(self, kind: str, pool: dict, rng: random.Random) -> list[Q.Item]:
        if kind == "visual_context":
            chosen = [("image", rng.choice(pool["image"]))]
        elif kind == "audio_instruction":
            speech = pool.get("speech") and rng.random() < self.cfg.speech_rate
            chosen = [("speech", rng.choice(pool["speech"]))] if speech else [("audio", rng.choice(pool["audio"]))]
        elif kind == "image_audio":
            chosen = [("image", rng.choice(pool["image"])), ("audio", rng.choice(pool["audio"]))]
            rng.shuffle(chosen)
        else:
            m = "image" if kind == "multi_image" else "audio"
            n = rng.randint(2, min(self.cfg.max_items, len(pool[m])))
            chosen = [(m, x) for x in rng.sample(pool[m], n)]
        return [Q.Item(media_id=mid, kind=k, facts=facts, ref={}) for k, (mid, facts) in chosen]

    def _turns(self, kind: str, items: list[Q.Item], lang: str, rng: random.Random, recall: bool = False, fresh: bool = False):
        multi = kind in ("multi_image", "multi_audio")
        for k, it in enumerate(items, start=1):
            it.ref = {lg: label(it.modality, k, lg) if multi else SINGLE_REF[lg][it.modality] for lg in LANGS}
            it.named = multi
        turns = rng.randint(1, self.cfg.max_turns)
        staggered = multi and turns >= len(items) and rng.random() < 0.5
        if recall and staggered and turns == len(items):
            # a drill asks after its last item is shown, never in the turn that shows it: there
            # the question is about the new item, in eval as in the rest of the train split
            turns = min(turns + 1, self.cfg.max_turns)
            staggered = turns > len(items)
        intro = [[it] for it in items] + [[]] * (turns - len(items)) if staggered else [items] + [[]] * (turns - 1)
        messages, media_ids, shown, asked = [], [], [], set()
        stated = set() if fresh else None
        for turn, new in enumerate(intro, start=1):
            qa = self._question(kind, shown + new, new, lang, rng, asked, recall and turn == len(intro), stated)
            if qa is None:
                break
            shown += new
            media_ids += [it.media_id for it in new]
            header = self._header(new, lang, kind)
            above = new and self.cfg.question_first_rate and rng.random() < self.cfg.question_first_rate
            messages.append({"role": "user", "content": f"{qa.question}\n{header}" if above else header + qa.question})
            messages.append({"role": "assistant", "content": qa.answer})
        return messages, media_ids

    @staticmethod
    def _header(new: list[Q.Item], lang: str, kind: str) -> str:
        """Bare spans for the items this turn shows, one a line: the renderer labels each one
        ("Image 2: ", "Audio 1: ", mmm/chat.py), which the questions' "image 2" / "gambar 2" name."""
        return "".join(f"<{it.modality}></{it.modality}>\n" for it in new)

    def _question(self, kind, shown, new, lang, rng, asked, recall=False, stated=None) -> Q.QA | None:
        """A question not yet asked in this dialogue (up to a few tries), with its answer; a recall
        question asks about an item shown before the latest one. With ``stated`` (the facts earlier
        answers said), the question must also need a fact not among them, or there is none."""
        qa = None
        for _ in range(8):
            qa = self._recall(shown, lang, rng) if recall else self._candidate(kind, shown, new, lang, rng)
            fresh = stated is None or not qa.answered_by(stated)
            if qa.question not in asked and fresh:
                break
        else:
            if stated is not None:
                return None
        asked.add(qa.question)
        if stated is not None:
            stated |= qa.states
        return qa

    def _candidate(self, kind, shown, new, lang, rng):
        cfg = self.cfg
        if len(shown) >= 2 and rng.random() < cfg.relation_rate:
            if kind == "image_audio":
                image = next(it for it in shown if it.modality == "image")
                return Q.cross(image, next(it for it in shown if it.modality == "audio"), lang)
            if rng.random() < 0.5:
                found = Q.which(shown, lang, rng, [it.ref[lang] for it in shown])
                if found:
                    return found
            return Q.same(shown, lang, rng)
        return self._about(rng.choice(new if new and len(shown) > len(new) else shown), lang, rng)

    def _recall(self, shown, lang, rng):
        return self._about(rng.choice(shown[:-1]), lang, rng)

    def _about(self, item, lang, rng):
        """One question about one item: an attribute, or now and then a fact to confirm."""
        if rng.random() < self.cfg.verify_rate:
            found = Q.verify(item, lang, rng, VALUES)
            if found:
                return found
        return Q.attribute(item, lang, rng)


def twins_from_manifest(rows: list[dict]) -> dict[str, str]:
    """eval media id -> the eval_ood media id with the same kind and index (hence the same facts)."""
    ood = {(r["kind"], r["index"]): r["media_id"] for r in rows if r["split"] == "eval_ood"}
    return {r["media_id"]: ood[(r["kind"], r["index"])] for r in rows
            if r["split"] == "eval" and (r["kind"], r["index"]) in ood}


def pools_from_manifest(rows: list[dict]) -> dict:
    """``pools[split][kind] = [(media_id, facts), ...]`` from MakeMedia's manifest rows (+ split)."""
    pools: dict = {"train": {}, "eval": {}, "eval_ood": {}}
    for r in sorted(rows, key=lambda r: (r["kind"], r["index"])):
        pools[r["split"]].setdefault(r["kind"], []).append((r["media_id"], json.loads(r["facts"])))
    return pools
