"""Serving benchmark: the feature cache and request batching, measured through the real app.

    .venv/bin/python bench/serve.py [--images 6] [--clips 6] [--clients 16] [--reply-tokens 32] ...

Starts a private Ray cluster and Serve on 127.0.0.1 with two copies of the app (tiny preset):
``/on`` with the encoder-feature cache, ``/off`` without. Then prints, side by side:

1. latency of a follow-up turn that re-sends K media (6 real photos at 3 MP as JPEG, 6 voice-note-like
   10 s MP3 clips at 44.1 kHz stereo) with the cache on vs off (the first turn primes the cache;
   each follow-up asks a new question). A miss costs decoding, resampling, resizing and encoding;
   a hit costs a sha256 of the bytes;
2. throughput of N clients sending at once vs the same requests one at a time (``/on``, a 512 px
   photo and a question each, 32-token replies);
3. one client's latency (``/on``, 2 photos and a new question each time, 16 new tokens; median),
   over HTTP and sent straight to the model replica's handle, and the replica's decode step: where
   one request's time goes;
4. the prefix KV cache on turn 27 of an MMDU-sized chat (20 images, 10 clips) at the real presets'
   lengths, on vs off, and its hit rate over the turn-by-turn replay (in process, after Serve
   stops: see ``bench/serve_mmdu.py``).

The last line is a JSON object with ``cache_speedup``, ``concurrency_speedup``, ``single_client_ms``,
``prefix_cache_speedup`` and ``prefix_hit_rate``.
"""

import argparse
import base64
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=6, help="photos re-sent in the follow-up turn")
    p.add_argument("--photo-size", default="2048x1536", help="WxH of those photos (3 MP: what messaging apps send)")
    p.add_argument("--clips", type=int, default=6, help="voice clips re-sent in the follow-up turn")
    p.add_argument("--clip-seconds", type=float, default=10.0,
                   help="length of each clip: 125 tokens per 10 s, and the tiny context is 1024 tokens")
    p.add_argument("--followups", type=int, default=5, help="follow-up turns timed per setting (median)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--rounds", type=int, default=3, help="requests per client in the concurrency test")
    p.add_argument("--trials", type=int, default=2, help="sequential/concurrent pairs, alternated (median)")
    p.add_argument("--max-tokens", type=int, default=16, help="reply length in the cache test")
    p.add_argument("--reply-tokens", type=int, default=32, help="reply length in the concurrency test")
    p.add_argument("--single-requests", type=int, default=15, help="requests timed for one client's latency")
    p.add_argument("--mmdu-turns", type=int, default=27, help="turns of the MMDU-sized chat (0 skips it)")
    p.add_argument("--mmdu-clip-seconds", type=float, default=20.0, help="length of each of its 10 clips")
    return p.parse_args()


# ---- media ------------------------------------------------------------------------------
def photo_parts(n: int, size: tuple[int, int] = (512, 512)) -> list[dict]:
    """Real photos (scikit-image's), scaled to ``size`` as a phone or messaging app would send them."""
    from PIL import Image
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "hubble_deep_field", "immunohistochemistry"]
    parts = []
    for i in range(n):
        img = Image.fromarray(getattr(data, names[i % len(names)])()).convert("RGB").resize(size, Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90 - i)  # distinct bytes even when a photo repeats
        parts.append({"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,"
                                                         + base64.b64encode(buf.getvalue()).decode()}})
    return parts


def clip_parts(n: int, seconds: float = 30.0) -> list[dict]:
    """Speech-like clips as clients send them: 44.1 kHz stereo MP3 (decoded and resampled by the server)."""
    import soundfile as sf

    rate, parts = 44100, []
    rng = np.random.default_rng(0)
    for i in range(n):
        t = np.arange(int(seconds * rate)) / rate
        wave = 0.2 * np.sin(2 * np.pi * (200 + 50 * i) * t * (1 + 0.3 * np.sin(t))) + 0.05 * rng.standard_normal(len(t))
        buf = io.BytesIO()
        sf.write(buf, np.stack([wave, wave], 1).astype(np.float32), rate, format="MP3")
        parts.append({"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(),
                                                             "format": "mp3"}})
    return parts


# ---- cluster ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int, clients: int) -> None:
    import ray
    from ray import serve

    from serve.app import build
    from serve.config import ServeArgs

    tmp = tempfile.mkdtemp(prefix="mmm-bench-", dir="/tmp")
    ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = dict(search_dir=os.path.join(tmp, "none"), max_replicas=1, max_batch_size=clients, model_num_cpus=1,
                  max_body_bytes=256 << 20, max_media=64)
    serve.run(build(ServeArgs(**common)), name="on", route_prefix="/on", blocking=False)
    serve.run(build(ServeArgs(cache_bytes=0, **common)), name="off", route_prefix="/off")


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


