"""Offline media with known facts: Pillow shapes (PNG), beeps of a known pitch (WAV), espeak-ng words.

Item ``i`` of a modality is drawn from an RNG seeded by ``(seed, modality, i)``, so the same seed
gives the same bytes (hence the same media_ids) however the work is split across Ray tasks.
Facts cycle through every combination in a seeded order, so even a small pool covers them all.
Everything that is not a fact varies from item to item (:class:`Style`): canvas size, shape size
and place, colour shade, background; beep and gap lengths, onset, pitch inside its range,
amplitude, noise. ``eval_ood`` items take those parameters from outside the training ranges.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, fields, replace

import numpy as np
import pyarrow as pa
import soundfile as sf
from PIL import Image, ImageDraw

from mmm.config import SAMPLE_RATE
from mmm.media import media_id
from mmm.schema import AUDIO, IMAGE

from ..runtime import require
from ..storage import StorageConfig, join
from .speech import speak, speech_facts
from .words import COLOURS, COUNTS, PITCHES, SHAPES

SPEECH = "speech"
"""A third kind of item, audio modality: a spoken phrase (pipelines/synth/speech.py; only when
espeak-ng is installed)."""

MANIFEST_ROW = pa.schema(
    [
        ("uri", pa.string()),  # relative to the root: the root can move (local <-> s3)
        ("modality", pa.string()),
        ("kind", pa.string()),  # image | audio | speech
        ("index", pa.int64()),
        ("style", pa.string()),  # train | ood (see Style)
        ("media_id", pa.string()),
        ("facts", pa.string()),  # JSON
    ]
)


def rng_for(seed: int, kind: str, index: int) -> random.Random:
    return random.Random(f"{seed}:{kind}:{index}")


def facts_for(seed: int, kind: str, index: int) -> dict:
    """The facts of item ``index``: all combinations in a seeded order, cycled."""
    if kind == IMAGE:
        combos = [dict(colour=c, shape=s, count=n) for c, s, n in itertools.product(COLOURS, SHAPES, COUNTS)]
    elif kind == AUDIO:
        combos = [dict(pitch=p, count=n) for p, n in itertools.product(PITCHES, COUNTS)]
    else:
        return speech_facts(seed, index)
    random.Random(f"{seed}:{kind}:order").shuffle(combos)
    return dict(combos[index % len(combos)])


@dataclass(frozen=True)
class Style:
    """How an item is rendered: the ranges each draw takes its parameters from.

    A range is a tuple of ``(low, high)`` intervals; a value is drawn uniformly from one of them,
    chosen at random. ``TRAIN`` (train and eval media) varies every parameter widely so a model
    learns the facts and not the renderer; ``OOD`` (the ``eval_ood`` split) draws every rendering
    parameter outside ``TRAIN``'s intervals, with the same facts, so the gap between the two
    splits says how much the model learned the renderer instead. One exception: a shape's place in
    its cell, which ``OOD``'s larger shapes leave almost no room to vary.
    """

    canvas: tuple = ((24, 48),)
    """Picture side in pixels; the vision encoder resizes every picture to its own size."""
    fill: tuple = ((0.55, 0.9),)
    """Shape side as a share of its quadrant cell."""
    shade: tuple = ((-0.25, 0.25),)
    """How far the colour moves from its base: negative toward black, positive toward white."""
    jitter: int = 8
    """Per-channel noise added to the shaded colour, in levels of 255."""
    background: tuple = ((236, 255),)
    """Grey level of the background."""
    beep: tuple = ((0.12, 0.3),)
    """Beep length, seconds."""
    gap: tuple = ((0.12, 0.3),)
    """Silence between beeps, seconds."""
    amplitude: tuple = ((0.15, 0.6),)
    noise: tuple = ((0.0, 0.015),)
    """Standard deviation of the background noise."""
    tail: tuple = ((0.2, 1.0),)
    """Seconds of clip around the beeps (split between onset and end by ``onset``)."""
    onset: tuple = (0.0, 1.0)
    """One interval: the share of the tail, less 0.1 s, that comes before the first beep."""
    pitch: tuple = tuple(PITCHES.items())
    """Each pitch fact's band of tone frequencies, Hz."""
    speed: tuple = ((140, 180),)
    """espeak-ng words per minute."""


TRAIN = Style()
OOD = Style(
    canvas=((64, 96),),
    fill=((0.92, 0.98),),
    shade=((-0.45, -0.37), (0.37, 0.45)),
    jitter=0,
    background=((226, 234),),
    beep=((0.34, 0.42),),
    gap=((0.34, 0.45),),
    amplitude=((0.1, 0.13), (0.65, 0.8)),
    noise=((0.018, 0.025),),
    tail=((1.1, 1.5),),
    onset=(0.9, 1.0),
    pitch=(("low", (270.0, 320.0)), ("high", (1750.0, 2050.0))),
    speed=((110, 130), (190, 210)),
)
"""Larger shapes and canvases, shades further from the base than a training shade and its jitter
reach, a darker background; longer beeps and gaps, quieter or louder beeps, more noise, longer
clips whose beeps start later than any training clip's (0.95-1.45 s against 0.05-0.95 s), tones
below and above the training bands of their pitch. Not smaller shapes or shorter beeps: below 0.5 of a cell a
shape covers less than one 8-pixel patch of the tiny vision tower, and a beep under 0.1 s less than
two audio tokens (80 ms each), which the tiny encoders cannot resolve at all (a probe reads shape
and count at chance there), so those would measure the encoders' resolution, not generalisation."""
STYLES = {"train": TRAIN, "ood": OOD}


