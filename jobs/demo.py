"""The whole chain on the tiny preset, on one machine, in minutes.

Usage: python jobs/demo.py [--out outputs/demo]

For now: builds the tiny model and holds a two-turn chat with two images and two audio clips.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image, ImageDraw

from mmm.config import SAMPLE_RATE, preset
from mmm.model import MMMModel
from mmm.schema import AUDIO, IMAGE


def demo_media():
    """Two pictures (a red circle, two blue squares) and two clips (1 and 3 beeps)."""
    red = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(red).ellipse((6, 6, 26, 26), fill="red")
    blue = Image.new("RGB", (32, 32), "white")
    for x in (3, 18):
        ImageDraw.Draw(blue).rectangle((x, 10, x + 10, 20), fill="blue")
    t = np.arange(int(0.15 * SAMPLE_RATE)) / SAMPLE_RATE
    beep = 0.4 * np.sin(2 * np.pi * 880 * t)
    gap = np.zeros(int(0.15 * SAMPLE_RATE))
    clips = [np.concatenate([beep, gap] * n).astype(np.float32) for n in (1, 3)]
    return [red, blue], clips


def chat(model: MMMModel, turns: list[str], images, clips) -> list[str]:
    """Feed user turns one by one; media spans in a turn take the next images/clips in order."""
    feats = {IMAGE: model.encode_media(IMAGE, images), AUDIO: model.encode_media(AUDIO, clips)}
    messages, answers = [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        from mmm.chat import media_modalities

        used = {IMAGE: 0, AUDIO: 0}
        ordered = []
        for m in media_modalities(messages):
            ordered.append(feats[m][used[m]])
            used[m] += 1
        r = model.render(messages, ordered, add_generation_prompt=True)
        img = [f for m, f in zip(r.modalities, ordered) if m == IMAGE]
        aud = [f for m, f in zip(r.modalities, ordered) if m == AUDIO]
        answer = model.tokenizer.decode(model.generate(r.input_ids, img, aud, max_new_tokens=12))
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
    return answers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo")
    parser.parse_args(argv)
    start = time.time()
    model = MMMModel.build(preset("tiny")).eval()
    images, clips = demo_media()
    turns = [
        "<image></image><image></image> What colour is the shape in image 1?",
        "<audio></audio><audio></audio> Berapa bip dalam audio 2?",
    ]
    for q, a in zip(turns, chat(model, turns, images, clips)):
        print(f"user: {q}\nmmm:  {a}\n")
    print(f"demo finished in {time.time() - start:.1f} s (untrained tiny model: answers are noise)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
