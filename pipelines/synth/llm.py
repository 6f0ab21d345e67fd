"""The LLM-backed generator: real captions/transcripts + the paper's prompts -> an LM writes replies.

As in MMMModal's data recipe, the LM reads the *text* of each item ("Picture 1: {caption}\n
Picture 2: {caption}\nWhat is related between picture 1 and picture 2.") and its reply becomes
the assistant turn of a dialogue whose user turn shows the *media* instead (``<image></image>``
in place of the caption). Follow-up turns continue the same chat. Two stages:

- :class:`PlanLLMDialogues` (CPU, cheap): kind, language, media, user turns and LM prompts;
- :class:`GenerateReplies` (an actor pool, GPU on a cluster): the LM, loaded once per actor;
  vLLM when importable on a GPU, else transformers' ``generate``, turn by turn over the batch.

Splits are by media: an item is eval when its sha256 falls in the first ``eval_fraction`` of
the hash space, and a dialogue only uses items of its own split. A split asked for dialogues whose
media hold no captioned or transcribed item is an error before any LM work, never a silent gap.

Every reply is checked as the LM wrote it (:mod:`.checks`: no answer, broken turn order, a media
reference the dialogue does not have, an echo of the prompt or question, the wrong language); a
dialogue with a malformed reply is not written but goes to ``<out>/synth_errors/`` (dialogue_id,
kind, lang, turn, reason, reply), and the job prints the counts by reason. The prompt goes
through the model's own chat template.
"""

from __future__ import annotations

import random
import re
import zlib

import pyarrow as pa

from mmm.schema import AUDIO, DIALOGUES, IMAGE, KINDS, LANGS

from ..runtime import PoolConfig, require, set_torch_threads
from ..storage import StorageConfig, join, write_parquet_atomic
from .checks import ANSWER_IN, check_reply
from .offline import num_eval

SOURCE = "llm"
NAMES = {"en": {IMAGE: "Picture", AUDIO: "Audio"}, "ms": {IMAGE: "Gambar", AUDIO: "Audio"}}
ASK = {
    "multi_image": ("What is related between {refs}.", "Apakah kaitan antara {refs}?"),
    "multi_audio": ("What is related between {refs}.", "Apakah kaitan antara {refs}?"),
    "image_audio": ("What is related between the picture and the audio.", "Apakah kaitan antara gambar dan audio ini?"),
    "visual_context": ("Describe the picture.", "Terangkan gambar ini."),
    "audio_instruction": ("What is said in the audio? Summarise it.", "Apakah yang disebut dalam audio ini? Ringkaskan."),
}
FOLLOW_UPS = (
    ("Can you explain more?", "Boleh terangkan lebih lanjut?"),
    ("Summarise that in one sentence.", "Ringkaskan dalam satu ayat."),
    ("Tell me more about {ref}.", "Ceritakan lebih lanjut tentang {ref}."),
)
_MEDIA_TAG = re.compile(r"</?(image|audio)>")
ERRORS_DIR = "synth_errors"
REJECTED = pa.schema([("dialogue_id", pa.string()), ("kind", pa.string()), ("lang", pa.string()), ("turn", pa.int32()),
                      ("reason", pa.string()), ("reply", pa.string())])


def pools_from_media(media: pa.Table, eval_fraction: float) -> dict:
    """``pools[split][modality] = [(media_id, {lang: text})]`` from a MEDIA table."""
    texts: dict = {}
    for r in media.to_pylist():
        text = r["transcript"] or r["caption"]
        entry = texts.setdefault(r["media_id"], (r["modality"], {}))
        if text:
            entry[1][r["lang"] or "en"] = text
    pools: dict = {"train": {IMAGE: [], AUDIO: []}, "eval": {IMAGE: [], AUDIO: []}}
    for mid, (modality, by_lang) in sorted(texts.items()):
        if by_lang:
            split = "eval" if int(mid[:8], 16) / 2**32 < eval_fraction else "train"
            pools[split][modality].append((mid, by_lang))
    return pools


def _feasible(kind: str, pool: dict) -> bool:
    need = {"visual_context": (1, 0), "audio_instruction": (0, 1), "image_audio": (1, 1), "multi_image": (2, 0), "multi_audio": (0, 2)}
    n_img, n_aud = need[kind]
    return len(pool[IMAGE]) >= n_img and len(pool[AUDIO]) >= n_aud


