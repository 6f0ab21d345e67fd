"""Reading media from S3 with ingest's ``ReadBytes``, side by side with one object at a time.

An S3 server here is moto on 127.0.0.1, behind a delay per request that stands in for S3's
time to first byte (``--latency-ms``, default 20: a GET of a small object from inside its AWS
region). Both methods read the same objects from the same server in one run:

- one by one: a size lookup (HEAD) then a GET per object, one object after another (what ingest
  did until 2026-12-07);
- ReadBytes:  ingest's stage as it runs, one batch of ``--batch`` uris per call (a single
  ranged GET per object, sent concurrently by s3fs).

Usage:
    python bench/ingest_s3.py [--objects 256] [--kib 30] [--batch 64] [--latency-ms 20]

The last line is a JSON object with both rates and ``speedup``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402

from mmm.schema import IMAGE  # noqa: E402
from pipelines.ingest import ReadBytes  # noqa: E402
from pipelines.storage import StorageConfig  # noqa: E402

BUCKET = "bench-media"


class Delayed:
    """A WSGI app that answers each request after ``seconds``, as a distant server would."""

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    def __call__(self, environ, start_response):
        time.sleep(self.seconds)
        return self.app(environ, start_response)


def start_s3(latency_s: float):
    """A threaded moto server on 127.0.0.1 (one thread a request, so delays overlap as S3's do)."""
    import logging
    import threading

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = make_server("127.0.0.1", 0, Delayed(DomainDispatcherApplication(create_backend_app), latency_s), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return server, StorageConfig(endpoint_url=f"http://{host}:{port}", key="bench", secret="bench")


def one_by_one(storage: StorageConfig, uris: list[str]) -> int:
    fs, _ = storage.filesystem(uris[0])
    total = 0
    for uri in uris:
        path = uri.removeprefix("s3://")
        fs.size(path)
        total += len(fs.cat_file(path))
    return total


def read_bytes(storage: StorageConfig, uris: list[str], batch: int) -> int:
    stage = ReadBytes(storage)
    total = 0
    for i in range(0, len(uris), batch):
        part = uris[i : i + batch]
        got = stage(pa.table({"uri": part, "modality": [IMAGE] * len(part)}))
        assert got["error"].null_count == len(part), got["error"].drop_null().to_pylist()[:1]
        total += sum(got["num_bytes"].to_pylist())
    return total


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=256)
    ap.add_argument("--kib", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64, help="rows per ReadBytes call (ingest's batch_size)")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    args = ap.parse_args(argv)

    import boto3

    server, storage = start_s3(args.latency_ms / 1000)
    try:
        client = boto3.client("s3", endpoint_url=storage.endpoint_url, aws_access_key_id="bench",
                              aws_secret_access_key="bench", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        uris = []
        for i in range(args.objects):
            client.put_object(Bucket=BUCKET, Key=f"media/{i:06d}.png", Body=i.to_bytes(4, "big") * (args.kib * 256))
            uris.append(f"s3://{BUCKET}/media/{i:06d}.png")
        rates = {}
        for name, run in (("one_by_one", lambda: one_by_one(storage, uris)),
                          ("read_bytes", lambda: read_bytes(storage, uris, args.batch))):
            start = time.perf_counter()
            total = run()
            seconds = time.perf_counter() - start
            assert total == args.objects * args.kib * 1024, (name, total)
            rates[name] = args.objects / seconds
            print(f"{name:>10}: {args.objects} objects in {seconds:.2f} s, {rates[name]:.1f} objects/s", flush=True)
    finally:
        server.shutdown()
    result = {"objects": args.objects, "kib": args.kib, "batch": args.batch, "latency_ms": args.latency_ms,
              "one_by_one_per_s": round(rates["one_by_one"], 1), "read_bytes_per_s": round(rates["read_bytes"], 1),
              "speedup": round(rates["read_bytes"] / rates["one_by_one"], 2)}
    print(f"ReadBytes {result['speedup']}x one object at a time")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
