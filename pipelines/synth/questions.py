"""Checkable questions about media with known facts, in English or Malay.

Each function returns a :class:`QA` or None when no unambiguous question of that type exists
(e.g. "which image has red shapes?" when two images are red). Answers are short and exact: the
evaluation job scores them by exact match. A QA also names the facts its answer states and the
facts that would give it away, so a dialogue can avoid asking what its history already answered.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

from .words import ATTRIBUTE, CROSS, SAME, SPEECH, VERIFY, WHICH, template, things, word

YES, NO = "yes", "no"


@dataclass
class Item:
    """One media item in a dialogue: its id, kind (image/audio/speech), facts and how text names it."""

    media_id: str
    kind: str
    facts: dict
    ref: dict  # lang -> "image 2" / "the image"
    named: bool = False  # one of several, named by its number ("image 2")

    @property
    def modality(self) -> str:
        return "image" if self.kind == "image" else "audio"


Fact = tuple[str, str]  # (media_id, attribute)


class QA(NamedTuple):
    """A question, its exact answer and the facts behind them."""

    question: str
    answer: str
    states: frozenset[Fact]
    """The facts the answer says."""
    needs: tuple[frozenset[Fact], ...]
    """Sets of facts, any one of which answers the question without the media."""

    def answered_by(self, stated: set[Fact]) -> bool:
        return any(need <= stated for need in self.needs)


def _qa(question: str, answer: str, facts: set[Fact]) -> QA:
    """A question whose answer states exactly the facts it needs."""
    return QA(question, answer, frozenset(facts), (frozenset(facts),))


def _value(attr: str, v, lang: str) -> str:
    """A fact as an answer says it: a count's digit ("3"), else its word ("merah")."""
    return str(v) if attr == "count" else word(v, lang)


def attribute(item: Item, lang: str, rng: random.Random):
    """"What colour are the shapes in the image?" -> "red"; "... in image 2?" -> "image 2 red".

    A named item's answer starts with its name, so the number is the token right before the fact:
    the step that writes the fact looks up the span carrying that number from its own token. A
    bare "red" needs the number carried over from the question first, which the tiny LM learned
    in some runs and not others (docs/LEARNING.md#answer-formats).
    """
    if item.kind == "speech":
        return _qa(template(SPEECH, lang).format(ref=item.ref[lang]), item.facts["phrase"], {(item.media_id, "phrase")})
    attr = rng.choice(sorted(ATTRIBUTE[item.kind]))
    q = template(ATTRIBUTE[item.kind][attr], lang).format(ref=item.ref[lang])
    value = _value(attr, item.facts[attr], lang)
    return _qa(q, f"{item.ref[lang]} {value}" if item.named else value, {(item.media_id, attr)})


def verdict(evidence: list[str], holds: bool, lang: str) -> str:
    """A yes/no answer that states what it compares first: "red and blue, so no".

    A bare "yes"/"no" asks a small LM to compare two things it has only read (two items, or an
    item and a claimed value) in one step; the tiny LM never learned that (chance in every chain
    run: it said "no" in English and "ya" in Malay whatever the media). Written out first, the two
    sit a fixed few tokens before the verdict, and comparing them is learned (docs/LEARNING.md#answer-formats).
    """
    facts = f" {word('and', lang)} ".join(evidence)
    return f"{facts}, {word('so', lang)} {word(YES if holds else NO, lang)}"


def verify(item: Item, lang: str, rng: random.Random, pools: dict):
    """"Are there 2 beeps in audio 1?" -> "2? 3, so no" / "2? 3, jadi tidak": the claim echoed,
    then the fact (half the time the claim is false). Echoing the claim puts it next to the fact:
    the claim in the question alone sits too far back for the tiny LM to compare (chance)."""
    if item.kind == "speech":
        return None
    attr = rng.choice(sorted(VERIFY[item.kind]))
    truth = item.facts[attr]
    claim = truth if rng.random() < 0.5 else rng.choice([v for v in pools[attr] if v != truth])
    value = things(item.kind, claim, lang) if attr == "count" else word(claim, lang)
    q = template(VERIFY[item.kind][attr], lang).format(ref=item.ref[lang], value=value)
    answer = f"{_value(attr, claim, lang)}? " + verdict([_value(attr, truth, lang)], claim == truth, lang)
    return _qa(q, answer, {(item.media_id, attr)})


def which(items: list[Item], lang: str, rng: random.Random, labels: list[str]):
    """"Which image has red shapes?" -> "image 2", only when exactly one item matches. Knowing
    that item's colour gives the answer away, and so does knowing every other item's."""
    kind = items[0].kind
    attrs = sorted(WHICH[kind])
    rng.shuffle(attrs)
    for attr in attrs:
        values = [it.facts[attr] for it in items]
        unique = [v for v in values if values.count(v) == 1]
        if unique:
            v = rng.choice(unique)
            value = things(kind, v, lang) if attr == "count" else word(v, lang)
            at = values.index(v)
            others = frozenset((it.media_id, attr) for k, it in enumerate(items) if k != at)
            found = frozenset({(items[at].media_id, attr)})
            return QA(template(WHICH[kind][attr], lang).format(value=value), labels[at], found, (found, others))
    return None


def same(items: list[Item], lang: str, rng: random.Random):
    """"Do image 1 and image 3 have the same colour?" -> "red and blue, so no".

    The pair is chosen so that "yes" and "no" are equally likely where both are possible:
    random pairs mostly differ, and a model would learn to answer "no" without looking.
    """
    attr = rng.choice(sorted(SAME[items[0].kind]))
    pairs = [(i, j) for i in range(len(items)) for j in range(i + 1, len(items))]
    matching = [p for p in pairs if items[p[0]].facts[attr] == items[p[1]].facts[attr]]
    differing = [p for p in pairs if p not in matching]
    i, j = rng.choice(matching if matching and (not differing or rng.random() < 0.5) else differing)
    a, b = items[i], items[j]
    q = template(SAME[a.kind][attr], lang).format(a=a.ref[lang], b=b.ref[lang])
    values = [_value(attr, it.facts[attr], lang) for it in (a, b)]
    return _qa(q, verdict(values, a.facts[attr] == b.facts[attr], lang), {(a.media_id, attr), (b.media_id, attr)})


def cross(image: Item, audio: Item, lang: str):
    """"Are there as many shapes in the image as beeps in the audio?" -> "2 and 2, so yes"."""
    q = template(CROSS, lang).format(image=image.ref[lang], audio=audio.ref[lang])
    counts = [image.facts["count"], audio.facts["count"]]
    answer = verdict([_value("count", c, lang) for c in counts], counts[0] == counts[1], lang)
    return _qa(q, answer, {(image.media_id, "count"), (audio.media_id, "count")})
