"""Offline media with known facts: Pillow shapes (PNG), beeps of a known pitch (WAV), espeak-ng words.

Item ``i`` of a modality is drawn from an RNG seeded by ``(seed, modality, i)``, so the same seed
gives the same bytes (hence the same media_ids) however the work is split across Ray tasks.
Facts cycle through every combination in a seeded order, so even a small pool covers them all.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import shutil
import subprocess
import tempfile

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


def draw_image(facts: dict, rng: random.Random, size: int = 32) -> bytes:
    """``count`` filled shapes, one per quadrant cell, on white; PNG bytes."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cell = size // 2
    base = COLOURS[facts["colour"]]
    colour = tuple(int(min(255, max(0, c + rng.randint(-12, 12)))) for c in base)
    for q in rng.sample(range(4), facts["count"]):
        s = rng.randint(cell - 5, cell - 3)  # 11-13 px in a 16 px cell: clearly visible
        x0 = (q % 2) * cell + rng.randint(1, cell - s - 1)
        y0 = (q // 2) * cell + rng.randint(1, cell - s - 1)
        box = (x0, y0, x0 + s, y0 + s)
        if facts["shape"] == "circle":
            draw.ellipse(box, fill=colour)
        elif facts["shape"] == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x0 + s / 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_beeps(facts: dict, rng: random.Random) -> bytes:
    """``count`` beeps of 0.2 s, 0.2 s apart, at a pitch in the fact's range; 1-2 s WAV, 16 kHz."""
    on, gap = 0.2, 0.2
    need = facts["count"] * on + (facts["count"] - 1) * gap
    seconds = max(round(rng.uniform(1.0, 2.0), 1), round(need + 0.3, 1))
    start = rng.uniform(0.05, seconds - need - 0.1)
    hz = rng.uniform(*PITCHES[facts["pitch"]])
    amp = rng.uniform(0.3, 0.5)
    nrng = np.random.default_rng(rng.getrandbits(32))
    wave = nrng.normal(0.0, 0.003, int(seconds * SAMPLE_RATE)).astype(np.float32)
    t = np.arange(int(on * SAMPLE_RATE)) / SAMPLE_RATE
    fade = np.minimum(1.0, np.minimum(t, on - t) / 0.01)  # 10 ms ramps: no clicks
    beep = (amp * fade * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    for k in range(facts["count"]):
        i = int((start + k * (on + gap)) * SAMPLE_RATE)
        wave[i : i + len(beep)] += beep
    buf = io.BytesIO()
    sf.write(buf, wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def make_item(seed: int, kind: str, index: int) -> tuple[bytes, dict, str]:
    """(bytes, facts, file extension) of one item."""
    rng, facts = rng_for(seed, kind, index), facts_for(seed, kind, index)
    if kind == IMAGE:
        return draw_image(facts, rng), facts, "png"
    if kind == AUDIO:
        return make_beeps(facts, rng), facts, "wav"
    return speak(facts, rng), facts, "wav"


class MakeMedia:
    """(kind, index) rows -> files under ``<root>/media/`` + manifest rows with facts."""

    NEEDS = ("kind", "index")

    def __init__(self, root: str, storage: StorageConfig, seed: int):
        self.fs, self.root = storage.filesystem(root)
        self.seed = seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        require(batch, self.NEEDS, type(self).__name__)
        rows = []
        for kind, index in zip(batch["kind"].to_pylist(), batch["index"].to_pylist()):
            data, facts, ext = make_item(self.seed, kind, index)
            rel = f"media/{kind}/{index:06d}.{ext}"
            self.fs.pipe_file(join(self.root, rel), data)
            modality = IMAGE if kind == IMAGE else AUDIO
            rows.append(dict(uri=rel, modality=modality, kind=kind, index=index, media_id=media_id(data), facts=json.dumps(facts)))
        return pa.Table.from_pylist(rows, schema=MANIFEST_ROW)
