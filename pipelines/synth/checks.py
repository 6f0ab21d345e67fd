"""Checks on an LM's reply before it becomes an assistant turn: malformed generations are rejected.

A small LM often answers nothing, writes the next user turn itself, names a picture that the
dialogue does not have, copies its prompt back, or answers in English when Malay was asked. Each
check returns a short reason (the errors table counts them) or None:

- ``no_answer``: empty, or no letters or digits at all;
- ``turn_order``: the reply carries a chat role marker (it speaks for the user or opens a turn);
- ``media_refs``: it names an item number the dialogue does not have ("picture 3" of two), or
  writes a media tag;
- ``echo``: it repeats the prompt's hidden language instruction (:data:`ANSWER_IN`, either
  language), or it is the question it answers, or nearly (compared without case, punctuation and
  media spans);
- ``wrong_language``: clearly more common words of the other language than of the one asked.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

_ROLE = re.compile(r"\b(user|human|assistant|pengguna|pembantu)\s*:|(^|\n)\s*system\s*:|<\|im_(start|end)\|>|<\|(user|assistant)\|>", re.I)
_TAG = re.compile(r"</?(image|audio)>")
_REF = re.compile(r"\b(picture|image|gambar|audio)\s+(\d+)\b", re.I)
_WORD = re.compile(r"[a-zA-Z]+")
MODALITY_OF = {"picture": "image", "image": "image", "gambar": "image", "audio": "audio"}
COMMON = {
    "en": set("the a an and is are was were of to in that it with for this these those on as be by from at "
              "or not but have has they their there what which can will also about both".split()),
    "ms": set("yang dan ini itu di dengan untuk adalah dalam tidak ke pada kepada boleh ada akan atau juga "
              "saya anda mereka dari oleh kerana seperti lebih sangat kedua gambar bunyi ialah telah".split()),
}
REASONS = ("no_answer", "turn_order", "media_refs", "echo", "wrong_language")
ANSWER_IN = {"en": "Answer in English.", "ms": "Jawab dalam bahasa Melayu."}
"""The instruction every LM prompt ends with; the stored dialogue never shows it."""
ECHO_SIMILARITY = 0.8
"""A reply at least this similar to its question (difflib ratio of the normalised texts) repeats it:
"Describe the picture, please." to "Describe the picture." is 0.85, while a reply that restates
the question and then answers it ("Describe the picture. It shows a red bus.") is under 0.7."""


def check_reply(reply: str, lang: str | None, items: dict[str, int], question: str = "") -> str | None:
    """The reason ``reply`` is malformed, or None. ``items``: how many images / audio clips the
    dialogue shows; ``lang``: the language asked for (None: not checked); ``question``: the user
    turn it answers ("": not compared)."""
    if not re.search(r"\w", reply or ""):
        return "no_answer"
    if _ROLE.search(reply):
        return "turn_order"
    if _TAG.search(reply):
        return "media_refs"
    for word, number in _REF.findall(reply):
        modality = MODALITY_OF[word.lower()]
        if not 1 <= int(number) <= items.get(modality, 0):
            return "media_refs"
    if echoes(reply, question):
        return "echo"
    if lang in COMMON and wrong_language(reply, lang):
        return "wrong_language"
    return None


def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[\W_]+", " ", _TAG.sub(" ", text).lower()).split())


def echoes(reply: str, question: str = "") -> bool:
    """True when ``reply`` holds a prompt's language instruction or (nearly) repeats ``question``."""
    said = _normalised(reply)
    if any(_normalised(instruction) in said for instruction in ANSWER_IN.values()):
        return True
    asked = _normalised(question)
    return bool(asked) and SequenceMatcher(None, said, asked).ratio() >= ECHO_SIMILARITY


def wrong_language(text: str, lang: str) -> bool:
    """True when the other language's common words clearly outnumber ``lang``'s (at least 2 and
    more than twice as many); short or mixed replies pass."""
    words = [w.lower() for w in _WORD.findall(text)]
    mine = sum(w in COMMON[lang] for w in words)
    other = sum(w in COMMON["ms" if lang == "en" else "en"] for w in words)
    return other >= 2 and other > 2 * mine