# ---- measurements -----------------------------------------------------------------------
def chat(client, messages, max_tokens):
    return client.chat.completions.create(model="mmm", messages=messages, max_tokens=max_tokens, temperature=0)


def followup_latencies(on, off, media: list[dict], args) -> tuple[float, float]:
    """Median latency of follow-up turns that re-send every media item of the first turn, cache on
    and off measured alternately (so that load from elsewhere on the machine hits both alike)."""
    first = [{"role": "user", "content": [{"type": "text", "text": "Describe these."}, *media]}]
    replies = {id(c): chat(c, first, args.max_tokens).choices[0].message.content or "ok" for c in (on, off)}
    times: dict[int, list[float]] = {id(on): [], id(off): []}
    for i in range(args.followups):
        for c in (on, off):
            convo = first + [{"role": "assistant", "content": replies[id(c)]},
                             {"role": "user", "content": f"Question {i}: which one is loudest?"}]
            t0 = time.perf_counter()
            chat(c, convo, args.max_tokens)
            times[id(c)].append(time.perf_counter() - t0)
    return statistics.median(times[id(on)]), statistics.median(times[id(off)])


def throughput(client, requests: list[list[dict]], workers: int, max_tokens: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda m: chat(client, m, max_tokens), requests))
    return len(requests) / (time.perf_counter() - t0)


def single_client_question(photos: list[dict], i: int) -> list[dict]:
    """One client's i-th request: the same 2 photos, a new question."""
    return [{"role": "user", "content": [*photos[:2], {"type": "text", "text": f"Question {i}: what differs?"}]}]


