"""The offline world's facts and their words in English and Malay.

Small on purpose: 4 colours x 3 shapes x 1-3 shapes per picture, 2 pitches x 1-3 beeps per clip.
The tiny random encoders keep these readable (bench/probe_media.py; docs/LEARNING.md, "Varied media
and eval_ood"), and a small answer space is what lets the tiny model reach high exact match. Every
answer is a few words: a colour, a shape, a pitch or a digit (after the item's name when there are
several: "image 2 red"), "image 2" / "gambar 2", or a verdict after the facts it compares ("green?
blue, so no").
The words are in the tiny tokenizer's corpus (mmm/tokenizer.py), so they are short in tokens.
"""

from __future__ import annotations

COLOURS = {"red": (215, 25, 25), "green": (25, 160, 40), "blue": (30, 60, 220), "yellow": (240, 205, 0)}
SHAPES = ("circle", "square", "triangle")
PITCHES = {"low": (330.0, 420.0), "high": (1300.0, 1700.0)}
"""Hz ranges, two octaves apart: far apart in Whisper's mel bins, each clip a little different."""
COUNTS = (1, 2, 3)

WORDS = {
    "ms": {
        "red": "merah", "green": "hijau", "blue": "biru", "yellow": "kuning",
        "circle": "bulatan", "square": "segi empat", "triangle": "segi tiga",
        "low": "rendah", "high": "tinggi", "yes": "ya", "no": "tidak", "and": "dan", "so": "jadi",
    },
}
LABEL = {"en": {"image": "image", "audio": "audio"}, "ms": {"image": "gambar", "audio": "audio"}}
SINGLE_REF = {"en": {"image": "the image", "audio": "the audio"}, "ms": {"image": "gambar ini", "audio": "audio ini"}}


def word(w: str, lang: str) -> str:
    """A fact word (or yes/no) in ``lang``; English is the key itself."""
    return WORDS.get(lang, {}).get(w, w)


def label(modality: str, k: int, lang: str) -> str:
    """How the text names the k-th item of a modality: "image 2", "gambar 2", "audio 1"."""
    return f"{LABEL[lang][modality]} {k}"


def image_caption(facts: dict, lang: str) -> str:
    """"2 red circles" / "2 bulatan merah"."""
    n, colour, shape = facts["count"], facts["colour"], facts["shape"]
    if lang == "ms":
        return f"{n} {word(shape, 'ms')} {word(colour, 'ms')}"
    return f"{n} {colour} {shape}{'s' if n > 1 else ''}"


def audio_caption(facts: dict, lang: str) -> str:
    """"3 high beeps" / "3 bip tinggi"."""
    n, pitch = facts["count"], facts["pitch"]
    if lang == "ms":
        return f"{n} bip {word(pitch, 'ms')}"
    return f"{n} {pitch} beep{'s' if n > 1 else ''}"


# Questions: (English, Malay) templates. {ref} is "image 2" / "the image"; answers are fact words.
ATTRIBUTE = {
    "image": {
        "colour": ("What colour are the shapes in {ref}?", "Apakah warna bentuk dalam {ref}?"),
        "shape": ("What shape is in {ref}?", "Apakah bentuk dalam {ref}?"),
        "count": ("How many shapes are in {ref}?", "Berapa banyak bentuk dalam {ref}?"),
    },
    "audio": {
        "pitch": ("Is the tone in {ref} high or low?", "Adakah nada dalam {ref} tinggi atau rendah?"),
        "count": ("How many beeps are in {ref}?", "Berapa banyak bip dalam {ref}?"),
    },
}
VERIFY = {
    "image": {
        "colour": ("Are the shapes in {ref} {value}?", "Adakah bentuk dalam {ref} berwarna {value}?"),
        "count": ("Does {ref} have {value}?", "Adakah {ref} mempunyai {value}?"),
    },
    "audio": {
        "pitch": ("Is the tone in {ref} {value}?", "Adakah nada dalam {ref} {value}?"),
        "count": ("Does {ref} have {value}?", "Adakah {ref} mempunyai {value}?"),
    },
}
WHICH = {
    "image": {
        "colour": ("Which image has {value} shapes?", "Gambar manakah yang mempunyai bentuk {value}?"),
        "count": ("Which image has {value}?", "Gambar manakah yang mempunyai {value}?"),
    },
    "audio": {
        "pitch": ("Which audio has a {value} tone?", "Audio manakah yang mempunyai nada {value}?"),
        "count": ("Which audio has {value}?", "Audio manakah yang mempunyai {value}?"),
    },
}
SAME = {
    "image": {
        "colour": ("Do {a} and {b} have the same colour?", "Adakah {a} dan {b} mempunyai warna yang sama?"),
        "count": ("Do {a} and {b} have the same number of shapes?", "Adakah {a} dan {b} mempunyai bilangan bentuk yang sama?"),
    },
    "audio": {
        "pitch": ("Do {a} and {b} have the same pitch?", "Adakah {a} dan {b} mempunyai nada yang sama?"),
        "count": ("Do {a} and {b} have the same number of beeps?", "Adakah {a} dan {b} mempunyai bilangan bip yang sama?"),
    },
}
CROSS = (
    "Are there as many shapes in {image} as beeps in {audio}?",
    "Adakah bilangan bentuk dalam {image} sama dengan bilangan bip dalam {audio}?",
)
SPEECH = ("What is said in {ref}?", "Apakah yang disebut dalam {ref}?")


def things(kind: str, n: int, lang: str) -> str:
    """A counted phrase for yes/no and which-questions: "1 shape", "3 beeps", "2 bip"."""
    if lang == "ms":
        return f"{n} {'bentuk' if kind == 'image' else 'bip'}"
    noun = "shape" if kind == "image" else "beep"
    return f"{n} {noun}{'s' if n > 1 else ''}"


def template(pair: tuple[str, str], lang: str) -> str:
    return pair[0] if lang == "en" else pair[1]
