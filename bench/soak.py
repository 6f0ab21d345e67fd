"""Memory under a soak of valid and bad requests: the model replica's RSS at the start and end.

    .venv/bin/python bench/soak.py [--seconds 600] [--clients 4]

Starts the app (tiny preset) on 127.0.0.1 like ``bench/serve.py``, warms it, then for ``--seconds``
has ``--clients`` threads send, in turn, a valid request with a new image (so the caches fill and
evict), a multi-turn follow-up, a corrupt image, malformed JSON and an over-long clip. Prints the
replica's RSS (MiB) at the start, every minute, and at the end; the last line is JSON.
"""

import base64
import io
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repo's serve/ package, not bench/serve.py


def _bench_module():
    """bench/serve.py (start, stop, free_port), loaded under another name than the serve package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_bench", os.path.join(HERE, "serve.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_part(i: int) -> dict:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (i % 256, (7 * i) % 256, (13 * i) % 256)).save(buf, format="PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}


def bad_parts() -> tuple[dict, dict]:
    """A corrupt PNG and a clip a second past the 10-minute limit."""
    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000 * 601, np.float32), 16000, format="FLAC")
    long_clip = {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": "flac"}}
    bad_png = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nxx").decode()}}
    return bad_png, long_clip


def body(content: list[dict]) -> dict:
    return {"model": "mmm", "max_tokens": 8, "temperature": 0, "messages": content}


def client(url: str, c: int, stop_at: float, counts: dict, bad: tuple[dict, dict]) -> None:
    """Until ``stop_at``: a new image, its follow-up, a corrupt image, an over-long clip, broken JSON."""
    import requests

    bad_png, long_clip = bad
    i = 0
    while time.time() < stop_at:
        i += 1
        n = c * 100000 + i
        turn = [{"role": "user", "content": [png_part(n), {"type": "text", "text": f"what is {n}?"}]}]
        follow = turn + [{"role": "assistant", "content": "red"}, {"role": "user", "content": "and now?"}]
        for content in (turn, follow, [{"role": "user", "content": [bad_png]}], [{"role": "user", "content": [long_clip]}]):
            code = requests.post(f"{url}/chat/completions", json=body(content), timeout=120).status_code
            counts["ok" if code == 200 else "4xx" if 400 <= code < 500 else "other"] += 1
        r = requests.post(f"{url}/chat/completions", data=b'{"model": "mmm", "mess', timeout=30)
        counts["4xx" if r.status_code == 400 else "other"] += 1


def soak(url: str, seconds: float, clients: int) -> dict:
    import psutil
    import requests

    pid = requests.get(f"{url}/stats", timeout=30).json()["pid"]
    rss = lambda: psutil.Process(pid).memory_info().rss / 2**20  # noqa: E731
    requests.post(f"{url}/chat/completions", json=body([{"role": "user", "content": [png_part(0), {"type": "text", "text": "hi"}]}]),
                  timeout=120)
    start_rss, samples, counts, stop_at = rss(), [], {"ok": 0, "4xx": 0, "other": 0}, time.time() + seconds
    bad = bad_parts()  # encoded once: the 10-minute FLAC takes a while
    threads = [threading.Thread(target=client, args=(url, c, stop_at, counts, bad)) for c in range(clients)]
    [t.start() for t in threads]
    while any(t.is_alive() for t in threads):
        time.sleep(min(60, max(1, stop_at - time.time())))
        samples.append(round(rss(), 1))
        print(f"{time.time() - stop_at + seconds:6.0f} s: replica RSS {samples[-1]:.0f} MiB, {counts}", flush=True)
    stats = requests.get(f"{url}/stats", timeout=30).json()
    return {"seconds": seconds, "rss_start_mib": round(start_rss, 1), "rss_end_mib": round(rss(), 1),
            "rss_samples_mib": samples, "requests": counts, "prefix_cache": stats["prefix_cache"],
            "feature_cache": stats["cache"]}


def main() -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--clients", type=int, default=4)
    args = p.parse_args()
    bench = _bench_module()
    port = bench.free_port()
    bench.start(port, 16)
    try:
        result = soak(f"http://127.0.0.1:{port}/on/v1", args.seconds, args.clients)
    finally:
        bench.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
