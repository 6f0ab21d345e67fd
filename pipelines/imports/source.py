"""Reading a dialogue source: the file's text (UTF-8), and its records as JSON texts, from a JSON
array or JSON Lines, with the rows that are not JSON."""

from __future__ import annotations

import json
import re

from ..storage import StorageConfig


def check_source(source: str, storage: StorageConfig) -> None:
    """Before Ray starts: a source that is not there is a one-line error, not a traceback 20 s later."""
    fs, path = storage.filesystem(source)
    if not fs.isfile(path):
        raise FileNotFoundError(f"source {source} does not exist (or is a folder): give a JSON or JSONL file")


def read_text(source: str, storage: StorageConfig) -> str:
    """The source as text: UTF-8, a byte-order mark (as some editors write) dropped."""
    check_source(source, storage)
    fs, path = storage.filesystem(source)
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"source {source} is not UTF-8 text (byte {e.start}: {e.reason}); "
                         "JSON and JSONL files are UTF-8, so convert it first") from None


def read_records(source: str, storage: StorageConfig) -> tuple[list[tuple[int, str]], list[dict]]:
    """(row, record JSON) pairs and the rows that are not JSON. A file starting with ``[`` is a
    JSON array, anything else JSONL (blank lines skipped); rows count from 1.

    JSONL lines end at "\\n" only: str.splitlines() would also split at U+2028, U+0085 and other
    separators that JSON strings may hold unescaped."""
    text = read_text(source, storage)
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(array_items(text), start=1)), []
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} starts with '[' but is not a valid JSON array: {e}") from None
    good, bad = [], []
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
            good.append((i, line))
        except json.JSONDecodeError as e:
            bad.append({"row": i, "stage": "parse", "reason": f"not JSON: {e}"})
    return good, bad


def array_items(text: str):
    """Each item of a JSON array, as its own JSON text, decoded one at a time: ``json.loads`` of the
    whole array holds every record as Python objects at once, ~5x the file in memory
    (docs/DATA.md, "Import memory")."""
    decoder, space = json.JSONDecoder(), re.compile(r"\s*")
    at = space.match(text, text.index("[") + 1).end()
    if text.startswith("]", at):
        at += 1
    else:
        while True:
            _, end = decoder.raw_decode(text, at)
            yield text[at:end]
            at = space.match(text, end).end()
            if not text.startswith(",", at):
                if not text.startswith("]", at):
                    raise json.JSONDecodeError("expected ',' or ']' after an item", text, at)
                at += 1
                break
            at = space.match(text, at + 1).end()
    if space.match(text, at).end() != len(text):
        raise json.JSONDecodeError("extra data after the array", text, at)
