"""Checks on an LM's reply before it becomes an assistant turn: malformed generations are rejected.

A small LM often answers nothing, writes the next user turn itself, names a picture that the
dialogue does not have, or answers in English when Malay was asked. Each check returns a short
reason (the errors table counts them) or None:

- ``no_answer``: empty, or no letters or digits at all;
- ``turn_order``: the reply carries a chat role marker (it speaks for the user or opens a turn);
- ``media_refs``: it names an item number the dialogue does not have ("picture 3" of two), or
  writes a media tag;
- ``wrong_language``: clearly more common words of the other language than of the one asked.
"""

from __future__ import annotations

import re

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
REASONS = ("no_answer", "turn_order", "media_refs", "wrong_language")


def check_reply(reply: str, lang: str | None, items: dict[str, int]) -> str | None:
    """The reason ``reply`` is malformed, or None. ``items``: how many images / audio clips the
    dialogue shows; ``lang``: the language asked for (None: not checked)."""
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
    if lang in COMMON and wrong_language(reply, lang):
        return "wrong_language"
    return None


def wrong_language(text: str, lang: str) -> bool:
    """True when the other language's common words clearly outnumber ``lang``'s (at least 2 and
    more than twice as many); short or mixed replies pass."""
    words = [w.lower() for w in _WORD.findall(text)]
    mine = sum(w in COMMON[lang] for w in words)
    other = sum(w in COMMON["ms" if lang == "en" else "en"] for w in words)
    return other >= 2 and other > 2 * mine