def single_client_ms(client, photos: list[dict], n: int, max_tokens: int = 16) -> float:
    """Median latency of one client's requests: the same 2 photos, a new question each time."""
    times = []
    for i in range(n):
        msgs = single_client_question(photos, i)
        t0 = time.perf_counter()
        client.chat.completions.create(model="mmm", messages=msgs, max_tokens=max_tokens, temperature=0)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def replica_ms(photos: list[dict], n: int, max_tokens: int = 16) -> float:
    """The same requests as :func:`single_client_ms`, parsed here and sent straight to the model
    replica's handle: what is left of one client's latency without HTTP, Serve's proxy and the
    ingress."""
    from ray import serve

    from serve.config import RequestLimits
    from serve.openai_schema import parse_request

    model = serve.get_deployment_handle("ChatModel", "on")
    model_id, stream = model.info.remote().result()["id"], model.options(stream=True)
    times = []
    for i in range(n):
        body = json.dumps({"model": "mmm", "messages": single_client_question(photos, i), "max_tokens": max_tokens, "temperature": 0}).encode()
        t0 = time.perf_counter()
        list(stream.chat.remote(parse_request(body, RequestLimits(), model_id)))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def single_client_breakdown(client, port: int, photos: list[dict], n: int) -> dict:
    """One client's median latency over HTTP and straight to the model replica, alternated in
    rounds so that the machine's moment-to-moment speed hits both alike, and the replica's mean
    decode step over the same requests (from its /v1/stats)."""
    import requests

    stats = lambda: requests.get(f"http://127.0.0.1:{port}/on/v1/stats", timeout=30).json()  # noqa: E731
    before, http, direct = stats(), [], []
    for _ in range(3):
        http.append(single_client_ms(client, photos, max(1, n // 3)))
        direct.append(replica_ms(photos, max(1, n // 3)))
    after = stats()
    steps = after["steps"] - before["steps"]
    step_ms = 1000 * (after["generate_seconds"] - before["generate_seconds"]) / max(steps, 1)
    return {"http": statistics.median(http), "replica": statistics.median(direct), "step": step_ms}


def measure_served(args, port: int) -> dict:
    """Everything measured through Serve: follow-up latency with the feature cache on and off,
    throughput of one client vs many, one client's latency."""
    import openai
    import requests

    mk = lambda prefix: openai.OpenAI(base_url=f"http://127.0.0.1:{port}/{prefix}/v1", api_key="-",  # noqa: E731
                                      max_retries=0, timeout=600)
    on, off = mk("on"), mk("off")
    size = tuple(int(x) for x in args.photo_size.split("x"))
    media = photo_parts(args.images, size) + clip_parts(args.clips, args.clip_seconds)
    for c in (on, off):
        chat(c, [{"role": "user", "content": "hello"}], 2)
    lat_on, lat_off = followup_latencies(on, off, media, args)
    stats = lambda name: requests.get(f"http://127.0.0.1:{port}/{name}/v1/stats", timeout=30).json()  # noqa: E731
    model_stats = {name: stats(name) for name in ("on", "off")}

    photos = photo_parts(4)
    reqs = [[{"role": "user", "content": [{"type": "text", "text": f"Client {i}: what is in the picture?"},
                                          photos[i % 4]]}] for i in range(args.clients * args.rounds)]
    throughput(on, reqs[: args.clients], args.clients, args.reply_tokens)  # warm: caches the 4 photos
    seqs, pars = [], []
    for _ in range(args.trials):
        seqs.append(throughput(on, reqs, 1, args.reply_tokens))
        before = stats("on")
        pars.append(throughput(on, reqs, args.clients, args.reply_tokens))
        after = stats("on")
    steps = after["steps"] - before["steps"]
    mean_batch = (after["mean_batch"] * after["steps"] - before["mean_batch"] * before["steps"]) / max(steps, 1)
    return {"lat_on": lat_on, "lat_off": lat_off, "model_stats": model_stats, "requests": len(reqs),
            "seq": statistics.median(seqs), "par": statistics.median(pars), "mean_batch": mean_batch,
            "max_batch": after["max_batch"], "single": single_client_breakdown(on, port, photos, args.single_requests)}


def report(args, m: dict, mmdu: dict | None) -> dict:
    """Print the side-by-side tables; returns the last line's JSON object."""
    for name, st in m["model_stats"].items():
        c = st["cache"]
        print(f"cache {name:3s}: {st['requests']} requests; decode+encode+render {st['prepare_seconds']:.2f} s "
              f"(encoders {st['encode_seconds']:.2f} s), generation {st['generate_seconds']:.2f} s; "
              f"cache hits {c['hits']}, misses {c['misses']}, evictions {c['evictions']}")
    print(f"concurrent phase: {m['mean_batch']:.1f} requests decoded together on average (max {m['max_batch']})")
    k = args.images + args.clips
    cache_x, conc_x = m["lat_off"] / m["lat_on"], m["par"] / m["seq"]
    print(f"\n{'':44s}{'cache on':>12s}{'cache off':>12s}{'speedup':>10s}")
    print(f"{f'follow-up turn re-sending {k} media (s)':44s}{m['lat_on']:12.3f}{m['lat_off']:12.3f}{cache_x:9.1f}x")
    print(f"\n{'':44s}{'1 client':>12s}{f'{args.clients} clients':>12s}{'speedup':>10s}")
    label = f"throughput, {m['requests']} requests (req/s)"
    print(f"{label:44s}{m['seq']:12.2f}{m['par']:12.2f}{conc_x:9.1f}x")
    one = m["single"]
    print(f"\none client, 2 photos, 16 new tokens: median {one['http']:.0f} ms over HTTP, {one['replica']:.0f} ms "
          f"sent straight to the model replica (no HTTP, proxy or ingress); the replica's decode step "
          f"{one['step']:.1f} ms")
    result = {}
    if mmdu:
        t = mmdu["turn_s"]
        print(f"\n{'':44s}{'prefix on':>12s}{'prefix off':>12s}{'speedup':>10s}")
        label = f"turn {mmdu['turns']}, {mmdu['prompt_tokens']} tokens (s)"
        print(f"{label:44s}{t['cache_on']:12.3f}{t['cache_off']:12.3f}{mmdu['prefix_cache_speedup']:9.1f}x")
        print(f"prefix hit rate over the replay (reused / prompt tokens): {mmdu['prefix_hit_rate']:.2f}")
        result = {"prefix_cache_speedup": mmdu["prefix_cache_speedup"], "prefix_hit_rate": mmdu["prefix_hit_rate"],
                  "mmdu": mmdu}
    return {"cache_speedup": round(cache_x, 2), "concurrency_speedup": round(conc_x, 2),
            "single_client_ms": round(m["single"]["http"], 1),
            "single_client_breakdown_ms": {"model_replica": round(m["single"]["replica"], 1),
                                           "decode_step": round(m["single"]["step"], 2)}, **result,
            "followup_s": {"cache_on": round(m["lat_on"], 3), "cache_off": round(m["lat_off"], 3)},
            "throughput_rps": {"sequential": round(m["seq"], 2), "concurrent": round(m["par"], 2)},
            "mean_batch": round(m["mean_batch"], 2)}


def main() -> None:
    args = parse_args()
    port = free_port()
    print(f"starting Serve on 127.0.0.1:{port} (tiny preset, two apps: cache on / off) ...", flush=True)
    start(port, args.clients)
    try:
        measured = measure_served(args, port)
    finally:
        stop()
    mmdu = None
    if args.mmdu_turns:
        import serve_mmdu

        print(f"MMDU-sized chat ({args.mmdu_turns} turns, 20 images x 576 tokens, 10 clips) in process ...", flush=True)
        mmdu = serve_mmdu.run(turns=args.mmdu_turns, clip_seconds=args.mmdu_clip_seconds)
    print(json.dumps(report(args, measured, mmdu)))


if __name__ == "__main__":
    main()
