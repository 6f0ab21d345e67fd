"""Spoken phrases with known transcripts (espeak-ng), in English and Malay: what teaches a real
audio encoder + LM to transcribe, and what the evaluation checks it learned.

Each item speaks a phrase of 1-4 words from the language's vocabulary below, in one of several
voices, speeds and pitches, or holds no speech at all (noise, a tone, silence), whose answer is
``NO_SPEECH``: without such clips the model learns that every clip has words and invents some.
Items are split by phrase, not by clip:

* ``seen``: an eval phrase made of training words, never spoken as that phrase in training (a
  phrase is held out when its digest falls in one bucket of eight, so both splits agree on it
  without a shared list);
* ``unseen``: an eval phrase holding at least one of ``UNSEEN`` words, which no training clip says.

Every fact comes from ``(seed, index)`` alone, so actors can make items independently.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import tempfile

import numpy as np

VOCAB = {
    "en": (
        "red green blue yellow black white one two three four five six seven eight nine ten "
        "cat dog bird fish horse cow apple bread water milk rice tea house door window table chair "
        "book car road tree river sun moon rain cold hot big small good open close front rear center side "
        "left right go come stop eat drink read walk run sleep today morning night"
    ).split(),
    "ms": (
        "merah hijau biru kuning hitam putih satu dua tiga empat lima enam tujuh lapan sembilan sepuluh "
        "kucing anjing burung ikan kuda lembu epal roti air susu nasi teh rumah pintu tingkap meja kerusi "
        "buku kereta jalan pokok sungai matahari bulan hujan sejuk panas besar kecil baik buka tutup kiri kanan "
        "pergi datang berhenti makan minum baca duduk lari tidur hari pagi malam"
    ).split(),
}
"""The words training clips say (~60 per language). English has the words of alsa-utils' real
recordings ("front", "rear", "center", "side" besides "left", "right"), so the recordings measure how
a model trained on espeak-ng's voices hears people, not whether it knows a word it never heard."""
UNSEEN = {
    "en": ("garden", "pencil", "orange", "mountain", "kitchen", "letter"),
    "ms": ("taman", "pensel", "gunung", "surat", "bunga", "pantai"),
}
"""Words no training clip says; eval phrases with them measure what the model does with new words."""
NO_SPEECH = {"en": "no speech", "ms": "tiada pertuturan"}
VOICES = {
    "en": ("en-gb", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan"),
    "ms": ("ms",),
}
VARIANTS = ("", "+m1", "+m3", "+m5", "+f1", "+f2", "+f4")
"""espeak-ng voice variants (male/female timbres), so Malay, which has one voice, still varies."""
HELD_OUT_BUCKETS = 8
SPLIT_EVERY = 8
"""Every eighth clip of each language is an eval clip."""
SILENT_RATE = 0.08


REAL_PHRASES = frozenset(f"{a} {b}" for a in ("front", "rear", "side") for b in ("left", "right", "center"))
"""What alsa-utils' recordings say (and one more of each pattern): never spoken in training, so the
recordings measure phrases a model has not heard, as the held-out clips do."""


def held_out(phrase: str) -> bool:
    """Is ``phrase`` an eval-only phrase? The same answer everywhere, from the phrase alone. Eval
    clips use the training clips' voices: what is held out is the phrase, not the speaker."""
    return phrase in REAL_PHRASES or int(hashlib.sha256(phrase.encode()).hexdigest(), 16) % HELD_OUT_BUCKETS == 0


def _phrase(rng: random.Random, words: list[str], must: str | None = None) -> str:
    n = rng.choice((1, 2, 2, 3, 3, 4))
    picked = [rng.choice(words) for _ in range(n)]
    if must is not None:
        picked[rng.randrange(n)] = must
    return " ".join(picked)


def speech_facts(seed: int, index: int) -> dict:
    """The facts of speech item ``index``: lang, phrase (the transcript), group, split and voice."""
    rng = random.Random(f"{seed}:speech:{index}")
    lang = ("en", "ms")[index % 2]
    split = "eval" if (index // 2) % SPLIT_EVERY == 0 else "train"
    voice = {"voice": rng.choice(VOICES[lang]) + rng.choice(VARIANTS), "speed": rng.randint(120, 190),
             "pitch": rng.randint(25, 75), "pad_s": round(rng.uniform(0.1, 1.2), 2)}
    if rng.random() < SILENT_RATE:
        return {"lang": lang, "phrase": NO_SPEECH[lang], "group": "none", "split": split, **voice}
    words = list(VOCAB[lang])
    if split == "eval" and (index // (2 * SPLIT_EVERY)) % 3 == 0:
        phrase, group = _phrase(rng, words, must=rng.choice(UNSEEN[lang])), "unseen"
    else:
        group = "seen"
        phrase = _phrase(rng, words)
        while held_out(phrase) != (split == "eval"):
            phrase = _phrase(rng, words)
    return {"lang": lang, "phrase": phrase, "group": group, "split": split, **voice}


def speak(facts: dict, rng: random.Random, sample_rate: int = 16_000) -> bytes:
    """The clip of ``facts`` as WAV bytes: the phrase spoken, or a clip with no speech, between
    ``pad_s`` seconds of quiet noise on each side (clips vary in length as recordings do)."""
    import io

    import librosa
    import soundfile as sf

    if facts["group"] == "none":
        wave = _no_speech(rng, sample_rate)
    else:
        with tempfile.NamedTemporaryFile(suffix=".wav") as f:
            subprocess.run(["espeak-ng", "-v", facts["voice"], "-s", str(facts["speed"]), "-p", str(facts["pitch"]),
                            "-w", f.name, facts["phrase"]], check=True, capture_output=True)
            wave, sr = sf.read(f.name, dtype="float32")
        wave = librosa.resample(wave, orig_sr=sr, target_sr=sample_rate) if sr != sample_rate else wave
    pad = np.zeros(int(facts["pad_s"] * sample_rate), np.float32)
    nrng = np.random.default_rng(rng.getrandbits(32))
    wave = np.concatenate([pad, wave.astype(np.float32), pad])
    wave = wave + nrng.normal(0.0, rng.uniform(0.0005, 0.004), len(wave)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1, 1), sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _no_speech(rng: random.Random, sample_rate: int) -> np.ndarray:
    """Noise, a hum or near silence, 0.5-3 s."""
    n = int(rng.uniform(0.5, 3.0) * sample_rate)
    nrng = np.random.default_rng(rng.getrandbits(32))
    kind = rng.choice(("noise", "hum", "quiet"))
    if kind == "noise":
        return nrng.normal(0.0, rng.uniform(0.02, 0.1), n).astype(np.float32)
    if kind == "hum":
        t = np.arange(n) / sample_rate
        return (rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * rng.uniform(80, 600) * t)).astype(np.float32)
    return nrng.normal(0.0, 0.001, n).astype(np.float32)
