"""The prefix KV cache on an MMDU-sized chat at the real presets' lengths, in process.

MMDU's longest sessions hold 20 images over 27 turns (~18k tokens). The real presets' vision tower
gives 576 tokens an image (SigLIP-base-384) and audio is 12.5 tokens a second; the tiny encoders'
features are tiled to those lengths (as ``bench/train.py`` does), the tiny LM's context is widened
to hold them, and requests go through the server's own ``ChatService`` + ``Scheduler`` (feature
cache on) with the prefix cache on and off. Replaying the chat turn by turn as a stateless client
does (every turn re-sends the whole history) gives the prefix hit rate; turn 27 is timed on both.
"""

from __future__ import annotations

import asyncio
import io
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's serve/, not this folder's serve.py

REAL_IMAGE_TOKENS = 576
"""SigLIP-base-patch16-384 (the tinyllama and mistral presets): (384 / 16)^2 patches."""


def _engine(model, prefix_bytes: int):
    from serve.engine import MMMEngine

    class Tiled(MMMEngine):
        """Image features tiled to the real presets' 576 tokens."""

        def encode(self, modality, items):
            feats = super().encode(modality, items)
            if modality != "image":
                return feats
            return [f.repeat(-(-REAL_IMAGE_TOKENS // len(f)), 1)[:REAL_IMAGE_TOKENS] for f in feats]

    return Tiled(model, "mmdu-bench", prefix_bytes)


def _png(t: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9 * t % 256, 255 - 9 * t, 40 * t % 256)).save(buf, format="PNG")
    return buf.getvalue()


def _wav(t: int, seconds: float) -> bytes:
    import soundfile as sf

    rate = 16000
    x = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.2 * np.sin(2 * np.pi * (220 + 40 * t) * x)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def _turn(t: int, clip_seconds: float, question: str):
    from serve.openai_schema import MediaItem

    parts, media = [], []
    if t < 20:
        parts.append({"type": "image"})
        media.append(MediaItem("image", f"turn{t}.image", _png(t)))
    if t < 10:
        parts.append({"type": "audio"})
        media.append(MediaItem("audio", f"turn{t}.audio", _wav(t, clip_seconds)))
    return {"role": "user", "content": parts + [{"type": "text", "text": question}]}, media


def _ask(scheduler, messages, media, max_tokens: int):
    from serve.openai_schema import ChatRequest, SamplingParams

    req = ChatRequest("mmdu-bench", messages, list(media), SamplingParams(max_tokens=max_tokens, temperature=0))
    t0 = time.perf_counter()
    done = asyncio.run(final_event(scheduler, req))
    return done, time.perf_counter() - t0


async def final_event(scheduler, req):
    """``req``'s last event through ``scheduler`` (serve/scheduler.py's protocol); its error raised."""
    last = None
    async for last in scheduler.submit(req):
        pass
    if last.error is not None:
        raise RuntimeError(last.error.message)
    return last


def run(turns: int = 27, clip_seconds: float = 20.0, max_tokens: int = 16, repeats: int = 3) -> dict:
    """Replay a ``turns``-turn chat (cache on), then time its last turn ``repeats`` times per setting."""
    from mmm.config import preset
    from mmm.model import MMMModel
    from serve.cache import FeatureCache
    from serve.scheduler import Scheduler
    from serve.service import ChatService

    cfg = preset("tiny")
    cfg.llm.max_context = cfg.llm.max_position_embeddings = 32768
    model = MMMModel.build(cfg).eval()
    services = {}
    for name, prefix in (("on", 1 << 30), ("off", 0)):
        engine = _engine(model, prefix)
        service = ChatService(engine, FeatureCache(1 << 30))
        services[name] = Scheduler(service, engine, max_rows=4), engine
    history, media = [], []
    on, on_engine = services["on"]
    for t in range(turns - 1):
        msg, items = _turn(t, clip_seconds, f"Turn {t}: what does image {min(t, 19) + 1} show?")
        history.append(msg)
        media += items
        done, _ = _ask(on, history, media, max_tokens)
        history.append({"role": "assistant", "content": done.text or "ok"})
    replay = on_engine.stats()
    times = {"on": [], "off": []}
    prompt_tokens = 0
    for k in range(repeats + 1):  # the first round warms the off side's feature cache
        msg, items = _turn(turns - 1, clip_seconds, f"Last turn, take {k}: compare image 1 and image 20.")
        for name in ("on", "off"):
            done, seconds = _ask(services[name][0], history + [msg], media + items, max_tokens)
            prompt_tokens = done.prompt_tokens
            if k:
                times[name].append(seconds)
    lat_on, lat_off = statistics.median(times["on"]), statistics.median(times["off"])
    return {"turn_s": {"cache_on": round(lat_on, 3), "cache_off": round(lat_off, 3)},
            "prefix_cache_speedup": round(lat_off / lat_on, 2), "prefix_hit_rate": replay["hit_rate"],
            "prompt_tokens": prompt_tokens, "turns": turns, "reused_tokens": replay["reused_tokens"]}


if __name__ == "__main__":
    print(run())