def partly_ood(names) -> Style:
    """``TRAIN`` with only the fields ``names`` taken from ``OOD`` (all of ``OOD`` when none are
    named): twins that differ in one parameter say which one costs a fact (bench/probe_media.py,
    bench/ood_answers.py)."""
    if not names:
        return OOD
    known = [f.name for f in fields(Style)]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"no Style field {unknown}; the fields are {known}")
    return replace(TRAIN, **{name: getattr(OOD, name) for name in names})


def draw(rng: random.Random, ranges: tuple) -> float:
    low, high = rng.choice(ranges)
    return rng.uniform(low, high)


def shade(base: tuple, t: float, rng: random.Random, jitter: int = 8) -> tuple:
    """``base`` moved toward white (t > 0) or black (t < 0), plus up to ``jitter`` per channel."""
    target = 255 if t > 0 else 0
    return tuple(int(min(255, max(0, c + abs(t) * (target - c) + (rng.randint(-jitter, jitter) if jitter else 0)))) for c in base)


def draw_image(facts: dict, rng: random.Random, style: Style = TRAIN) -> bytes:
    """``count`` filled shapes, one per quadrant cell, on a light background; PNG bytes."""
    size = int(draw(rng, style.canvas))
    grey = int(draw(rng, style.background))
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    paint = ImageDraw.Draw(img)
    cell = size / 2
    colour = shade(COLOURS[facts["colour"]], draw(rng, style.shade), rng, style.jitter)
    for q in rng.sample(range(4), facts["count"]):
        s = max(4.0, draw(rng, style.fill) * cell)
        x0 = (q % 2) * cell + rng.uniform(0, cell - s)
        y0 = (q // 2) * cell + rng.uniform(0, cell - s)
        box = (x0, y0, x0 + s, y0 + s)
        if facts["shape"] == "circle":
            paint.ellipse(box, fill=colour)
        elif facts["shape"] == "square":
            paint.rectangle(box, fill=colour)
        else:
            paint.polygon([(x0 + s / 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_beeps(facts: dict, rng: random.Random, style: Style = TRAIN) -> bytes:
    """``count`` beeps at a pitch inside the fact's range, each beep and gap its own length; WAV, 16 kHz."""
    n = facts["count"]
    ons = [draw(rng, style.beep) for _ in range(n)]
    gaps = [draw(rng, style.gap) for _ in range(n - 1)]
    need = sum(ons) + sum(gaps)
    tail = draw(rng, style.tail)
    start = 0.05 + rng.uniform(style.onset[0] * (tail - 0.1), style.onset[1] * (tail - 0.1))
    seconds = need + tail
    hz = rng.uniform(*dict(style.pitch)[facts["pitch"]])
    nrng = np.random.default_rng(rng.getrandbits(32))
    wave = nrng.normal(0.0, draw(rng, style.noise), int(seconds * SAMPLE_RATE)).astype(np.float32)
    at = start
    for k in range(n):
        on, amp = ons[k], draw(rng, style.amplitude)
        t = np.arange(int(on * SAMPLE_RATE)) / SAMPLE_RATE
        fade = np.minimum(1.0, np.minimum(t, on - t) / 0.01)  # 10 ms ramps: no clicks
        i = int(at * SAMPLE_RATE)
        wave[i : i + len(t)] += (amp * fade * np.sin(2 * np.pi * hz * t)).astype(np.float32)
        at += on + (gaps[k] if k < n - 1 else 0.0)
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1.0, 1.0), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def make_item(
    seed: int, kind: str, index: int, style: str = "train", look: Style | None = None
) -> tuple[bytes, dict, str]:
    """(bytes, facts, file extension) of one item. An ``ood`` item has the facts of the ``train``
    item with the same index, drawn with :data:`OOD`'s parameters (its own RNG). ``look`` renders
    with other parameters under ``style``'s RNG (:func:`partly_ood`'s twins)."""
    rng = rng_for(seed, kind if style == "train" else f"{kind}-{style}", index)
    facts, look = facts_for(seed, kind, index), look or STYLES[style]
    if kind == IMAGE:
        return draw_image(facts, rng, look), facts, "png"
    if kind == AUDIO:
        return make_beeps(facts, rng, look), facts, "wav"
    return speak(facts, rng), facts, "wav"


class MakeMedia:
    """(kind, index, style) rows -> files under ``<root>/media/`` + manifest rows with facts."""

    NEEDS = ("kind", "index", "style")

    def __init__(self, root: str, storage: StorageConfig, seed: int):
        self.fs, self.root = storage.filesystem(root)
        self.seed = seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        require(batch, self.NEEDS, type(self).__name__)
        rows = []
        cols = (batch[c].to_pylist() for c in self.NEEDS)
        for kind, index, style in zip(*cols):
            data, facts, ext = make_item(self.seed, kind, index, style)
            folder = kind if style == "train" else f"{kind}-{style}"
            rel = f"media/{folder}/{index:06d}.{ext}"
            self.fs.pipe_file(join(self.root, rel), data)
            modality = IMAGE if kind == IMAGE else AUDIO
            rows.append(dict(uri=rel, modality=modality, kind=kind, index=index, style=style, media_id=media_id(data),
                             facts=json.dumps(facts)))
        return pa.Table.from_pylist(rows, schema=MANIFEST_ROW)
