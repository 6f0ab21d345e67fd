"""Does the model transcribe? Greedy answers to "What is said in the audio?" on held-out clips.

Every held-out speech clip of the synthesized data (pipelines/synth/speech.py) is asked about once,
as a one-turn dialogue rendered exactly as training renders them, and so are real human
recordings when the machine has them (alsa-utils' eight, whose file name is the transcript).
Per language it reports:

    exact                  share of the ``seen`` phrases (training words, held-out phrases)
                           transcribed exactly, after normalisation
    word_accuracy          1 - WER over the ``seen`` phrases
    unseen_exact           share of the phrases holding a word no training clip says transcribed exactly
    unseen_word_accuracy   1 - WER over those phrases
    no_speech              share of clips without speech answered as such

``speech.real`` holds the same for the real recordings, with the answers themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmm.schema import AUDIO
from pipelines.storage import StorageConfig
from pipelines.synth.speech import NO_SPEECH
from pipelines.synth.words import SINGLE_REF, SPEECH, template

REAL_RECORDINGS = Path("/usr/share/sounds/alsa")
"""alsa-utils' recordings: "Front_Left.wav" says "front left"; Noise.wav says nothing."""


def normalize(text: str) -> list[str]:
    import re
    import string

    return re.sub(f"[{re.escape(string.punctuation)}]", " ", text.lower()).split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words): the numerator and denominator of WER."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def question(lang: str) -> list[dict]:
    """The one-turn prompt of a transcription, as the offline generator writes it."""
    ask = template(SPEECH, lang).format(ref=SINGLE_REF[lang]["audio"])
    return [{"role": "user", "content": f"<{AUDIO}></{AUDIO}>\n{ask}"}]


@torch.no_grad()
def transcribe(model, features: list[torch.Tensor], langs: list[str], batch_size: int = 32, max_new_tokens: int = 16) -> list[str]:
    """Greedy answers for clips given as encoder features, in order."""
    out = []
    for i in range(0, len(features), batch_size):
        prompts = []
        for f, lang in zip(features[i : i + batch_size], langs[i : i + batch_size]):
            r = model.render(question(lang), [f], add_generation_prompt=True)
            prompts.append((torch.tensor(r.input_ids), [], [f]))
        for ids in model.generate_batch(prompts, max_new_tokens=max_new_tokens):
            out.append(model.tokenizer.decode(ids, skip_special_tokens=True).strip())
    return out


def score(items: list[dict], answers: list[str]) -> dict:
    """``items``: facts of each clip (lang, phrase, group); per-language figures as in the module doc."""
    out = {}
    for lang in sorted({it["lang"] for it in items}):
        rows = [(it, a) for it, a in zip(items, answers) if it["lang"] == lang]
        out[lang] = {"clips": len(rows)}
        for group, prefix in (("seen", ""), ("unseen", "unseen_")):
            said = [(it, a) for it, a in rows if it["group"] == group]
            out[lang][f"{prefix}exact"] = _share(said, lambda it, a: normalize(a) == normalize(it["phrase"]))
            out[lang][f"{prefix}word_accuracy"] = _accuracy([(it["phrase"], a) for it, a in said])
        out[lang]["no_speech"] = _share([r for r in rows if r[0]["group"] == "none"],
                                        lambda it, a: normalize(a) == normalize(NO_SPEECH[lang]))
    return out


def _share(rows, ok) -> float | None:
    return round(sum(bool(ok(it, a)) for it, a in rows) / len(rows), 4) if rows else None


def _accuracy(pairs: list[tuple[str, str]]) -> float | None:
    errors = [word_errors(ref, hyp) for ref, hyp in pairs]
    words = sum(n for _, n in errors)
    return round(max(0.0, 1 - sum(e for e, _ in errors) / words), 4) if words else None


def held_out_items(manifest_uri: str, storage: StorageConfig | None = None) -> list[dict]:
    """The eval split's speech clips of a synthesized data root (local or ``s3://``): their facts
    plus ``media_id``."""
    from pipelines.storage import read_parquet

    table = read_parquet(*(storage or StorageConfig()).filesystem(manifest_uri))
    if table is None:
        return []
    return [dict(json.loads(r["facts"]), media_id=r["media_id"]) for r in table.to_pylist()
            if r.get("kind") == "speech" and r.get("split") == "eval"]


def speech_ids(manifest_uri: str, storage: StorageConfig | None = None) -> set[str]:
    return {it["media_id"] for it in held_out_items(manifest_uri, storage)}


def real_recordings(folder: Path = REAL_RECORDINGS) -> list[tuple[Path, str]]:
    """(file, transcript) of each recording found; Noise.wav's transcript is "no speech"."""
    if not folder.is_dir():
        return []
    return [(p, NO_SPEECH["en"] if p.stem.lower() == "noise" else p.stem.replace("_", " ").lower())
            for p in sorted(folder.glob("*.wav"))]


def evaluate_speech(model, manifest_uri: str, index, storage: StorageConfig | None = None) -> dict | None:
    """``eval.json``'s ``speech`` entry, or None when the data has no speech clips."""
    held_out = held_out_items(manifest_uri, storage)
    items = [it for it in held_out if it["media_id"] in index.tensors]
    if len(items) < len(held_out):
        print(f"note: {len(held_out) - len(items)} of {len(held_out)} held-out speech clips have no features "
              "(run jobs/features.py); the speech figures leave them out")
    if not items:
        return None
    result = score(items, transcribe(model, [index[it["media_id"]] for it in items], [it["lang"] for it in items]))
    real = real_recordings()
    if real:
        from mmm.media import decode_audio

        feats = model.encode_media(AUDIO, [decode_audio(p.read_bytes()) for p, _ in real])
        answers = transcribe(model, feats, ["en"] * len(real))
        facts = [{"lang": "en", "phrase": t, "group": "none" if t == NO_SPEECH["en"] else "seen"} for _, t in real]
        result["real"] = {**score(facts, answers)["en"],
                          "answers": {p.name: a for (p, _), a in zip(real, answers)}}
    return result


def table(speech: dict) -> str:
    """The speech table the demo prints."""
    pct = lambda v: "    -" if v is None else f"{100 * v:5.1f}"  # noqa: E731
    lines = [f"{'speech':<8}{'clips':>7}{'exact':>8}{'words':>8}{'unseen':>8}{'silence':>8}"]
    for name, r in speech.items():
        lines.append(f"{name:<8}{r['clips']:>7}{pct(r['exact']):>8}{pct(r['word_accuracy']):>8}"
                     f"{pct(r['unseen_word_accuracy']):>8}{pct(r['no_speech']):>8}")
    return "\n".join(lines)