def check_plannable(pools: dict, num_dialogues: int, eval_fraction: float) -> None:
    """Raise when a split is asked for dialogues but its pool fits no kind. Every kind needs an
    image or a clip, so that is an empty pool: each of the split's dialogues would be lost."""
    n_eval = num_eval(num_dialogues, eval_fraction)
    for split, n in (("train", num_dialogues - n_eval), ("eval", n_eval)):
        if n and not any(_feasible(k, pools[split]) for k in KINDS):
            other = sum(len(v) for s, by_m in pools.items() if s != split for v in by_m.values())
            raise ValueError(
                f"{n} {split} dialogues are asked for, but no image or audio item with a caption or transcript "
                f"falls in the {split} split (media are split by their hash at dialogues.eval_fraction="
                f"{eval_fraction}; {other} fall in the other split): add captioned media or change "
                f"dialogues.eval_fraction (with 0, or under 20 dialogues, there is no eval split)")


def _join_refs(refs: list[str], lang: str) -> str:
    return ", ".join(refs[:-1]) + (" dan " if lang == "ms" else " and ") + refs[-1]


class PlanLLMDialogues:
    """(index) rows -> dialogue plans: ids, kind, lang, media, user turns, LM prompts."""

    NEEDS = ("index",)

    def __init__(self, pools: dict, num_dialogues: int, eval_fraction: float, max_turns: int, seed: int):
        self.pools, self.max_turns, self.seed = pools, max_turns, seed
        self.n_eval = num_eval(num_dialogues, eval_fraction)

    def __call__(self, batch: pa.Table) -> pa.Table:
        require(batch, self.NEEDS, type(self).__name__)
        return pa.Table.from_pylist([self.plan(i) for i in batch["index"].to_pylist()])

    def plan(self, index: int) -> dict:
        rng = random.Random(f"{self.seed}:llm:{index}")
        split = "eval" if index < self.n_eval else "train"
        pool = self.pools[split]
        kinds = [k for k in KINDS[index % 5 :] + KINDS[: index % 5] if _feasible(k, pool)]
        if not kinds:
            raise ValueError(f"dialogue {index}: the {split} media pool has no image or audio item; "
                             "check_plannable refuses such pools before planning")
        kind, lang = kinds[0], LANGS[(index // 5) % 2]
        if kind in ("multi_image", "multi_audio"):
            m = IMAGE if kind == "multi_image" else AUDIO
            items = [(m, x) for x in rng.sample(pool[m], rng.randint(2, min(3, len(pool[m]))))]
        else:
            items = [(m, rng.choice(pool[m])) for m in (IMAGE, AUDIO) if m in _modalities(kind)]
        show, tell, refs = [], [], []
        for k, (m, (mid, texts)) in enumerate(items, start=1):
            name = NAMES[lang][m] + (f" {k}" if kind.startswith("multi") else "")
            show.append(f"<{m}></{m}>")  # the renderer labels it ("Image 1: ", mmm/chat.py)
            tell.append(f"{name}: {texts.get(lang) or next(iter(texts.values()))}")
            refs.append(name.lower())
        ask = ASK[kind][0 if lang == "en" else 1].format(refs=_join_refs(refs, lang) if len(refs) > 1 else "")
        questions, prompts = ["\n".join(show + [ask])], ["\n".join(tell + [ask, ANSWER_IN[lang]])]
        for _ in range(rng.randint(1, self.max_turns) - 1):
            follow = rng.choice(FOLLOW_UPS)[0 if lang == "en" else 1].format(ref=rng.choice(refs))
            questions.append(follow)
            prompts.append(f"{follow} {ANSWER_IN[lang]}")
        return {
            "dialogue_id": f"{SOURCE}-s{self.seed}-{index:07d}", "kind": kind, "lang": lang,
            "media_ids": [mid for _, (mid, _) in items], "split": split, "source": SOURCE,
            "questions": questions, "prompts": prompts,
        }


def _modalities(kind: str) -> tuple[str, ...]:
    return {"visual_context": (IMAGE,), "audio_instruction": (AUDIO,), "image_audio": (IMAGE, AUDIO)}[kind]


class GenerateReplies:
    """An LM loaded once per actor; writes every assistant turn of a batch of plans."""

    NEEDS = ("dialogue_id", "kind", "lang", "media_ids", "split", "source", "questions", "prompts")

    def __init__(self, model: str, max_new_tokens: int, temperature: float, top_p: float, use_vllm: bool, num_cpus: float,
                 check: bool = True, errors: str = "", storage: StorageConfig | None = None):
        from .lm import load_backend

        set_torch_threads(num_cpus)
        self.backend = load_backend(model, use_vllm)
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        self.check, self.errors, self.storage = check, errors, storage or StorageConfig()

    def __call__(self, batch: pa.Table) -> pa.Table:
        require(batch, self.NEEDS, type(self).__name__)
        plans = batch.to_pylist()
        chats: list[list[dict]] = [[] for _ in plans]
        replies_as_written: list[list[str]] = [[] for _ in plans]
        for turn in range(max((len(p["prompts"]) for p in plans), default=0)):
            active = [i for i, p in enumerate(plans) if turn < len(p["prompts"])]
            for i in active:
                chats[i].append({"role": "user", "content": plans[i]["prompts"][turn]})
            seed = zlib.crc32(f"{plans[active[0]]['dialogue_id']}:{turn}".encode())  # str hash() varies per process
            replies = self.backend.generate([chats[i] for i in active], seed=seed, **self.sampling)
            for i, reply in zip(active, replies):
                replies_as_written[i].append(reply.strip())
                # Checks see the reply as written; the chat drops media tags, which the next prompt's
                # tokenizer may read as media tokens and which, with checks off, a stored turn must not hold.
                chats[i].append({"role": "assistant", "content": _MEDIA_TAG.sub("", reply).strip()})
        rows, rejected = [], []
        for p, chat, written in zip(plans, chats, replies_as_written):
            bad = self._malformed(p, written)
            if bad:
                rejected.append(bad)
                continue
            # The stored dialogue shows the media (spans) where the LM was shown their text.
            messages = []
            for j, question in enumerate(p["questions"]):
                messages += [{"role": "user", "content": question}, chat[2 * j + 1]]
            rows.append({k: p[k] for k in ("dialogue_id", "kind", "lang", "media_ids", "split", "source")} | {"messages": messages})
        if rejected and self.errors:
            fs, folder = self.storage.filesystem(self.errors)
            write_parquet_atomic(fs, pa.Table.from_pylist(rejected, schema=REJECTED), join(folder, f"part-{rejected[0]['dialogue_id']}.parquet"))
        return pa.Table.from_pylist(rows, schema=DIALOGUES)

    def _malformed(self, plan: dict, replies: list[str]) -> dict | None:
        """The first malformed reply of a dialogue (as the LM wrote it) as a REJECTED row, or None."""
        if not self.check:
            return None
        items = {m: sum(1 for q in plan["questions"] for _ in re.finditer(f"<{m}></{m}>", q)) for m in (IMAGE, AUDIO)}
        for turn, (reply, question) in enumerate(zip(replies, plan["questions"])):
            reason = check_reply(reply, plan["lang"], items, question)
            if reason:
                return {"dialogue_id": plan["dialogue_id"], "kind": plan["kind"], "lang": plan["lang"], "turn": turn,
                        "reason": reason, "reply": reply}
        return None


class LLMGenerator:
    def __init__(self, cfg):
        self.cfg = cfg
        self.pools: dict | None = None

    def prepare(self) -> dict:
        from ..storage import read_parquet

        media_uri = self.cfg.llm.media or join(self.cfg.out, "media.parquet")
        fs, path = self.cfg.storage.filesystem(media_uri)
        media = read_parquet(fs, path)
        if media is None:
            raise FileNotFoundError(f"no media table at {media_uri}: run jobs/features.py first")
        d = self.cfg.dialogues
        self.pools = pools_from_media(media, d.eval_fraction)
        check_plannable(self.pools, d.num_dialogues, d.eval_fraction)
        sizes = {f"{m}/{s}": len(v) for s, by_m in self.pools.items() for m, v in by_m.items()}
        return {"media": sizes, "model": self.cfg.llm.model}

    def report(self) -> dict:
        """Rejected generations by reason (read back from the errors folder after the run)."""
        from collections import Counter

        from ..storage import read_parquet

        fs, path = self.cfg.storage.filesystem(join(self.cfg.out, ERRORS_DIR))
        table = read_parquet(fs, path)
        reasons = Counter(table["reason"].to_pylist()) if table is not None else Counter()
        return {"rejected": sum(reasons.values()), "rejected_by_reason": dict(sorted(reasons.items()))}

    def dialogues(self):
        import ray

        from .generate import _blocks

        fs, errors = self.cfg.storage.filesystem(join(self.cfg.out, ERRORS_DIR))
        if fs.exists(errors):  # a rerun counts its own rejections only
            fs.rm(errors, recursive=True)

        d, g = self.cfg.dialogues, self.cfg.llm
        plan_kwargs = dict(pools=self.pools, num_dialogues=d.num_dialogues, eval_fraction=d.eval_fraction,
                           max_turns=d.max_turns, seed=self.cfg.seed)
        ds = ray.data.from_arrow(_blocks("index", list(range(d.num_dialogues)), g.pool.batch_size))
        plan = PoolConfig(concurrency=1, batch_size=g.pool.batch_size, num_cpus=0.25)
        ds = ds.map_batches(PlanLLMDialogues, fn_constructor_kwargs=plan_kwargs, batch_format="pyarrow", **plan.options())
        gen_kwargs = dict(model=g.model, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                          use_vllm=g.use_vllm, num_cpus=g.pool.num_cpus, check=g.check,
                          errors=join(self.cfg.out, ERRORS_DIR), storage=self.cfg.storage)
        return ds.map_batches(GenerateReplies, fn_constructor_kwargs=gen_kwargs, batch_format="pyarrow", **g.pool.options())
